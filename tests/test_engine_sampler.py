"""Sampling: pure functions over tensors and ids (stop decisions: tests/test_worker_sequence.py)."""
import torch

from broker.protocol import SamplingParams
from workers.engine.sampler import sample

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
