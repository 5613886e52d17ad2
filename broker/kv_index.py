"""What the broker knows of the workers' prefix caches: each worker's published block keys (KV
events, ``protocol.KvEvents``), each request's own prefix keys, and how much of a request a
worker holds (docs/architecture.md §2, Routing).

A worker's keys live on its record (``Worker.kv_keys``), so they go when it goes; at most
``max_keys`` per worker are kept (a few per KV block it has: its token keys and the text keys
tied to them), so a worker that publishes junk cannot grow the broker. A request's keys are
computed once, when a router first asks, and only then (``broker/kv_keys.py``): token keys
straight from the packed ids of a token prompt (with the block size the worker announced),
text keys for a text or chat prompt. A text prompt's length in tokens is estimated from its
characters with the model's characters per token, learned from the prompts its workers
tokenized. Pure: no I/O, no clock.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from broker import protocol as p
from broker.kv_keys import (MAX_REQUEST_KEYS, TEXT_CHUNK, chat_chars, packed_block_hashes, prompt_text,
                            text_keys)
from broker.ratelog import RateLimitedLog
from broker.records import Request, Worker

log = logging.getLogger("broker.kv_index")

KEYS_PER_BLOCK = 4          # a worker keeps at most this many keys per KV block it has ...
MIN_KEYS, MAX_KEYS = 4096, 1 << 20    # ... and at least MIN_KEYS, at most MAX_KEYS
CHARS_PER_TOKEN = 4.0       # a text prompt's estimate before its model's workers told us better


def max_keys(w: Worker) -> int:
    return min(MAX_KEYS, max(MIN_KEYS, KEYS_PER_BLOCK * w.kv_blocks))


class KvIndex:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.chars_per_token: dict[str, float] = {}     # model -> learned from its prompts
        self._full_log = RateLimitedLog(log, "KV key sets full", clock=clock)

    # -----------------------------------------------------------------------------------------
    # the workers' side

    def apply(self, w: Worker, msg: p.KvEvents) -> None:
        """A worker's KV events: its key set now (bounded: keys past ``max_keys`` are dropped,
        which only makes routing miss them)."""
        keys = w.kv_keys
        if msg.clear:
            keys.clear()
        for k in msg.keys("removed"):
            keys.discard(k)
        room = max_keys(w) - len(keys)
        stored = msg.keys("stored")
        if len(stored) > room:
            self._full_log(logging.WARNING, "worker %s published more KV keys than the %d kept; "
                           "dropping %d", w.worker_id, max_keys(w), len(stored) - max(room, 0))
            stored = stored[:max(room, 0)]
        keys.update(stored)

    # -----------------------------------------------------------------------------------------
    # the requests' side

    def keys(self, req: Request, block_size: int) -> list:
        """The request's prefix keys for a worker of this block size (text keys for a text
        prompt, whatever the block size)."""
        cache = req.keys
        if cache is None:
            cache = req.keys = {}
        s = req.submit
        size = block_size if s.token_ids is not None else 0
        keys = cache.get(size)
        if keys is None:
            if s.token_ids is not None:
                keys = packed_block_hashes(s.token_ids.packed, block_size, MAX_REQUEST_KEYS) \
                    if block_size > 0 else []
            else:
                text, chat = prompt_text(s.prompt, s.messages)
                keys = text_keys(text, chat)
            cache[size] = keys
        return keys

    def matched_keys(self, w: Worker, req: Request) -> tuple[int, int]:
        """(keys of the request's prefix that ``w`` holds, the request's keys)."""
        keys = self.keys(req, w.block_size)
        held, n = w.kv_keys, 0
        if held:
            for k in keys:
                if k not in held:
                    break
                n += 1
        return n, len(keys)

    def _text_chars(self, req: Request) -> Optional[int]:
        s = req.submit
        if s.token_ids is not None:
            return None
        if s.prompt is not None:
            return len(s.prompt)
        return chat_chars(s.messages)

    def prompt_tokens(self, req: Request) -> int:
        """The request's prompt length in tokens: exact for token ids, else estimated."""
        chars = self._text_chars(req)
        if chars is None:
            return len(req.submit.token_ids)
        return round(chars / self.chars_per_token.get(req.model, CHARS_PER_TOKEN))

    def matched_tokens(self, w: Worker, req: Request) -> int:
        """About how many of the request's prompt tokens ``w``'s prefix cache holds."""
        n, _ = self.matched_keys(w, req)
        if not n:
            return 0
        if req.submit.token_ids is not None:
            return n * w.block_size
        return round(n * TEXT_CHUNK / self.chars_per_token.get(req.model, CHARS_PER_TOKEN))

    def observe(self, req: Request, prompt_tokens: int) -> None:
        """A worker tokenized the request's prompt: learn its model's characters per token."""
        chars = self._text_chars(req)
        if chars is None or prompt_tokens <= 0:
            return
        x = chars / prompt_tokens
        old = self.chars_per_token.get(req.model)
        if old is None and len(self.chars_per_token) >= 1024:
            return        # bounded: one entry per model seen
        self.chars_per_token[req.model] = x if old is None else 0.9 * old + 0.1 * x
