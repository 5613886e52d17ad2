"""Choosing the next token from logits (when a sequence is finished: ``workers/sequence.py``).

Pure: plain torch on tensors it is given, no I/O, no model. Seeded sampling draws from a
generator seeded by (seed, step) alone, never by batch position or worker, so a seeded request
gives the same tokens whether its steps run on one worker or are split between a context and a
generation worker, and whichever requests share its batch.
"""
from __future__ import annotations

import secrets
from typing import Sequence

import torch

from broker.protocol import SamplingParams

_MASK64 = (1 << 64) - 1


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
    ids = torch.tensor(sorted({t for t in history if 0 <= t < logits.shape[-1]}), dtype=torch.long)
    if ids.numel() == 0:
        return
    seen = logits[ids]
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; returns float64 probabilities in vocabulary order."""
    scaled = logits.double() / p.temperature
    vocab = scaled.shape[-1]
    if 0 < p.top_k < vocab:
        keep = torch.topk(scaled, p.top_k).indices
        masked = torch.full_like(scaled, float("-inf"))
        masked[keep] = scaled[keep]
        scaled = masked
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs   # mass ahead of each token
        drop = order[before >= p.top_p]                               # the first is always kept
        probs[drop] = 0.0
    return probs


def _draw(probs: torch.Tensor, seed: int) -> int:
    """Inverse-CDF draw in vocabulary order with one uniform number from a seeded generator.

    One uniform per step (rather than torch.multinomial's internals) keeps the draw stable under
    tiny logit differences, such as batched versus single-sequence decoding.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand((), generator=gen, dtype=torch.float64)
    cdf = torch.cumsum(probs, dim=-1)
    idx = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    nonzero = torch.nonzero(probs).flatten()
    return min(idx, int(nonzero[-1]))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           histories: Sequence[Sequence[int]], steps: Sequence[int]) -> list[int]:
    """One token per row of ``logits`` [B, V].

    ``histories[i]`` is prompt + output ids so far (for the repetition penalty); ``steps[i]`` is
    the index of the token being chosen in the output (0 for the first token).
    """
    if not (logits.shape[0] == len(params) == len(histories) == len(steps)):
        raise ValueError(f"sample: {logits.shape[0]} rows of logits but {len(params)} params, "
                         f"{len(histories)} histories, {len(steps)} steps")
    out = []
    for row, p, history, step in zip(logits, params, histories, steps):
        row = row.float().clone()
        apply_repetition_penalty(row, history, p.repetition_penalty)
        if p.temperature == 0:
            out.append(int(torch.argmax(row)))
            continue
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        out.append(_draw(_filtered_probs(row, p), step_seed(seed, step)))
    return out
