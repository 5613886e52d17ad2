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


# The stop rules (moved here with the code: ``Sequence.accept`` is the one place that decides).

def test_stop_on_eos_unless_ignored():
    seq, _ = run([104, EOS[0]], max_new=10)
    assert seq.finish_reason == "stop" and seq.text == "h"
    seq, _ = run([104, EOS[0]], max_new=10, ignore_eos=True)
    assert seq.finish_reason is None


def test_stop_token_ids_stop_even_with_ignore_eos():
    seq, _ = run([7], stop_token_ids=[7], ignore_eos=True)
    assert seq.finish_reason == "stop"
    seq, _ = run([8], stop_token_ids=[7], ignore_eos=True)
    assert seq.finish_reason is None


def test_stop_strings_cut_before_the_earliest_match():
    seq, _ = run(b"abc\n\nxyzEND", stop=["END", "\n\n"])
    assert seq.finish_reason == "stop" and seq.text == "abc"
    seq, _ = run(b"abcEN", stop=["END", "\n\n"])
    assert seq.finish_reason is None
    seq, _ = run(b"END", stop=["END", "\n\n"])
    assert seq.finish_reason == "stop" and seq.text == ""


def test_length_at_max_new_and_a_stop_token_on_the_last_step_is_a_stop():
    seq, _ = run(b"ee", max_new=3)
    assert seq.finish_reason is None
    seq, _ = run(b"eee", max_new=3)
    assert seq.finish_reason == "length"
    seq, _ = run([101, 101, EOS[0]], max_new=3)
    assert seq.finish_reason == "stop"


def test_min_tokens_lets_nothing_but_length_stop_the_request_before_it():
    # vLLM's rule: stop strings and stop tokens count only once the output holds min_tokens
    seq, deltas = run(b"ab xyz", stop=["ab"], min_tokens=3)
    assert seq.finish_reason is None and "".join(deltas).startswith("ab x")
    seq, _ = run([104, 105, 7, 8], stop_token_ids=[7], min_tokens=3)
    assert seq.finish_reason == "stop" and seq.output_ids == [104, 105, 7]
    seq, _ = run([104, 7], stop_token_ids=[7], min_tokens=3)
    assert seq.finish_reason is None
    seq, _ = run(b"abcdef", max_new=2, min_tokens=5)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 2
