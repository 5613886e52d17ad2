"""A request as a worker sees it: its tokens, blocks, sampling state and emitted text.

Pure bookkeeping, no I/O and no model calls: the worker loop (``workers/worker.py``) owns the
sockets and the engine; this module decides what a new token means (text to emit, stop or go).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from broker.protocol import Finish, SamplingParams
from workers.engine.tokenizer import Tokenizer, incremental_text

CONTEXT, DECODE, FULL = "context", "decode", "full"   # what the worker does with the request


@dataclass
class Sequence:
    request_id: str
    attempt: int
    kind: str
    prompt_ids: list
    params: SamplingParams
    max_new: int                      # max_tokens clipped to the context and the KV reservation
    output_ids: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    num_cached: int = 0               # tokens of prefill_ids whose KV is in the blocks
    cached_tokens: int = 0            # of those, the ones the prefix cache supplied
    emitted_chars: int = 0
    text: str = ""                    # text emitted so far (after stop-string cuts)
    finish_reason: Optional[str] = None
    kv_handle: Optional[dict] = None  # DECODE: where to pull the prompt's KV from
    lease_ms: int = 30000
    t_prefill_start: float = 0.0
    prefill_s: float = 0.0
    bad_ids: tuple = ()               # params.bad_words as token id sequences (the scheduler's)
    prompt_logprobs: Optional[list] = None   # wire entries per prompt token, as prefill scores them
    prompt_text: Optional[tuple] = None   # (text, chat) of a text prompt: its keys (broker/kv_keys.py)

    @property
    def key(self) -> str:
        """Unique per dispatch: used as the transfer and pull id."""
        return f"{self.request_id}#{self.attempt}"

    @property
    def prefill_ids(self) -> list:
        """What prefill runs through the model: the prompt, and for a continuation (output tokens
        given up front) every output token but the last, which the first decode step reads."""
        return self.prompt_ids + self.output_ids[:-1] if self.output_ids else self.prompt_ids

    def continue_after(self, output_ids: list, emitted_chars: int, tok: Tokenizer, eos_ids) -> None:
        """Take tokens generated elsewhere (a continuation) as if sampled here, ``emitted_chars``
        of their text already emitted (what was held back, for a possible stop string or an
        incomplete character, is emitted with what follows): one decode, so a long stream moves
        in one step of the loop. Sets ``finish_reason`` if the tokens had ended the request
        already (a stop token, or ``max_new``); a stop string inside them is not looked for."""
        text = tok.decode(output_ids)
        if not 0 <= emitted_chars <= len(text):
            raise ValueError(f"invalid output_chars={emitted_chars}: the {len(output_ids)} output "
                             f"tokens decode to {len(text)} characters")
        self.output_ids = list(output_ids)
        self.text, self.emitted_chars = text[:emitted_chars], emitted_chars
        stops = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(eos_ids))
        if any(t in stops for t in output_ids):
            self.finish_reason = Finish.STOP
        elif len(output_ids) >= self.max_new:
            self.finish_reason = Finish.LENGTH

    def banned(self) -> list:
        """The tokens the next step must not sample (TensorRT-LLM's bad words): the last token of
        each bad word whose other tokens end the sequence so far (prompt and output)."""
        out, k = [], len(self.output_ids)
        for *before, last in self.bad_ids:
            n = len(before)
            if n and (self.output_ids[-n:] if k >= n else self.prompt_ids[k - n:] + self.output_ids) != before:
                continue
            out.append(last)
        return out

    @property
    def scores_prompt(self) -> bool:
        """Its prefill scores each prompt token (``params.prompt_logprobs``): a fresh prompt only,
        all of it computed (no prefix-cache hit), every position's logits kept."""
        return self.params.prompt_logprobs is not None and not self.output_ids

    @property
    def reserve_tokens(self) -> int:
        """Tokens of KV this request may ever hold here (reserved at admission: no mid-decode OOM)."""
        if self.kind == CONTEXT:
            return len(self.prompt_ids)
        return len(self.prompt_ids) + self.max_new

    def accept(self, token: int, tok: Tokenizer, eos_ids) -> str:
        """Append a sampled token; returns the text to emit for it and sets finish_reason if done.

        Text that may still change (an incomplete UTF-8 sequence, a possible stop-string start) is
        held back until the next token or the end; at the end everything left is released.
        """
        self.output_ids.append(token)
        p = self.params
        stoppable = len(self.output_ids) >= p.min_tokens     # before min_tokens only length stops it
        if stoppable and ((token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            # a stop token: its own text is never shown, what was held back is
            self.finish_reason = Finish.STOP
            return self._emit(incremental_text(tok, self.output_ids[:-1], self.emitted_chars, final=True))
        if p.stop and stoppable:
            full = tok.decode(self.output_ids)
            start = max(0, len(self.text) - max(len(s) for s in p.stop) + 1)
            hits = [i for i in (full.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                self.finish_reason = Finish.STOP
                return self._emit(full[self.emitted_chars:max(self.emitted_chars, min(hits))])
        if len(self.output_ids) >= self.max_new:
            self.finish_reason = Finish.LENGTH
            return self._emit(incremental_text(tok, self.output_ids, self.emitted_chars, final=True))
        return self._emit(incremental_text(tok, self.output_ids, self.emitted_chars, stop=p.stop))

    def _emit(self, delta: str) -> str:
        self.emitted_chars += len(delta)
        self.text += delta
        return delta
