"""Sampling: pure functions over tensors and ids (stop decisions: tests/test_worker_sequence.py)."""
import torch

from broker.protocol import SamplingParams
from workers.engine.sampler import _TIGHT, _draw, sample

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


# --- the batched sampler against a straightforward reference -----------------------------------

def reference_support(row: torch.Tensor, p: SamplingParams) -> set:
    """Tokens the filters keep, computed the plain way: a full sort in float64."""
    probs = torch.softmax(row.double() / p.temperature, -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if 0 < p.top_k < row.numel():
        keep &= row >= torch.topk(row, p.top_k).values[-1]
        probs = torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum()
    if p.top_p < 1:
        s = torch.sort(probs, descending=True).values
        cut = s[int(((torch.cumsum(s, 0) - s) < p.top_p).sum()) - 1]
        keep &= probs >= cut
    keep &= probs >= p.min_p * probs.max()
    return set(torch.nonzero(keep).flatten().tolist())


def draws(row: torch.Tensor, p: SamplingParams, n: int) -> set:
    rows = row.expand(n, -1)
    ps = [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                         seed=s) for s in range(n)]
    return set(sample(rows, ps, [[]] * n, [0] * n))


def test_min_p_keeps_tokens_at_least_min_p_of_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.12, 0.07, 0.11]]))
    p = SamplingParams(temperature=1.0, min_p=0.2)   # keeps p >= 0.1
    assert draws(logits[0], p, 400) == {0, 1, 2, 4}   # never 3
    assert draws(logits[0], SamplingParams(temperature=1.0, min_p=1.0), 50) == {0}


def test_filters_keep_the_reference_support_on_small_vocabularies():
    gen = torch.Generator().manual_seed(0)
    cases = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.3, top_k=5),
             SamplingParams(temperature=1.0, top_k=8, top_p=0.7),
             SamplingParams(temperature=0.7, top_p=0.95, min_p=0.05),
             SamplingParams(temperature=2.0, min_p=0.3)]
    for trial in range(6):
        row = torch.randn(V, generator=gen) * (1 + trial)
        for p in cases:
            support = reference_support(row, p)
            drawn = draws(row, p, 600)
            assert drawn <= support, (p, drawn - support)
            # Every kept token that is not rare is drawn at least once.
            probs = torch.softmax(row.double() / p.temperature, -1)
            assert {t for t in support if probs[t] / probs[list(support)].sum() > 0.02} <= drawn, p


def test_a_seeded_row_draws_the_same_token_alone_and_in_a_batch_of_64():
    gen = torch.Generator().manual_seed(4)
    vocab = 49152
    logits = torch.randn(64, vocab, generator=gen) * 4
    kinds = [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.0),
             SamplingParams(), SamplingParams(temperature=0.7, top_k=40, min_p=0.05),
             SamplingParams(temperature=1.2, top_p=0.5, repetition_penalty=1.3)]
    params = [SamplingParams(**{**kinds[i % 5].to_dict(), "seed": 1000 + i}) for i in range(64)]
    histories = [[i, i + 1, 7] for i in range(64)]
    steps = [i % 9 for i in range(64)]
    batched = sample(logits, params, histories, steps)
    alone = [sample(logits[i:i + 1], [params[i]], [histories[i]], [steps[i]])[0] for i in range(64)]
    assert batched == alone
    assert batched[::-1] == sample(logits.flip(0), params[::-1], histories[::-1], steps[::-1])


def test_rows_whose_tight_candidates_miss_top_p_fall_back_exactly():
    # 100 likely tokens hold 0.85, 3996 unlikely ones the rest: the candidates above the tight
    # threshold hold less than top_p, so the guaranteed threshold decides, and the kept set must
    # still be the reference's (the likely ones and the best of the unlikely ones).
    vocab = 4096
    noise = torch.rand(vocab, generator=torch.Generator().manual_seed(2)) * 0.5
    row = torch.cat([torch.full((100,), 5.0), torch.zeros(vocab - 100)]) + noise
    p = SamplingParams(temperature=1.0, top_p=0.9)
    probs = torch.softmax(row.double(), -1)
    assert probs[probs >= _TIGHT * (1 - p.top_p) / vocab].sum() < p.top_p   # the tight tier misses
    support = reference_support(row, p)
    assert 400 < len(support) < vocab - 1000
    drawn = draws(row, p, 3000)
    assert drawn <= support and len(drawn - set(range(100))) > 100
    dropped = set(range(vocab)) - support
    assert dropped == set(torch.topk(row, len(dropped), largest=False).indices.tolist())


def test_the_two_level_draw_is_the_plain_inverse_cdf():
    gen = torch.Generator().manual_seed(9)
    w = torch.rand(200, 3000, generator=gen) ** 8           # not a multiple of the block
    w[:, 2900:] = 0                                          # and a kept set ending early
    w[:5, 300:] = 0
    u = torch.rand(200, generator=gen, dtype=torch.float64)
    u[:3] = torch.tensor([0.0, 1.0 - 1e-12, 0.5])
    cdf = torch.cumsum(w.double(), -1)
    want = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    want = torch.minimum(want, torch.tensor([int(torch.nonzero(r).max()) for r in w]))
    assert torch.equal(_draw(w, u), want)


def test_presence_and_frequency_penalties_act_on_the_output_only():
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 9] = 2.0, 1.5
    prompt, out = [9, 9, 9], [7, 7]
    # a prompt token is not penalized by OpenAI's penalties: 9 stays below 7 ...
    assert draw(logits, SamplingParams(presence_penalty=2.0), step=0, history=prompt) == 7
    # ... but 7 in the output: 2.0 - 0.3 presence - 2 x 0.2 frequency = 1.3 < 1.5
    p = SamplingParams(presence_penalty=0.3, frequency_penalty=0.2)
    assert draw(logits, p, step=2, history=prompt + out) == 9
    assert draw(logits, SamplingParams(presence_penalty=0.3), step=2, history=prompt + out) == 7
    before = logits.clone()
    draw(logits, p, step=2, history=prompt + out)
    assert torch.equal(logits, before)                 # the caller's logits are never changed


def test_logit_bias_moves_the_choice_and_ignores_ids_past_the_vocabulary():
    logits = logits_row(3)
    worst = int(logits.argmin())
    assert draw(logits, SamplingParams(logit_bias={str(worst): 100, V + 5: -100})) == worst
    best = int(logits.argmax())
    assert draw(logits, SamplingParams(logit_bias=[[best, -100]])) != best


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4], logits[0, 5] = 9.0, 8.0, 1.0      # 3 is EOS, 4 a stop token
    p = SamplingParams(min_tokens=2, stop_token_ids=[4])
    tokens = [sample(logits, [p], [[]], [step], eos_ids=[3])[0] for step in range(3)]
    assert tokens == [5, 5, 3]
    # ignore_eos leaves EOS to the logits (it is not a stop then), the stop token stays banned
    p = SamplingParams(min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    assert sample(logits, [p], [[]], [0], eos_ids=[3]) == [3]
