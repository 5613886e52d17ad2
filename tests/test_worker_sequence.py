"""What a new token means for a request: text to emit, stop strings, stop tokens, length."""
from broker.protocol import SamplingParams
from workers.engine.tokenizer import ByteTokenizer
from workers.sequence import FULL, Sequence

TOK = ByteTokenizer()
EOS = tuple(TOK.eos_token_ids)


def run(text_bytes, max_new=100, **sampling):
    seq = Sequence("r", 1, FULL, [65], SamplingParams(**sampling), max_new)
    deltas = []
    for b in text_bytes:
        deltas.append(seq.accept(b, TOK, EOS))
        if seq.finish_reason:
            break
    return seq, deltas


def test_stop_string_split_across_tokens_never_reaches_the_client():
    seq, deltas = run(b"hello world", stop=["lo w"])
    assert seq.finish_reason == "stop"
    assert "".join(deltas) == "hel" and seq.text == "hel"


def test_multibyte_utf8_is_held_back_then_emitted_once():
    seq, deltas = run("aé€".encode())
    assert "".join(deltas) == "aé€"
    assert deltas[1] == "" and deltas[2] == "é"


def test_stop_token_text_is_not_shown_and_held_text_is_flushed():
    seq, deltas = run([97, 98, EOS[0]], stop=["bx"])
    assert seq.finish_reason == "stop" and "".join(deltas) == "ab"


def test_ignore_eos_keeps_going_and_length_flushes():
    seq, deltas = run([97, EOS[0], 98], max_new=3, ignore_eos=True)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3
    seq, deltas = run(b"xyz", max_new=2, stop=["yq"])
    assert seq.finish_reason == "length" and "".join(deltas) == "xy"


def test_stop_token_ids():
    seq, _ = run(b"abc", stop_token_ids=[98])
    assert seq.finish_reason == "stop" and seq.output_ids == [97, 98] and seq.text == "a"
