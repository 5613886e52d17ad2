"""The broker's whole state machine: requests, queues, workers, leases and timers.

This module does no I/O and reads no clock of its own: the server loop hands it decoded messages
and the time (an injected monotonic clock), and sends the messages it returns. Every decision
about a request's lifecycle (docs/architecture.md §2) is made here, so it is tested without sockets.

Invariants kept here: every accepted request gets exactly one final message (``Final`` or
``Error``); tokens reach the client in order with no gap and no duplicate; every KV lease a
context worker holds is released once nobody needs it: by the context worker itself when the
generation worker has pulled it (the transfer tells both sides; ``KvPulled`` tells the broker),
and by ``KvRelease`` from here in every other case (cancel, failure, re-run, lease expiry).

Stream migration: a request whose generating worker dies after tokens reached the client is
continued on another worker (``Generate`` with ``output_ids``: the tokens the client has), at
most ``max_migrations`` times; the continuation samples exactly what the lost worker would have
(greedy, or seeded by (seed, step)), and only tokens past ``next_index`` are forwarded.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import random
import time
from array import array
from collections import deque
from typing import Callable, Optional

from broker import protocol as p
from broker.client_ids import ClientIds, shown_to_client
from broker.config import BrokerConfig, Routing
from broker.metrics import Metrics, state_gauges
from broker.pool import Pool, Queues
from broker.ratelog import RateLimitedLog
from broker.records import (BACK, DECODING, FRONT, GENERATING, KV_READY, PREFILLING,  # noqa: F401
                            QUEUED, RESUMING, STREAMING, Out, Request, Worker)

log = logging.getLogger("broker.state")


class BrokerState:
    def __init__(self, config: BrokerConfig = BrokerConfig(), clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, routing: Routing = Routing()):
        self.cfg = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.requests: dict[str, Request] = {}
        self.ids = ClientIds()     # request ids scoped per client: keys of self.requests
        self.prefill_queue = Queues()   # QUEUED requests, per model, in arrival order
        self.decode_queue = Queues()    # KV_READY and RESUMING requests waiting for a generation worker
        self.workers: dict[bytes, Worker] = {}
        self.pool = Pool(self.workers, routing, self.requests, clock)   # the workers by model, routers
        # Timers as heaps of (time, seq, Request), so that tick() and next_timer(), which run on
        # every turn of the server loop, cost nothing per request in flight. Entries are deleted
        # lazily: one whose request has ended (or whose lease was released or renewed) is skipped
        # when it comes up, and _compact_timers() drops them in bulk when they pile up.
        self._deadlines: list = []     # every request's deadline
        self._leases: list = []        # KV lease deadlines of requests waiting in KV_READY
        self._seq = itertools.count()  # tie-breaker: Requests themselves are not comparable
        self.next_heartbeat = 0.0
        self.instance = f"{self.rng.getrandbits(64):016x}"   # tells clients a restart from a slow spell
        self.counters = {"submitted": 0, "finished": 0, "failed": 0, "cancelled": 0, "rejected": 0,
                         "migrated": 0, "context_skipped": 0,    # conditional disaggregation
                         # every prefill's prompt tokens, and those its worker's prefix cache held
                         "prefill_prompt_tokens": 0, "prefill_cached_tokens": 0}
        self.metrics = Metrics(lambda: state_gauges(self))
        self._refused_log = RateLimitedLog(log, "workers refused", clock=clock)
        self._worker_handlers = {
            p.Heartbeat: self._on_heartbeat, p.Disconnect: self._on_disconnect,
            p.ContextDone: self._on_context_done, p.KvPulled: self._on_kv_pulled,
            p.Tokens: self._on_tokens, p.Finished: self._on_finished, p.Failed: self._on_failed,
            p.KvEvents: self.pool.kv_events,
        }

    # -----------------------------------------------------------------------------------------
    # client side

    def on_client(self, identity: bytes, msg: p.Message) -> list[Out]:
        out: list[Out] = []
        if isinstance(msg, p.Submit):
            self._submit(identity, msg, out)
        elif isinstance(msg, p.Cancel):
            req = self.requests.get(self.ids.key(identity, msg.request_id))
            if req is not None and req.client == identity:
                self._finish(req, out, p.Final(req.request_id, p.Finish.CANCELLED,
                                               req.usage(), req.timings(self.clock())))
                self._outcome("cancelled")
        elif isinstance(msg, p.Ping):
            stats = self.stats()
            if msg.metrics:
                stats["prometheus"] = self.metrics.render()
            out.append(Out(FRONT, identity, p.Pong(msg.nonce, stats)))
        elif isinstance(msg, p.DrainWorker):     # `worker drain --worker-id`: answered with a Pong
            named = [w for w in self.workers.values() if w.worker_id == msg.worker_id]
            for w in named:
                self._drain(w, out, "asked by a client")
            out.append(Out(FRONT, identity, p.Pong(msg.nonce, {"worker_id": msg.worker_id, "draining": len(named)})))
        else:
            out.append(Out(FRONT, identity, p.Error("", p.Code.PROTOCOL,
                                                    f"{type(msg).__name__} is not a client command")))
        if self.prefill_queue or self.decode_queue:
            out.extend(self._dispatch())
        return out

    def _submit(self, identity: bytes, msg: p.Submit, out: list[Out]) -> None:
        rid = msg.request_id

        def reject(code: str, text: str, retryable: bool = False) -> None:
            self._outcome("rejected", code)
            out.append(Out(FRONT, identity, p.Error(rid, code, text, retryable)))

        if self.ids.key(identity, rid) is not None:
            return reject(p.Code.DUPLICATE_REQUEST, f"request id {rid!r} is already in flight")
        model, refusal = self.pool.admit(msg.model, self.cfg.default_model)
        if refusal:
            return reject(*refusal)
        if self.prefill_queue and self.prefill_queue.waiting() >= self.cfg.max_queue:
            return reject(p.Code.OVERLOADED, f"the broker's queue is full ({self.cfg.max_queue} "
                                             "requests waiting); retry later", True)
        sampling = dict(msg.sampling)
        if sampling.get("seed") is None:
            # a fixed seed makes a re-run prefill (after a worker died) give the same tokens,
            # so the client never sees a changed or duplicated token
            sampling["seed"] = self.rng.getrandbits(63)
        now = self.clock()
        timeout = msg.timeout_ms / 1000 if msg.timeout_ms else self.cfg.request_timeout_s
        key = self.ids.add(identity, rid, self.requests)
        req = self.requests[key] = Request(key, identity, msg, sampling, now, now + timeout, client_rid=rid,
                                           model=model)
        heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
        if msg.output_ids:     # a resume: continue after the tokens the client already has
            req.output_ids, req.output_chars = array("I", msg.output_ids), msg.output_chars
            req.next_index, req.state = len(msg.output_ids), RESUMING
        (self.decode_queue if msg.output_ids else self.prefill_queue).append(model, key)
        self.counters["submitted"] += 1
        out.append(Out(FRONT, identity, p.Accepted(rid, self.instance)))

    def client_gone(self, identity: bytes) -> list[Out]:
        """The frontend could not deliver to this client: drop its requests and free their work."""
        out: list[Out] = []
        for req in [r for r in self.requests.values() if r.client == identity]:
            log.info("client of request %s is gone; cancelling it", req.request_id)
            self._outcome("cancelled")
            self._finish(req, out, None)
        return out

    # -----------------------------------------------------------------------------------------
    # worker side

    def on_worker(self, identity: bytes, msg: p.Message) -> list[Out]:
        out: list[Out] = []
        now = self.clock()
        w = self.workers.get(identity)
        if isinstance(msg, p.Ready):
            if w is not None:   # a restarted worker with the same identity: its old work is lost
                self._expire(w, out, "re-registered")
            elif len(self.workers) >= self.cfg.max_workers:   # bounded state (and metric series)
                self._refused_log(logging.WARNING, "refusing worker %s: %d workers are registered "
                                  "(max_workers)", msg.worker_id, len(self.workers))
                return out
            self.pool.changed()
            self.workers[identity] = Worker.from_ready(identity, msg, now)
            log.info("worker %s ready: role=%s model=%s slots=%d kv_blocks=%d transfer=%s",
                     msg.worker_id, msg.role, msg.model, msg.slots, msg.kv_blocks, msg.transfer)
            out.extend(self._dispatch())
            return out
        if w is None:
            if isinstance(msg, p.ContextDone):   # KV held for a worker we forgot: free it
                out.append(Out(BACK, identity, p.KvRelease(msg.request_id, msg.attempt)))
            if not isinstance(msg, p.Disconnect):
                out.append(Out(BACK, identity, p.Reconnect("unknown worker; send Ready")))
            return out
        w.last_seen = now
        handler = self._worker_handlers.get(type(msg))
        if handler is not None:
            handler(w, msg, out)
        if self.prefill_queue or self.decode_queue:
            out.extend(self._dispatch())
        return out

    # one handler per worker message type, looked up by exact type (messages are final classes)

    def _on_heartbeat(self, w: Worker, msg: p.Heartbeat, out: list[Out]) -> None:
        w.free_blocks, w.leases_reported = msg.free_blocks, msg.leases
        w.max_decode_batch = max(w.max_decode_batch, msg.max_decode_batch)
        if msg.draining:
            self._drain(w, out, "it is shutting down")

    def _drain(self, w: Worker, out: list[Out], why: str) -> None:
        """No more work for ``w`` (no credits now); its Drain follows the last work sent to it."""
        if not w.draining:
            w.draining = True
            log.info("worker %s (%s, pid %d) draining (%s): %d running, %d KV leases", w.worker_id,
                     w.role, w.pid, why, len(w.inflight), len(w.leases))
        out.append(Out(BACK, w.identity, p.Drain(why)))

    def _on_disconnect(self, w: Worker, msg: p.Disconnect, out: list[Out]) -> None:
        self._expire(w, out, f"disconnected ({msg.reason})" if msg.reason else "disconnected")

    def _on_kv_pulled(self, w: Worker, msg: p.KvPulled, out: list[Out]) -> None:
        req = self._current(msg.request_id, msg.attempt, w)
        if req is not None and req.state == DECODING:
            req.kv_transfer_s, req.kv_bytes = msg.kv_transfer_s, msg.nbytes
            self.metrics.kv_pulled(msg.kv_transfer_s, msg.nbytes, w.transfer.get("backend"))
            req.state = STREAMING
            # the context worker frees the blocks on its own when the pull completes (its
            # transfer source sees it): no KvRelease on the way that every request takes
            self._forget_lease(req)

    def _on_tokens(self, w: Worker, msg: p.Tokens, out: list[Out]) -> None:
        req = self._current(msg.request_id, msg.attempt, w)
        if req is not None:
            req.prompt_tokens = msg.prompt_tokens or req.prompt_tokens    # a `both` worker's first tokens
            self._relay_tokens(req, msg.index, msg.token_ids, msg.text, out, msg)

    def _on_finished(self, w: Worker, msg: p.Finished, out: list[Out]) -> None:
        req = self._current(msg.request_id, msg.attempt, w)
        if req is not None:
            if msg.prompt_tokens:
                req.prompt_tokens = msg.prompt_tokens
                if req.mode == "agg":     # the prefill ran here (disaggregated: counted at ContextDone)
                    self._count_prefill(req, msg.prompt_tokens, msg.cached_tokens)
            if msg.cached_tokens:
                req.cached_tokens = msg.cached_tokens
            if msg.prefill_s:
                req.prefill_s = msg.prefill_s
            self._outcome("finished")
            self._finish_with_tokens(req, out, msg.finish_reason, msg.index, msg.token_ids, msg.text, msg)

    def _on_failed(self, w: Worker, msg: p.Failed, out: list[Out]) -> None:
        req = self._current(msg.request_id, msg.attempt, w)
        if req is not None:
            self._failed(req, w, msg, out)

    def _current(self, rid: str, attempt: int, w: Worker) -> Optional[Request]:
        """The request if this message belongs to its current dispatch on this worker, else None."""
        req = self.requests.get(rid)
        if req is None or req.attempt != attempt or req.worker != w.identity:
            log.debug("dropping stale message for %s attempt %d from %s", rid, attempt, w.worker_id)
            return None
        return req

    def _on_context_done(self, w: Worker, msg: p.ContextDone, out: list[Out]) -> None:
        req = self._current(msg.request_id, msg.attempt, w)
        if req is None or req.state != PREFILLING:
            out.append(Out(BACK, w.identity, p.KvRelease(msg.request_id, msg.attempt)))
            return
        w.inflight.discard(req.request_id)
        w.leases.add(req.request_id)
        req.ctx_worker, req.lease_attempt = w.identity, msg.attempt
        req.lease_deadline = self.clock() + self.cfg.kv_lease_s
        req.context, req.worker = msg, None
        req.prompt_tokens, req.prefill_s = len(msg.prompt_token_ids), msg.prefill_s
        req.cached_tokens = msg.cached_tokens
        self._count_prefill(req, req.prompt_tokens, msg.cached_tokens)
        if msg.finish_reason is not None:     # the first token ends it: it rides in the Final
            self._outcome("finished")
            self._finish_with_tokens(req, out, msg.finish_reason, 0, [msg.first_token], msg.first_text, msg)
            return
        self._relay_tokens(req, 0, [msg.first_token], msg.first_text, out, msg)
        req.state = KV_READY
        self._watch_lease(req)
        self.decode_queue.append(req.model, req.request_id)

    def _relay_tokens(self, req: Request, index: int, ids: list, text: str, out: list[Out], src: p.Message) -> None:
        if self._take_tokens(req, index, ids):      # src: the worker's message, its logprobs go along
            req.output_chars += len(text)
            out.append(Out(FRONT, req.client, p.Tokens(req.client_rid, index, ids, text,
                                                       prompt_tokens=req.prompt_tokens if index == 0 else 0,
                                                       logprobs=src.logprobs, prompt_logprobs=src.prompt_logprobs)))

    def _take_tokens(self, req: Request, index: int, ids: list) -> bool:
        """Whether these tokens go to the client: the next ones in order (counted here), not a
        repeat of tokens it already has (a re-run phase) and not past a gap."""
        if not ids or index + len(ids) <= req.next_index:
            return False    # nothing, or a re-run phase repeating tokens the client already has
        if index != req.next_index:
            log.error("request %s: token index %d, expected %d; dropping the batch",
                      req.request_id, index, req.next_index)
            return False
        try:
            req.output_ids.fromlist(ids)      # all or nothing
        except (OverflowError, TypeError):
            log.error("request %s: token ids %.80r outside [0, 2**32); dropped", req.request_id, ids)
            return False
        if req.t_first is None:
            req.t_first = self.clock()
            self.metrics.ttft.observe(req.t_first - req.received)
        req.next_index += len(ids)
        return True

    def _finish_with_tokens(self, req: Request, out: list[Out], reason: str, index: int, ids: list,
                            text: str, src: p.Message) -> None:
        """Finish a request whose last tokens (if any are new, with ``src``'s logprobs) ride in its Final."""
        last = (index, ids, text, src.logprobs, src.prompt_logprobs) if self._take_tokens(req, index, ids) else ()
        self._finish(req, out, p.Final(req.request_id, reason, req.usage(), req.timings(self.clock()), *last))

    def _failed(self, req: Request, w: Worker, msg: p.Failed, out: list[Out]) -> None:
        w.inflight.discard(req.request_id)
        req.worker = None
        log.info("request %s failed on %s: %s %s", req.request_id, w.worker_id, msg.code, msg.message)
        if msg.retryable and req.next_index <= 1 and req.prefill_attempts < self.cfg.max_attempts:
            # nothing past the first token reached the client: prefill again from scratch
            req.note = f"{msg.code} on {w.worker_id}: {msg.message}; "
            self._release_lease(req, out)
            self._requeue(req)
            return
        self._outcome("failed", msg.code)
        self._finish(req, out, p.Error(req.request_id, msg.code, msg.message, False))

    # -----------------------------------------------------------------------------------------
    # time

    def tick(self) -> list[Out]:
        """Heartbeats, worker expiry, lease expiry, deadlines, then dispatch."""
        now = self.clock()
        out: list[Out] = []
        for w in list(self.workers.values()):
            if now - w.last_seen > w.heartbeat_s * self.cfg.liveness:
                self._expire(w, out, f"silent for {now - w.last_seen:.1f} s")
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.cfg.heartbeat_interval_s
            out.extend(Out(BACK, w.identity, p.BrokerHeartbeat()) for w in self.workers.values())
        requests = self.requests
        deadlines, leases = self._deadlines, self._leases
        while deadlines and deadlines[0][0] <= now:
            req = heapq.heappop(deadlines)[2]
            if requests.get(req.request_id) is not req:
                continue      # ended already
            self._outcome("failed", p.Code.TIMEOUT)
            self._finish(req, out, p.Error(
                req.request_id, p.Code.TIMEOUT,
                f"request {req.request_id} passed its deadline of "
                f"{req.deadline - req.received:.1f} s in state {req.state}", False))
        while leases and leases[0][0] <= now:
            t, _, req = heapq.heappop(leases)
            if requests.get(req.request_id) is not req or req.lease_deadline != t or req.state != KV_READY:
                continue      # ended, released, or taken by a generation worker (re-armed if it comes back)
            log.warning("request %s: KV lease expired before a generation worker took it; "
                        "prefilling again", req.request_id)
            self._release_lease(req, out)
            self._requeue(req)
        if len(deadlines) + len(leases) > 2 * len(requests) + 1024:
            self._compact_timers()
        if self.prefill_queue or self.decode_queue:
            out.extend(self._dispatch())
        return out

    def next_timer(self) -> float:
        """Seconds until tick() has something to do (the server loop's poll timeout)."""
        now = self.clock()
        times = [self.next_heartbeat]
        times.extend(w.last_seen + w.heartbeat_s * self.cfg.liveness for w in self.workers.values())
        # a stale entry on top only wakes the loop early, and tick() then drops it
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._leases:
            times.append(self._leases[0][0])
        return max(0.0, min(times) - now)

    def _watch_lease(self, req: Request) -> None:
        """Arm the lease timer of a request entering KV_READY (tick() requeues it on expiry)."""
        if req.lease_deadline is not None:
            heapq.heappush(self._leases, (req.lease_deadline, next(self._seq), req))

    def _compact_timers(self) -> None:
        live = self.requests
        self._deadlines = [e for e in self._deadlines if live.get(e[2].request_id) is e[2]]
        self._leases = [e for e in self._leases
                        if live.get(e[2].request_id) is e[2] and e[2].lease_deadline == e[0]]
        heapq.heapify(self._deadlines)
        heapq.heapify(self._leases)

    def _expire(self, w: Worker, out: list[Out], why: str) -> None:
        graceful = why.startswith("disconnected") and not w.inflight
        (log.info if graceful else log.warning)("worker %s (%s, pid %d) expired: %s", w.worker_id, w.role, w.pid, why)
        del self.workers[w.identity]
        self.pool.changed()
        self.metrics.expirations.inc((("role", w.role),))
        for rid in sorted(w.leases):
            req = self.requests.get(rid)
            if req is None or req.ctx_worker != w.identity:
                continue
            req.ctx_worker, req.lease_deadline = None, None
            if req.state in (KV_READY, DECODING):   # the KV is gone with the worker: prefill again
                req.note = f"context worker {w.worker_id} holding its KV stopped answering; "
                gen = self.workers.get(req.worker) if req.worker is not None else None
                if gen is not None:   # a pull from a dead worker can only fail, at its timeout
                    gen.inflight.discard(rid)
                    out.append(Out(BACK, gen.identity, p.CancelWork(rid, req.attempt)))
                self._requeue(req)
        for rid in sorted(w.inflight):
            req = self.requests.get(rid)
            if req is None or req.worker != w.identity:
                continue
            req.worker = None
            if req.state == PREFILLING and req.prefill_attempts < self.cfg.max_attempts:
                req.note = f"context worker {w.worker_id} (pid {w.pid}) stopped answering ({why}); "
                self._requeue(req)
            elif req.state == DECODING and req.ctx_worker in self.workers \
                    and req.decode_tries < self.cfg.max_attempts:
                req.state = KV_READY        # died before the pull: another generation worker
                self._watch_lease(req)
                self.decode_queue.appendleft(req.model, rid)
            elif not self._migrate(req, w, why, out):
                text = (f"{w.role} worker {w.worker_id} (pid {w.pid}) stopped answering ({why}) "
                        f"while running request {rid} in state {req.state}")
                if req.next_index and req.migrations >= self.cfg.max_migrations:
                    text += (f"; a stream moves at most broker.max_migrations="
                             f"{self.cfg.max_migrations} times and this one moved {req.migrations}")
                self._outcome("failed", p.Code.WORKER_DIED)
                self._finish(req, out, p.Error(rid, p.Code.WORKER_DIED, text, False))

    def _migrate(self, req: Request, w: Worker, why: str, out: list[Out]) -> bool:
        """Continue a request whose generating worker was lost on another worker, after the
        tokens the client has (a `both` worker's before its first token: from scratch); False
        when it cannot (not generating, no worker to take it, limits reached)."""
        if req.state not in (DECODING, STREAMING, GENERATING):
            return False
        req.note = f"{w.role} worker {w.worker_id} (pid {w.pid}) stopped answering ({why}); "
        if req.next_index == 0:
            if req.prefill_attempts < self.cfg.max_attempts:
                self._requeue(req)
            return req.state == QUEUED
        if req.migrations >= self.cfg.max_migrations or not self.pool.roles(req.model) & {"generation", "both"}:
            return False
        req.migrations += 1
        self.counters["migrated"] += 1
        self.metrics.migrations += 1
        log.info("request %s: %scontinuing it after token %d (move %d)", req.request_id, req.note,
                 req.next_index, req.migrations)
        self._release_lease(req, out)      # DECODING: a lease not pulled is of no use any more
        req.state = RESUMING
        self.decode_queue.appendleft(req.model, req.request_id)
        return True

    # -----------------------------------------------------------------------------------------
    # dispatch

    def _dispatch(self) -> list[Out]:
        """Each model's queues in order, until that model has no free worker (broker/pool.py)."""
        out: list[Out] = []
        for queues, dispatch in ((self.prefill_queue, self._dispatch_prefills),
                                 (self.decode_queue, self._dispatch_decodes)):
            for model, q in list(queues.items()) if queues else ():
                dispatch(model, q, out)
                if not q:
                    del queues[model]
        return out

    def _dispatch_prefills(self, model: str, q: deque, out: list[Out]) -> None:
        pool = self.pool      # the workers stay as they are while this runs
        role = pool.prefill_role(model)
        while q:
            req = self.requests.get(q[0])
            if req is None or req.state != QUEUED:
                q.popleft()
                continue
            if role is None:
                q.popleft()
                self._outcome("failed", p.Code.NO_WORKERS)
                self._finish(req, out, p.Error(req.request_id, p.Code.NO_WORKERS,
                                               req.note + pool.no_worker_text(model), True))
                continue
            g = pool.local_prefill(req) if role == "context" else None
            w = g or pool.pick(role, model, req)
            if w is None:
                return
            q.popleft()
            self.counters["context_skipped"] += g is not None
            self._send_prefill(req, w, role == "context" and g is None, out)

    def _dispatch_decodes(self, model: str, q: deque, out: list[Out]) -> None:
        decodable = "generation" in self.pool.roles(model)
        while q:
            rid = q[0]
            req = self.requests.get(rid)
            if req is not None and req.state == RESUMING:
                if not self._resume(req, q, out):
                    return
                continue
            if req is None or req.state != KV_READY:
                q.popleft()
                continue
            if not decodable:
                q.popleft()
                self._outcome("failed", p.Code.NO_WORKERS)
                self._finish(req, out, p.Error(rid, p.Code.NO_WORKERS, f"no generation worker of model "
                                               f"{model!r} is up to decode this request", True))
                continue
            w = self.pool.pick("generation", model, req)
            if w is None:
                return
            q.popleft()
            c = req.context
            req.decode_tries += 1
            self._dispatched(req, w, DECODING)
            out.append(Out(BACK, w.identity, p.Decode(rid, req.attempt, c.prompt_token_ids, c.first_token,
                                                      c.first_text, c.kv_handle, req.sampling,
                                                      *self.pool.text_of(req))))

    def _resume(self, req: Request, q: deque, out: list[Out]) -> bool:
        """Dispatch a RESUMING request at the head of its decode queue to a worker of its model
        that prefills its prompt and output so far itself and goes on decoding; False to wait."""
        roles = self.pool.roles(req.model)
        role = "generation" if "generation" in roles else "both" if "both" in roles else None
        w = self.pool.pick(role, req.model, req) if role else None
        if w is None and role:
            return False
        q.popleft()
        if w is None:
            self._outcome("failed", p.Code.NO_WORKERS)
            self._finish(req, out, p.Error(req.request_id, p.Code.NO_WORKERS, req.note + "no generation "
                                           f"or 'both' worker of model {req.model!r} is up to continue it", True))
            return True
        self._dispatched(req, w, GENERATING)
        s, c = req.submit, req.context     # the context phase tokenised the prompt: use its ids
        prompt, ids, messages = (None, c.prompt_token_ids, None) if c else (s.prompt, s.token_ids, s.messages)
        out.append(Out(BACK, w.identity, p.Generate(req.request_id, req.attempt, prompt, ids, messages,
                                                    req.sampling, req.output_ids, req.output_chars)))
        return True

    def _dispatched(self, req: Request, w: Worker, state: str) -> None:
        req.attempt += 1
        req.state, req.worker = state, w.identity
        w.inflight.add(req.request_id)
        if req.t_dispatch is None:
            req.t_dispatch = self.clock()
            self.metrics.queue.observe(req.t_dispatch - req.received)

    def _send_prefill(self, req: Request, w: Worker, disagg: bool, out: list[Out]) -> None:
        s = req.submit
        req.prefill_attempts += 1
        req.mode = "disagg" if disagg else "agg"
        self._dispatched(req, w, PREFILLING if disagg else GENERATING)
        if disagg:
            lease_ms = int(self.cfg.kv_lease_s * 1000)
            msg = p.Prefill(req.request_id, req.attempt, s.prompt, s.token_ids, s.messages, req.sampling, lease_ms)
        else:
            msg = p.Generate(req.request_id, req.attempt, s.prompt, s.token_ids, s.messages, req.sampling)
        out.append(Out(BACK, w.identity, msg))

    def _requeue(self, req: Request) -> None:
        req.state, req.worker, req.context = QUEUED, None, None
        req.decode_tries = 0
        self.prefill_queue.appendleft(req.model, req.request_id)

    # -----------------------------------------------------------------------------------------
    # endings

    def _release_lease(self, req: Request, out: list[Out]) -> None:
        """Tell the context worker holding this request's KV to free it."""
        if req.ctx_worker is None:
            return
        w = self.workers.get(req.ctx_worker)
        if w is not None:
            out.append(Out(BACK, w.identity, p.KvRelease(req.request_id, req.lease_attempt)))
        self._forget_lease(req)

    def _forget_lease(self, req: Request) -> None:
        """Drop the broker's record of this request's KV lease."""
        if req.ctx_worker is None:
            return
        w = self.workers.get(req.ctx_worker)
        if w is not None:
            w.leases.discard(req.request_id)
        req.ctx_worker, req.lease_deadline = None, None

    def _finish(self, req: Request, out: list[Out], final: Optional[p.Message]) -> None:
        """The one exit of a request: final message to the client, work cancelled, KV released."""
        self.requests.pop(req.request_id, None)
        self.ids.drop(req.client, req.client_rid)
        if req.worker is not None:
            w = self.workers.get(req.worker)
            if w is not None:
                w.inflight.discard(req.request_id)
                if not isinstance(final, p.Final) or final.finish_reason == p.Finish.CANCELLED \
                        or req.state in (PREFILLING, DECODING):
                    out.append(Out(BACK, w.identity, p.CancelWork(req.request_id, req.attempt)))
            req.worker = None
        self._release_lease(req, out)
        if final is not None:
            out.append(Out(FRONT, req.client, shown_to_client(final, req.client_rid)))
        if isinstance(final, p.Final) and final.finish_reason != p.Finish.CANCELLED:
            self.metrics.finished(self.clock(), req.received, req.t_first, req.next_index)

    def _count_prefill(self, req: Request, prompt_tokens: int, cached_tokens: int) -> None:
        self.counters["prefill_prompt_tokens"] += prompt_tokens
        self.counters["prefill_cached_tokens"] += cached_tokens
        self.pool.index.observe(req, prompt_tokens)

    def _outcome(self, outcome: str, code: Optional[str] = None) -> None:
        self.counters[outcome] += 1
        self.metrics.outcome(outcome, code)

    def stats(self) -> dict:
        return {"instance": self.instance, "requests": len(self.requests), "queued": self.prefill_queue.waiting(),
                "waiting_decode": self.decode_queue.waiting(), "counters": dict(self.counters),
                "workers": [w.summary() for w in self.workers.values()],
                "default_model": self.pool.resolve(None, self.cfg.default_model)}   # a request naming none
