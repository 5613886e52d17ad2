"""Byte tokenizer, chat templates and incremental detokenization."""
import jinja2.exceptions
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from workers.engine.tokenizer import ByteTokenizer, HFTokenizer, chatml, incremental_text

TOK = ByteTokenizer()


def stream(tok, ids, stop=()):
    """Emit deltas as a worker does, one token at a time, then the final flush."""
    deltas, emitted = [], 0
    for n in range(1, len(ids) + 1):
        d = incremental_text(tok, ids[:n], emitted, stop=stop)
        deltas.append(d)
        emitted += len(d)
    deltas.append(incremental_text(tok, ids, emitted, final=True))
    return deltas


def test_byte_tokenizer_round_trips_and_skips_special_tokens():
    text = "héllo, wörld ✓ 🙂"
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.decode([TOK.BOS] + ids + [TOK.EOS]) == text
    assert TOK.eos_token_ids == (257,) and TOK.vocab_size == 258


def test_split_multibyte_char_is_held_back_then_emitted_once():
    ids = TOK.encode("aé")            # 'a', 0xC3, 0xA9
    assert incremental_text(TOK, ids[:1], 0) == "a"
    assert incremental_text(TOK, ids[:2], 1) == ""          # half of 'é': wait
    assert incremental_text(TOK, ids[:3], 1) == "é"
    emoji = TOK.encode("🙂")          # four bytes
    assert [incremental_text(TOK, emoji[:n], 0) for n in range(1, 4)] == ["", "", ""]
    assert incremental_text(TOK, emoji, 0) == "🙂"


def test_deltas_concatenate_to_the_full_decode():
    text = "naïve 🙂 café\nend"
    deltas = stream(TOK, TOK.encode(text))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_context_and_generation_halves_emit_disjoint_text():
    ids = TOK.encode("zé🙂!")
    for split in range(1, len(ids)):
        first = incremental_text(TOK, ids[:split], 0)
        rest, emitted = [], len(first)
        for n in range(split + 1, len(ids) + 1):
            d = incremental_text(TOK, ids[:n], emitted)
            rest.append(d)
            emitted += len(d)
        assert first + "".join(rest) == "zé🙂!"


def test_a_trailing_invalid_byte_is_released_at_the_end():
    ids = TOK.encode("ok") + [0xFF]
    assert "".join(stream(TOK, ids)) == "ok\ufffd"


def test_a_partial_stop_string_is_held_back():
    ids = TOK.encode("abc\n\nUser:")
    deltas = stream(TOK, ids[:5], stop=("\n\nUser:",))   # "abc\n\n"
    assert deltas[:5] == ["a", "b", "c", "", ""]
    assert incremental_text(TOK, ids[:4], 3, stop=("\n\nUser:",)) == ""
    assert incremental_text(TOK, TOK.encode("abc\nx"), 3, stop=("\n\nUser:",)) == "\nx"


def test_chatml_template_ends_with_the_generation_prompt():
    prompt = TOK.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_tokenizer_renders_jinja_templates_in_a_sandbox():
    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    tok = HFTokenizer(raw, bos_token_id=0, eos_token_ids=[1], chat_template=template, add_bos=True)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<s>[user]hi</s>[assistant]"
    assert tok.encode("<s>")[:1] == [0] and tok.encode("<s>").count(0) == 1   # no second BOS
    bare = HFTokenizer(raw, bos_token_id=0, eos_token_ids=[1])
    assert bare.apply_chat_template(msgs) == chatml(msgs)
    evil = HFTokenizer(raw, bos_token_id=0, eos_token_ids=[1],
                       chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(msgs)
