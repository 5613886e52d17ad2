"""The OpenAI gateway's choices: several of them for one prompt (``n``, ``best_of``), the
prompt echoed before one (``echo``), and log-probabilities in OpenAI's two shapes.

``n`` and ``best_of`` fan out: each choice is a request of its own, with the same prompt, so the
worker's prefix cache (on by default) serves the prompt's full KV blocks to every choice after the
first one prefilled. A seeded request's choice ``i`` samples with a seed derived from ``seed``
and ``i`` (choice 0 with ``seed`` itself, so ``n=1`` samples as before); an unseeded one leaves
each to the broker's own random seed. ``best_of`` runs that many and returns the ``n`` with the
highest cumulative log-probability (of the model's distribution: ``SamplingParams.logprobs``).
Usage counts the prompt once and sums the returned choices' completion tokens.

Pure: no I/O; it reads ``client.Completion`` and ``broker.protocol.Logprobs`` objects by their
attributes only.
"""
from __future__ import annotations

import codecs
from typing import Optional

from .openai_models import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

_GOLDEN = 0x9E3779B97F4A7C15      # spreads the derived seeds over the whole range


def choice_seeds(seed: Optional[int], runs: int) -> list[Optional[int]]:
    """The seed of each of ``runs`` choices: ``seed`` for the first, derived ones after it."""
    if seed is None:
        return [None] * runs
    return [(seed + i * _GOLDEN) % 2**63 for i in range(runs)]


def cumulative_logprob(logprobs: Optional[list]) -> float:
    return sum(lp.token.logprob for lp in logprobs or ())


def best_of(completions: list, n: int) -> list:
    """The ``n`` completions with the highest cumulative log-probability, likeliest first."""
    order = sorted(range(len(completions)), key=lambda i: -cumulative_logprob(completions[i].logprobs))
    return [completions[i] for i in order[:n]]


def total_usage(completions: list) -> dict:
    """The prompt counted once (its cached tokens as the first choice saw them), the choices'
    completion tokens summed."""
    first = completions[0].usage if completions else {}
    return {"prompt_tokens": first.get("prompt_tokens", 0), "cached_tokens": first.get("cached_tokens", 0),
            "completion_tokens": sum(int(c.usage.get("completion_tokens") or 0) for c in completions)}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class ChoiceLogprobs:
    """Renders one choice's log-probabilities, chunk after chunk, in the chat shape
    (``logprobs.content``) or the completions one (tokens, token_logprobs, top_logprobs,
    text_offset). ``echo``: the prompt text before the answer; the offsets count it."""

    def __init__(self, chat: bool, echo: str = "") -> None:
        self.chat, self.echo = chat, echo
        self.offset = len(echo)          # characters of the choice's text before the next token
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def render(self, logprobs: Optional[list], prompt: Optional[list] = None):
        """The ``logprobs`` of a choice (or a chunk) for these tokens' entries, after the prompt's
        (completions with echo: ``Completion.prompt_logprobs``); None for none."""
        if logprobs is None and prompt is None:
            return None
        if self.chat:
            return ChatLogprobs(content=[TokenLogprob(
                token=_text(lp.token.text), logprob=lp.token.logprob, bytes=list(lp.token.text),
                top_logprobs=[TopLogprob(token=_text(t.text), logprob=t.logprob, bytes=list(t.text))
                              for t in lp.top]) for lp in logprobs or ()])
        out = CompletionLogprobs()
        if prompt is not None:
            self.offset = 0
            self._add(out, prompt, first=True)
            self.offset, self._utf8 = len(self.echo), codecs.getincrementaldecoder("utf-8")("replace")
        self._add(out, logprobs or ())
        return out

    def _add(self, out: CompletionLogprobs, logprobs, first: bool = False) -> None:
        for i, lp in enumerate(logprobs):
            out.tokens.append(_text(lp.token.text))
            out.text_offset.append(self.offset)
            self.offset += len(self._utf8.decode(lp.token.text))     # a character counts once complete
            if first and i == 0:                 # the prompt's first token: nothing to score it by
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(lp.token.logprob)
            top: dict = {}
            for t in (*lp.top, lp.token):    # OpenAI: the sampled one too; two tokens of one text
                top.setdefault(_text(t.text), t.logprob)     # (parts of characters) show the likelier
            out.top_logprobs.append(top)
