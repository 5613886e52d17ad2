"""Routers: which worker of a role takes a request's phase, by TensorRT-LLM's router names
(``context_servers.router`` and ``generation_servers.router`` of ``disagg_config.yaml``;
docs/architecture.md §2, Routing).

* ``round_robin``: the workers of the role in turn (one that is full is passed over).
* ``load_balancing``: the fewest active requests (with ``use_tokens``: the fewest prompt tokens
  in flight).
* ``kv_cache_aware``: the highest ``matched / prefix - active / max_batch_size``: the share of
  the request's prefix keys the worker's cache holds (KV events, ``broker/kv_index.py``), less
  the share of its batch in use. TensorRT-LLM's ``KvCacheAwareRouter`` scores so; Dynamo's KV
  router weighs the blocks left to prefill against the blocks decoding the same way. A request
  shorter than one key scores on load alone.

With ``load_balancing`` and ``kv_cache_aware``, a worker with no free KV block (every one held
by running requests or leases: a request sent there would wait) comes last, and equal scores go
to the most free slots (then, for ``load_balancing``, the most free KV blocks), then round robin. A router only ever sees workers with a free slot. Pure: no I/O, no clock.
"""
from __future__ import annotations

from typing import Callable, Optional

from broker.config import RouterSettings
from broker.kv_index import KvIndex
from broker.records import Request, Worker


class Router:
    name = ""
    uses_kv = False        # reads the workers' published KV keys

    def __init__(self, settings: RouterSettings, index: KvIndex,
                 requests: Callable[[str], Optional[Request]]):
        self.settings, self.index, self.requests = settings, index, requests
        self.turn = 0      # round robin over ties

    def pick(self, workers: list[Worker], req: Optional[Request]) -> Optional[Worker]:
        """The worker, among these of one role and model in registration order, that takes
        ``req`` (None: a continuation or other work with no request to score), or None when
        none has a free slot."""
        free = [w for w in workers if w.credits > 0]
        if len(free) <= 1:
            return free[0] if free else None
        scores = [self.score(w, req) for w in free]
        best = max(scores)
        tied = [w for w, s in zip(free, scores) if s == best]
        w = tied[self.turn % len(tied)]
        self.turn += 1
        return w

    def score(self, w: Worker, req: Optional[Request]):
        raise NotImplementedError


class RoundRobin(Router):
    name = "round_robin"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.last: Optional[bytes] = None

    def pick(self, workers: list[Worker], req: Optional[Request]) -> Optional[Worker]:
        # the next worker after the last one picked, in registration order, that has a slot
        n = len(workers)
        start = next((i + 1 for i, w in enumerate(workers) if w.identity == self.last), 0)
        for i in range(n):
            w = workers[(start + i) % n]
            if w.credits > 0:
                self.last = w.identity
                return w
        return None


class LoadBalancing(Router):
    name = "load_balancing"

    def load(self, w: Worker) -> int:
        if not self.settings.use_tokens:
            return len(w.inflight)
        total = 0
        for rid in w.inflight:
            req = self.requests(rid)
            if req is not None:
                total += self.index.prompt_tokens(req)
        return total

    def score(self, w: Worker, req: Optional[Request]):
        return (w.free_blocks > 0, -self.load(w), w.credits, w.free_blocks)


class KvCacheAware(Router):
    name = "kv_cache_aware"
    uses_kv = True

    def score(self, w: Worker, req: Optional[Request]):
        batch = self.settings.max_batch_size or w.slots
        load = len(w.inflight) / batch
        if req is None or not w.kv_keys:
            return (w.free_blocks > 0, -load, w.credits)
        matched, total = self.index.matched_keys(w, req)
        return (w.free_blocks > 0, (matched / total if total else 0.0) - load, w.credits)


ROUTERS = {r.name: r for r in (RoundRobin, LoadBalancing, KvCacheAware)}


def make_router(settings: RouterSettings, index: KvIndex,
                requests: Callable[[str], Optional[Request]]) -> Router:
    return ROUTERS[settings.type](settings, index, requests)
