"""Choosing the next token from logits (when a sequence is finished: ``workers/sequence.py``).

Pure: plain torch on tensors it is given, no I/O, no model. Seeded sampling draws from a
generator seeded by (seed, step) alone, never by batch position or worker, so a seeded request
gives the same tokens whether its steps run on one worker or are split between a context and a
generation worker, and whichever requests share its batch.

Rows are sampled together, in float32, each with its own settings as [rows, 1] tensors; every
operation is row-wise, so a row's token never depends on the other rows. Filters, in HF's and
vLLM's order: temperature, top-k, top-p, min-p. A filter keeps every token tied with the least
likely token it keeps (so ties never depend on sort order). Nothing sorts the vocabulary: a
row keeps only the candidates above a probability threshold that provably contains its top-p
set (see ``_sample_rows``), and sorts those few; exact up to float rounding (a top_p within
~1e-6 of 1 could, in principle, round the guarantee away).

Log-probabilities (``SamplingParams.logprobs``, ``token_logprobs``) are of the model's own
distribution: the log-softmax of the logits the token was sampled from, before the penalties,
the logit bias, min_tokens and temperature (vLLM's default, ``raw_logprobs``), so they do not
depend on how the token was chosen. Only rows that ask pay for them, in one batched pass.
"""
from __future__ import annotations

import secrets
from typing import Optional, Sequence

import torch

from broker.protocol import MIN_LOGPROB, SamplingParams

_MASK64 = (1 << 64) - 1
# The first, tight candidate threshold is this many times the guaranteed one; rows whose
# candidates above it do not reach top_p (about 1 in 30 at temperature 1.0 / top_p 0.95 on
# SmolLM2, none at 0.8) retry with the guaranteed threshold. Measured, not critical.
_TIGHT = 16.0
_BLOCK = 256           # the draw's CDF is over blocks of this many tokens, then inside one


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """A well-mixed generator seed for output token ``step`` of a request seeded ``seed``."""
    return _splitmix64(_splitmix64(seed) ^ step) >> 1   # torch seeds must fit in 63 bits here


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> None:
    """CTRL/HF style, in place: a seen token's positive logit is divided, a negative multiplied."""
    if penalty == 1.0 or not history:
        return
    ids = torch.tensor(sorted({t for t in history if 0 <= t < logits.shape[-1]}), dtype=torch.long,
                       device=logits.device)
    if ids.numel() == 0:
        return
    seen = logits[ids]
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def _adjust_row(row: torch.Tensor, p: SamplingParams, history: Sequence[int], step: int,
                eos_ids: Sequence[int]) -> None:
    """vLLM's order, in place: the repetition penalty (prompt and output), OpenAI's presence and
    frequency penalties (output only: the last ``step`` ids of ``history``), the logit bias, then
    min_tokens, which bans EOS (unless ignored) and the stop tokens while ``step`` is below it."""
    vocab = row.shape[-1]
    apply_repetition_penalty(row, history, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and step:
        ids, counts = torch.unique(torch.tensor(list(history[-step:]), dtype=torch.long), return_counts=True)
        ok = ids < vocab
        ids, counts = ids[ok].to(row.device), counts[ok].to(row.device, torch.float32)
        row[ids] -= p.presence_penalty + p.frequency_penalty * counts
    if p.logit_bias:
        pairs = [(t, b) for t, b in p.logit_bias if t < vocab]
        if pairs:
            ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=row.device)
            row[ids] += torch.tensor([b for _, b in pairs], dtype=row.dtype, device=row.device)
    if step < p.min_tokens:
        banned = [t for t in (*(() if p.ignore_eos else eos_ids), *p.stop_token_ids) if 0 <= t < vocab]
        if banned:
            row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")


def _needs_adjusting(p: SamplingParams, history: Sequence[int], step: int) -> bool:
    return bool((p.uses_history and history) or p.logit_bias or step < p.min_tokens)


def _uniform(p: SamplingParams, step: int) -> float:
    """The one uniform number a row's draw uses, from a generator seeded by (seed, step) alone."""
    seed = p.seed if p.seed is not None else secrets.randbits(63)
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _column(values: list, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).unsqueeze(1)


def _last_positive(w: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(w.shape[-1], device=w.device)
    return torch.where(w > 0, cols, 0).amax(-1)


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row over non-negative ``weights`` [R, K] (in vocabulary order) with
    one uniform number per row; returns column indices [R].

    One uniform per step (rather than torch.multinomial's internals) keeps the draw stable under
    tiny logit differences, such as batched versus single-sequence decoding. The CDF is taken in
    two levels, over blocks of ``_BLOCK`` and then inside the chosen block, so a whole vocabulary
    costs one summing pass instead of a float64 running sum (zero padding changes nothing).
    """
    r, k = weights.shape
    w = torch.nn.functional.pad(weights, (0, -k % _BLOCK)).view(r, -1, _BLOCK)
    sums = w.sum(-1)
    cdf = torch.cumsum(sums, dim=-1, dtype=torch.float64)
    target = (u * cdf[:, -1]).unsqueeze(1)
    block = torch.searchsorted(cdf, target, right=True).squeeze(1)
    block = torch.minimum(block, _last_positive(sums))           # never past the last kept token
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    inside = w[torch.arange(r, device=w.device), block]
    cdf_in = torch.cumsum(inside, dim=-1, dtype=torch.float64) + before.unsqueeze(1)
    idx = torch.searchsorted(cdf_in, target, right=True).squeeze(1)
    return block * _BLOCK + torch.minimum(idx, _last_positive(inside))


def _candidates(e: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and vocabulary ids [R, K] of the entries of ``e`` >= ``thr`` (per row), in
    vocabulary order, zero-padded to the longest row."""
    rows, cols = torch.nonzero(e >= thr, as_tuple=True)
    counts = torch.bincount(rows, minlength=e.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=e.device) - starts[rows]
    width = max(int(counts.max()), 1)
    w = torch.zeros(e.shape[0], width, dtype=e.dtype, device=e.device)
    ids = torch.zeros(e.shape[0], width, dtype=torch.long, device=e.device)
    w[rows, pos] = e[rows, cols]
    ids[rows, pos] = cols
    return w, ids


def _top_p_cut(w: torch.Tensor, top_p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least likely weight top-p keeps per row [R, 1] (as before: a token is kept while the
    mass ahead of it is below top_p), and whether the candidates ``w`` reach top_p at all."""
    s = torch.sort(w, dim=-1, descending=True).values
    cum = torch.cumsum(s, dim=-1, dtype=torch.float64)
    need = top_p.double() * z
    kept = ((cum - s) < need).sum(-1, keepdim=True)           # a prefix, never empty
    return s.gather(1, kept - 1), cum[:, -1:] >= need


def _filtered(e: torch.Tensor, z: torch.Tensor, top_p: torch.Tensor, floor: torch.Tensor,
              thr: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [R] drawn from the candidates of ``e`` >= max(thr, floor) after top-p and min-p
    (``floor``), and per row whether those candidates held the top-p set (else the token is
    meaningless and the row must retry with a lower ``thr``)."""
    w, ids = _candidates(e, torch.maximum(thr, floor))
    cut, reached = _top_p_cut(w, top_p, z)
    keep = torch.maximum(torch.where(top_p < 1, cut, 0.0), floor)   # min-p: relative to weight 1
    w = torch.where(w >= keep, w, 0.0)
    tokens = ids.gather(1, _draw(w, u).unsqueeze(1)).squeeze(1)
    return tokens, (reached | (top_p >= 1)).squeeze(1)


def _sample_rows(x: torch.Tensor, params: Sequence[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Token ids [R] for rows ``x`` [R, V] with temperature > 0."""
    vocab = x.shape[-1]
    inv_temp = _column([1.0 / p.temperature for p in params], x)
    e = (x - x.amax(-1, keepdim=True)).mul_(inv_temp).exp_()   # the most likely token weighs 1
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        k_th = [torch.topk(row, k).values[-1:] if k else row.new_full((1,), float("-inf"))
                for row, k in zip(x, top_k)]
        e.masked_fill_(x < torch.stack(k_th), 0.0)
    filtered = [p.top_p < 1 or p.min_p > 0 or k for p, k in zip(params, top_k)]
    if not any(filtered):
        return _draw(e, u)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    plain = [i for i, f in enumerate(filtered) if not f]
    if plain:
        out[plain] = _draw(e[plain], u[plain])
    rows = [i for i, f in enumerate(filtered) if f]
    if plain:
        e, u, params = e[rows], u[rows], [params[i] for i in rows]
    top_p = _column([p.top_p for p in params], e)
    min_p = _column([p.min_p for p in params], e)
    z = e.sum(-1, keepdim=True).double()      # float32 cascade sum: accurate, and no copy
    # Every token below (1 - top_p) * z / V weighs less than 1 - top_p of the mass together, so
    # the mass ahead of the first of them already reaches top_p: none is kept (half for rounding).
    # A first, tighter threshold usually holds the top-p set too, with far fewer candidates.
    sure = ((1 - top_p.double()) * z / (2 * vocab)).float()
    floor = torch.maximum(min_p, torch.full_like(min_p, torch.finfo(e.dtype).tiny))
    tokens, reached = _filtered(e, z, top_p, floor, sure * (2 * _TIGHT), u)
    short = torch.nonzero(~reached).flatten()
    if short.numel():                                        # retry with the guaranteed threshold
        tokens[short] = _filtered(e[short], z[short], top_p[short], floor[short], sure[short],
                                  u[short])[0]
    out[rows] = tokens
    return out


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           histories: Sequence[Sequence[int]], steps: Sequence[int],
           eos_ids: Sequence[int] = ()) -> list[int]:
    """One token per row of ``logits`` [B, V].

    ``histories[i]`` is prompt + output ids so far (for the penalties; may be empty where
    ``params[i].uses_history`` is false); ``steps[i]`` is the index of the token being chosen in
    the output (0 for the first token); ``eos_ids`` are what min_tokens bans.
    """
    if not (logits.shape[0] == len(params) == len(histories) == len(steps)):
        raise ValueError(f"sample: {logits.shape[0]} rows of logits but {len(params)} params, "
                         f"{len(histories)} histories, {len(steps)} steps")
    x = logits.float()
    adjusted = [i for i, p in enumerate(params) if _needs_adjusting(p, histories[i], steps[i])]
    if adjusted:
        x = x.clone() if x is logits else x
        for i in adjusted:
            _adjust_row(x[i], params[i], histories[i], steps[i], eos_ids)
    out = torch.empty(x.shape[0], dtype=torch.long)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        out[greedy] = torch.argmax(x if len(greedy) == len(params) else x[greedy], dim=-1).cpu()
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    if rows:
        u = torch.tensor([_uniform(params[i], steps[i]) for i in rows], dtype=torch.float64,
                         device=x.device)
        mine = x if len(rows) == len(params) else x[rows]
        out[rows] = _sample_rows(mine, [params[i] for i in rows], u).cpu()
    return out.tolist()


def ban_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits`` [B, V] with row i unable to give the tokens in ``banned[i]`` (bad words), for
    ``sample``; a copy (the model's logits may be inference tensors). Ids outside the vocabulary
    are ignored."""
    vocab = logits.shape[-1]
    pairs = [(i, t) for i, ids in enumerate(banned) for t in ids if 0 <= t < vocab]
    if not pairs:
        return logits
    at = torch.tensor(pairs, dtype=torch.long, device=logits.device).T
    return logits.index_put((at[0], at[1]), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def token_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], tokens: Sequence[int]
                   ) -> Optional[list]:
    """For each row of ``logits`` [B, V] whose ``params[i].logprobs`` is set, the log-probability
    of ``tokens[i]`` and the ``params[i].logprobs`` most likely (token id, log-probability)
    pairs, most likely first: ``(logprob, [(id, logprob), ...])``; None for the other rows.
    None at once, with no work, when no row asks. -inf and NaN become ``MIN_LOGPROB``."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    x = logits if len(rows) == len(params) else logits[rows]
    picked = _logprobs(x, [tokens[i] for i in rows], [params[i].logprobs for i in rows])
    out: list = [None] * len(params)
    for j, i in enumerate(rows):
        out[i] = picked[j]
    return out


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list:
    """``token_logprobs``'s entries for a prefill: row ``i`` of ``logits`` [N, V] (the position
    before ``targets[i]``) scores ``targets[i]``, with ``k`` alternatives each."""
    return _logprobs(logits[:len(targets)], targets, [k] * len(targets)) if len(targets) else []


def _logprobs(x: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list:
    """The log-softmax at the picked and the top tokens only: each row's log-sum-exp is one pass
    over the vocabulary, and no [rows, vocab] tensor of log-probabilities is written."""
    x = x.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    picked = torch.tensor(list(tokens), dtype=torch.long, device=x.device).unsqueeze(1)
    chosen = _bounded(x.gather(1, picked) - lse).squeeze(1).tolist()
    k = min(max(ks), x.shape[-1])
    top_v, top_i = torch.topk(x, k, dim=-1) if k else (x[:, :0], x[:, :0].long())
    top_v, top_i = _bounded(top_v - lse).tolist(), top_i.tolist()
    return [(chosen[j], list(zip(top_i[j][:n], top_v[j][:n]))) for j, n in enumerate(ks)]


def _bounded(lp: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(lp, nan=MIN_LOGPROB, neginf=MIN_LOGPROB).clamp_(MIN_LOGPROB, 0.0)
