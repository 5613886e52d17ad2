"""The FAKE transfer backend: in-process only, for tests. Same contract as the real backends.

Sources live in a module-level table keyed by endpoint ``fake://N``; a sink copies with torch
from the source's pool into its own when its ``poll()`` finds the pull due. Failure injection:
set ``sink.delay_s`` (a pull finishes no earlier than that after it started, so a deadline can
pass first) or ``sink.fail_with`` (a TransferError, or a message, that every pull fails with).
No threads and no sockets: everything happens inside ``poll()``.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .base import (KvLayout, KvSink, KvSource, PullResult, Registration, Registrations,
                   TransferError, TransferTimeout, check_pull, copy_tokens, make_handle,
                   pool_bytes, token_view)
from .config import CacheTransceiverConfig
from .plan import buffer_blocks, plan_rounds

BACKEND = "FAKE"
_sources: dict = {}          # endpoint -> FakeSource
_ids = itertools.count(1)


class FakeSource(KvSource):
    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout) -> None:
        self.layout = layout
        self.pool = pool_bytes(pool, layout, BACKEND)
        self._regs = Registrations(layout, self.pool.shape[0], cfg.timeout_s)
        self.endpoint = f"fake://{next(_ids)}"
        _sources[self.endpoint] = self

    def register(self, transfer_id: str, block_ids: list, num_tokens: int) -> dict:
        reg = self._regs.add(transfer_id, block_ids, num_tokens)
        return make_handle(BACKEND, self.endpoint, transfer_id, reg.block_ids, num_tokens, self.layout,
                           self.worker_id)

    def release(self, transfer_id: str) -> None:
        self._regs.pop(transfer_id, None)

    def poll(self) -> list:
        return [event for event, _ in self._regs.sweep()]

    @property
    def num_registered(self) -> int:
        return len(self._regs)

    def close(self) -> None:
        self._regs.clear()
        _sources.pop(self.endpoint, None)

    def _serve(self, transfer_id: str) -> Registration:
        """A pull request: starts the transfer's clock; raises if it cannot be served."""
        reg = self._regs.get(transfer_id)
        if reg is None or self._regs.expired(reg, time.monotonic()):
            raise TransferError(f"the context worker at {self.endpoint} no longer holds the KV "
                                f"for transfer {transfer_id!r} (released, expired, already "
                                "pulled or never registered)")
        if reg.started is None:
            reg.started = time.monotonic()
        return reg


@dataclass
class _Pull:
    pull_id: str
    handle: object
    dst_ids: list
    started: float


class FakeSink(KvSink):
    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout) -> None:
        self.layout = layout
        self.pool = pool_bytes(pool, layout, BACKEND)
        self._cfg = cfg
        self._pulls: dict = {}
        self._failed: list = []
        self.delay_s: float = 0.0
        self.fail_with: Union[TransferError, str, None] = None
        self.rounds_done = 0                    # rounds copied, for tests of chunking

    def start_pull(self, pull_id: str, handle: dict, dest_block_ids: list) -> None:
        h, dst = check_pull(pull_id, handle, dest_block_ids, BACKEND, self.layout,
                            self.pool.shape[0], self._pulls, worker_id=self.worker_id)
        pull = _Pull(pull_id, h, dst, time.monotonic())
        self._pulls[pull_id] = pull
        try:
            self._source(pull)._serve(h.transfer_id)
        except TransferError as exc:            # reported by poll(), like a remote answer
            del self._pulls[pull_id]
            self._failed.append(PullResult(pull_id, False, exc, 0, 0.0))

    def poll(self) -> list:
        out, self._failed = self._failed, []
        now = time.monotonic()
        for pull in list(self._pulls.values()):
            error, nbytes = None, 0
            if now - pull.started < self.delay_s:
                if now - pull.started < self._cfg.timeout_s:
                    continue
                error = TransferTimeout(
                    f"KV transfer timed out: pull {pull.pull_id!r} of transfer "
                    f"{pull.handle.transfer_id!r} did not finish within kv_transfer_timeout_ms="
                    f"{round(self._cfg.timeout_s * 1000)}")
            elif self.fail_with is not None:
                error = (self.fail_with if isinstance(self.fail_with, TransferError)
                         else TransferError(str(self.fail_with)))
            else:
                try:
                    nbytes = self._copy(pull)
                except TransferError as exc:
                    error = exc
            del self._pulls[pull.pull_id]
            out.append(PullResult(pull.pull_id, error is None, error, nbytes,
                                  time.monotonic() - pull.started))
        return out

    def cancel(self, pull_id: str) -> None:
        self._pulls.pop(pull_id, None)

    @property
    def num_active(self) -> int:
        return len(self._pulls)

    def close(self) -> None:
        self._pulls.clear()
        self._failed.clear()

    def _source(self, pull: _Pull) -> FakeSource:
        source = _sources.get(pull.handle.endpoint)
        if source is None:
            raise TransferError(f"no context worker at {pull.handle.endpoint}")
        return source

    def _copy(self, pull: _Pull) -> int:
        source, h = self._source(pull), pull.handle
        reg = source._serve(h.transfer_id)
        src_layout = source.layout
        staged = src_layout.block_size != self.layout.block_size
        per_round = buffer_blocks(self._cfg.buffer_tokens(self.layout.block_size),
                                  src_layout.block_size)
        nbytes = 0
        for rnd in plan_rounds(h.block_ids, None if staged else pull.dst_ids, per_round):
            if staged:
                t0 = rnd.first * src_layout.block_size
                t1 = min((rnd.first + rnd.count) * src_layout.block_size, h.num_tokens)
                copy_tokens(token_view(self.pool, self.layout), pull.dst_ids,
                            token_view(source.pool, src_layout), h.block_ids.__getitem__,
                            t0, t1, src_layout.block_size, self.layout.block_size)
            else:
                for seg in rnd.segments:
                    self.pool[seg.dst:seg.dst + seg.n] = source.pool[seg.src:seg.src + seg.n]
            nbytes += rnd.count * src_layout.block_nbytes
            self.rounds_done += 1
        reg.pulled = True
        return nbytes


def make_source(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                host: str = "127.0.0.1", advertise: Optional[str] = None) -> KvSource:
    return FakeSource(cfg, pool, layout)


def make_sink(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout) -> KvSink:
    return FakeSink(cfg, pool, layout)
