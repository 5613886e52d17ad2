"""Sampling and stop decisions: pure functions over tensors and ids."""
import torch

from broker.protocol import SamplingParams
from workers.engine.sampler import sample, stop_reason

V = 50


def logits_row(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, V, generator=torch.Generator().manual_seed(seed))


def draw(logits, params, step=0, history=()):
    return sample(logits, [params], [list(history)], [step])[0]


def test_greedy_is_argmax_per_row():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0.0)
    out = sample(logits, [greedy] * 4, [[]] * 4, [0, 1, 2, 3])
    assert out == logits.argmax(-1).tolist()


def test_same_seed_and_step_give_the_same_token_in_any_batch():
    logits = torch.zeros(1, V)   # uniform: the draw alone decides
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [draw(logits, p, step) for step in range(40)]
    again = [draw(logits, p, step) for step in range(40)]
    assert alone == again
    # The same request in a batch with others, at another row, still draws the same token.
    other = SamplingParams(temperature=1.0, seed=99)
    batched = sample(torch.zeros(2, V), [other, p], [[], []], [7, 5])[1]
    assert batched == alone[5]


def test_different_steps_and_seeds_draw_differently():
    logits = torch.zeros(1, V)
    p = SamplingParams(temperature=1.0, seed=7)
    tokens = [draw(logits, p, step) for step in range(60)]
    assert len(set(tokens)) > 20   # 60 uniform draws over 50 tokens
    q = SamplingParams(temperature=1.0, seed=8)
    assert tokens != [draw(logits, q, step) for step in range(60)]


def test_unseeded_sampling_varies():
    logits = torch.zeros(1, V)
    p = SamplingParams(temperature=1.0)
    assert len({draw(logits, p, 0) for _ in range(30)}) > 5


def test_seeded_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 0.0, -50.0]])   # p ~ 0.88, 0.12, 0
    p = SamplingParams(temperature=1.0, seed=3)
    tokens = [draw(logits, p, step) for step in range(400)]
    assert 2 not in tokens
    assert 300 < tokens.count(0) < 390


def test_top_k_one_and_tiny_top_p_equal_greedy():
    for seed in range(10):
        logits = logits_row(seed)
        best = int(logits.argmax())
        assert draw(logits, SamplingParams(temperature=1.5, top_k=1, seed=seed), seed) == best
        assert draw(logits, SamplingParams(temperature=1.5, top_p=1e-6, seed=seed), seed) == best


def test_top_k_restricts_to_the_k_best():
    logits = logits_row(5)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=3, seed=11)
    assert {draw(logits, p, step) for step in range(100)} <= top3


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    assert draw(logits, SamplingParams()) == 0
    # 3.0 / 1.5 = 2.0 < 2.5: the seen token 0 loses to token 1.
    assert draw(logits, SamplingParams(repetition_penalty=1.5), history=[0, 2]) == 1
    # A negative logit is multiplied, never divided into a boost.
    neg = torch.tensor([[-1.0, -1.2]])
    assert draw(neg, SamplingParams(repetition_penalty=2.0), history=[0]) == 1
    assert torch.equal(logits, torch.tensor([[3.0, 2.5, -1.0, 0.0]]))   # input untouched


def test_stop_on_eos_unless_ignored():
    p = SamplingParams(max_tokens=10)
    assert stop_reason(2, [5, 2], "hi", p, (2,)) == ("stop", None)
    ignoring = SamplingParams(max_tokens=10, ignore_eos=True)
    assert stop_reason(2, [5, 2], "hi", ignoring, (2,)) == (None, None)


def test_stop_token_ids_stop_even_with_ignore_eos():
    p = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    assert stop_reason(7, [7], "", p, (2,)) == ("stop", None)
    assert stop_reason(8, [8], "", p, (2,)) == (None, None)


def test_stop_strings_cut_before_the_earliest_match():
    p = SamplingParams(stop=["END", "\n\n"])
    assert stop_reason(5, [5], "abc\n\nxyzEND", p, (2,)) == ("stop", 3)
    assert stop_reason(5, [5], "abcEN", p, (2,)) == (None, None)
    assert stop_reason(5, [5], "END", p, (2,)) == ("stop", 0)


def test_length_at_max_tokens_and_at_the_context_limit():
    p = SamplingParams(max_tokens=3)
    assert stop_reason(5, [5, 5], "", p, (2,)) == (None, None)
    assert stop_reason(5, [5, 5, 5], "", p, (2,)) == ("length", None)
    roomy = SamplingParams(max_tokens=100)
    assert stop_reason(5, [5, 5], "", roomy, (2,), prompt_len=7, max_seq_len=10) == (None, None)
    assert stop_reason(5, [5, 5, 5], "", roomy, (2,), prompt_len=7, max_seq_len=10) == ("length", None)
    # A stop token on the last allowed step is a stop, not a length.
    assert stop_reason(2, [5, 5, 2], "", p, (2,)) == ("stop", None)
