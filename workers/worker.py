"""The worker process: one engine loop that talks to the broker and runs its role.

Roles: ``context`` (prefill, first token, hold the KV blocks until released or expired),
``generation`` (pull the KV, decode with continuous batching, stream tokens), ``both`` (the
whole request: aggregated serving). Heartbeats are sent from this loop, between engine steps, so
a wedged engine goes silent and the broker expires it. Long prefills run in chunks of
``max_num_tokens`` so heartbeats and decode steps interleave with them.

This module is the I/O layer only: every lifecycle decision (admission, chunking, batching,
stops, cancels, leases, liveness timers) is made in ``workers/scheduler.py``; here broker
messages become scheduler calls, and its decisions become engine steps, transfer calls and
messages to the broker.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket as pysocket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Optional

import torch
import zmq

from broker import protocol as p
from broker.auth import PEERS, CurveClient, CurveServer, warn_exposed
from broker.config import log_not_supported
from broker.protocol import Code
from broker.ratelog import RateLimitedLog
from transfer.base import KvLayout, TransferError, TransferTimeout
from transfer.registry import create_sink, create_source, resolve_backend
from workers.engine.kv_cache import KVCache, pool_blocks
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner
from workers.engine.sampler import ban_tokens, prompt_logprobs, sample, token_logprobs
from workers.options import WorkerOptions
from workers.scheduler import Scheduler

log = logging.getLogger("worker")

ROLES = ("context", "generation", "both")


OFF_LOOP_CHARS = 16_384     # texts at least this long are encoded off the loop thread


class HeartbeatingTokenizer:
    """The model's tokenizer, encoding a long text in a helper thread while the loop thread goes
    on heartbeating (``heartbeat()`` every few milliseconds), so tokenising megabytes never
    silences the worker past its liveness window. The ``tokenizers`` library releases the GIL
    while it encodes (``HFTokenizer.encode`` makes sure of it for long texts)."""

    def __init__(self, tok, heartbeat) -> None:
        self._tok, self._heartbeat = tok, heartbeat
        self._pool: Optional[ThreadPoolExecutor] = None

    def encode(self, text: str) -> list:
        if len(text) < OFF_LOOP_CHARS:
            return self._tok.encode(text)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        job = self._pool.submit(self._tok.encode, text)
        while True:
            try:
                return job.result(timeout=0.05)
            except FuturesTimeout:
                self._heartbeat()

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


class Worker:
    def __init__(self, role: str, broker: str, model: str = "smollm2-135m",
                 options: WorkerOptions = WorkerOptions(), worker_id: Optional[str] = None,
                 host: str = "127.0.0.1", exit_with_parent: bool = False,
                 curve: Optional[CurveClient] = None, peers: Optional[frozenset] = None,
                 served_model_name: Optional[str] = None, advertise_host: Optional[str] = None,
                 drain_timeout: float = 60.0):
        """``host``: the address its KV transfer endpoints listen on; ``advertise_host``: the one
        they advertise (default: ``host``; see broker/addresses.py). ``curve``:
        its key pair and the broker's public key; ``peers``: the public keys of the generation
        workers its KV channel admits (context workers with ``curve``). ``served_model_name``: the
        model name it announces (requests are routed by it), instead of its ``model`` spec.
        ``drain_timeout``: seconds a drain (``drain()``) may take before the worker leaves anyway."""
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
        if served_model_name is not None and not 0 < len(served_model_name) <= p.MAX_ID_CHARS:
            raise ValueError(f"invalid --served-model-name={served_model_name[:80]!r}: expected 1-"
                             f"{p.MAX_ID_CHARS} characters")
        if not drain_timeout > 0:     # checked before the model loads (and compiles)
            raise ValueError(f"invalid --drain-timeout={drain_timeout!r}: expected seconds > 0")
        if curve is not None and role == "context" and not peers:
            raise ValueError("a context worker with --curve-key needs --curve-peers: the public keys "
                             "of the generation workers its KV channel admits")
        self.curve = curve
        self.role, self.broker_addr, self.opts = role, broker, options
        self.model_name = served_model_name or model
        self.worker_id = worker_id or f"{role}-{pysocket.gethostname()}-{os.getpid()}"
        self.parent = os.getppid() if exit_with_parent else None
        torch.set_num_threads(options.num_threads)
        self.model, self.tok = load_model(model, dtype=options.dtype, quantization=options.quantization,
                                          device=options.device)
        self.precision = self.model.precision
        self.chat_markers = [m for m in self.tok.chat_markers() if len(m) <= p.MAX_MARKER_CHARS][:p.MAX_CHAT_MARKERS]
        cfg = self.model.cfg
        self.max_seq_len = min(options.max_seq_len or cfg.max_position, cfg.max_position)
        # kv_cache_config.dtype; auto: the dtype the model computes in
        kv_dtype = (self.precision.torch_dtype if options.kv_dtype == "auto"
                    else getattr(torch, options.kv_dtype))
        num_blocks = pool_blocks(cfg, options.tokens_per_block, kv_dtype, self.precision.device,
                                 options.kv_max_tokens, options.kv_gpu_fraction)
        if options.kv_gpu_fraction is not None and self.precision.device == "cpu":
            log.warning("kv_cache_config.free_gpu_memory_fraction=%s does not apply on the CPU: the KV "
                        "pool holds kv_cache_config.max_tokens tokens", options.kv_gpu_fraction)
        self.kv = KVCache(cfg, num_blocks, options.tokens_per_block, kv_dtype,
                          device=self.precision.device, block_reuse=options.block_reuse)
        self.runner = self._runner(options)
        layout = KvLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                          str(self.kv.pool.dtype).replace("torch.", ""), options.tokens_per_block)
        self.source = self.sink = None
        self.transfer_info: dict = {}
        transfer_calls: dict = {}    # what the scheduler calls before it frees the blocks involved
        if role != "both":
            backend = resolve_backend(options.cache_transceiver.backend)   # logs a DEFAULT fallback once
            ctc = dataclasses.replace(options.cache_transceiver, backend=backend)
            if role == "context":
                server = CurveServer(curve.pair, {PEERS: peers}) if curve is not None else None
                self.source = create_source(ctc, self.kv.pool, layout, host=host, worker_id=self.worker_id,
                                            curve=server, advertise=advertise_host)
                if curve is None:
                    warn_exposed([self.source.bound or self.source.endpoint], "CURVE on the KV transfer channel",
                                 "give workers --curve-key, --curve-server-key and --curve-peers")
                self.transfer_info = {"backend": backend, "endpoint": self.source.endpoint}
                transfer_calls = dict(register=self.source.register, release=self.source.release)
            else:
                self.sink = create_sink(ctc, self.kv.pool, layout, worker_id=self.worker_id, host=host,
                                        curve=curve.pair if curve is not None else None,
                                        advertise=advertise_host)
                self.transfer_info = {"backend": backend}
                transfer_calls = dict(cancel_pull=self.sink.cancel)
        self.sched = Scheduler(role, self.worker_id, self.kv.allocator, self.kv.block_size,
                               HeartbeatingTokenizer(self.tok, lambda: self._heartbeat_if_due()),
                               cfg.vocab_size, self.max_seq_len, options.max_batch_size,
                               options.max_num_tokens, options.heartbeat_ms, options.broker_timeout_ms,
                               clock=time.monotonic, **transfer_calls)
        self.ctx = zmq.Context()
        self.sock: Optional[zmq.Socket] = None
        self.refusals = None        # broker.auth.Refusals of the socket, with CURVE
        self.stop_event = threading.Event()
        self.failure: Optional[str] = None    # why the worker left service, if it had to
        self._bad_log = RateLimitedLog(log, "malformed messages from the broker")
        self._reconnected_at = -float("inf")
        self._reconnect_gap = options.heartbeat_ms / 1000   # at most one reconnect per interval
        self.discovery = None      # a broker.discovery.WorkerLink: where the broker is now (etcd)
        # draining (SIGTERM, `worker drain`): no new work, finish what is held, then leave
        self.drain_timeout = drain_timeout
        self._drain_asked: Optional[str] = None    # why, once asked (set from a signal handler)
        self.drain_acked = False     # the broker's Drain came: nothing new will be dispatched here
        self.drain_deadline = float("inf")

    def _runner(self, options: WorkerOptions) -> ModelRunner:
        """The model runner; with ``torch_compile_config`` its decode step compiled and run once at
        each warm-up batch size here, before the worker registers, so no request waits for a
        compile and no compile outlasts a heartbeat interval of a registered worker."""
        tc = options.torch_compile
        if tc is not None and self.role == "context":
            log_not_supported(options.source, "torch_compile_config",
                              "a context worker only prefills; the compiled step is the decode step", log)
            tc = None
        if tc is None:
            return ModelRunner(self.model, self.kv)
        from workers.engine import compiled
        runner = ModelRunner(self.model, self.kv, compile_decode=True, fullgraph=tc.fullgraph)
        sizes = tc.batch_sizes or compiled.default_batch_sizes(options.max_batch_size)
        log.info("torch_compile_config: compiling the decode step for batch sizes %s before "
                 "registering (30 s to minutes on a small CPU)", ", ".join(map(str, sizes)))
        took = compiled.warm_up(runner, self.kv.allocator, sizes, lambda line: log.info("%s", line))
        log.info("compiled decode step ready in %.1f s", took)
        return runner

    # -----------------------------------------------------------------------------------------
    # connection

    def _connect(self) -> None:
        if self.refusals is not None:         # why the broker stayed silent, if it refused us
            why = self.refusals.explain(self.broker_addr)
            if why:
                log.error("%s", why)
            self.refusals.close()
            self.refusals = None
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)   # a larger one drops the broker
        if self.curve is not None:
            self.curve.apply(self.sock)
        self.sock.connect(self.broker_addr)
        if self.curve is not None:
            self.refusals = self.curve.refusals(self.sock)
        self.sched.heard_from_broker()
        self.sched.outbox.clear()    # nothing queued for the old connection is valid on the new one
        self.sched.outbox.append(p.Ready(self.worker_id, self.role, self.model_name,
                                         self.opts.max_batch_size, self.kv.num_blocks,
                                         self.transfer_info, os.getpid(), self.opts.heartbeat_ms,
                                         self.chat_markers, self.kv.block_size))
        self.sched.kv_resync()       # the broker's record of this worker starts empty
        self._flush()
        log.info("worker %s (%s, model %s) registering with %s", self.worker_id, self.role,
                 self.model_name, self.broker_addr)

    def _reconnect(self) -> None:
        self._reconnected_at = time.monotonic()
        self.sched.drop_all()
        if self.sched.draining:    # it holds nothing now: a draining worker does not register again
            log.warning("worker %s: draining and cut off from the broker; leaving", self.worker_id)
            self.stop_event.set()
            return
        self._connect()

    def _flush(self) -> None:
        """Send what the scheduler queued as one batch; called after each phase of a step (a
        decode step's Tokens for every running request go together)."""
        out = self.sched.outbox
        if not out:
            return
        self.sched.outbox = []
        for frames in p.encode_batches(out):
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("broker not keeping up; dropped a batch of up to %d messages", p.BATCH_MAX)

    def stop(self) -> None:
        self.stop_event.set()

    def drain(self, why: str = "SIGTERM") -> None:
        """Take no new work, finish what is held (a context worker's KV until pulled or its lease
        expires), then leave: Disconnect, exit. A second call leaves at once. Only sets flags, so
        a signal handler may call it; the loop starts the drain within a poll (<= 200 ms)."""
        if self._drain_asked is not None:
            log.warning("worker %s: asked again to stop while draining; leaving now", self.worker_id)
            self.stop_event.set()
        self._drain_asked = why

    def _start_drain(self, why: str) -> None:
        if self.sched.draining:
            return
        self.sched.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout
        log.info("worker %s draining (%s): no new work; finishing %d requests and %d KV leases "
                 "(--drain-timeout %g s)", self.worker_id, why, len(self.sched.seqs),
                 len(self.sched.leases), self.drain_timeout)
        self.sched.next_heartbeat = 0.0     # the broker hears of it now
        self._heartbeat_if_due()

    def _drained(self) -> bool:
        """Whether a draining worker may leave: the broker's Drain came (nothing more is on its
        way) and nothing is held, or the drain deadline passed."""
        if self._drain_asked is not None and not self.sched.draining:
            self._start_drain(self._drain_asked)
        if not self.sched.draining:
            return False
        if self.drain_acked and self.sched.idle:
            log.info("worker %s drained: nothing left to serve, %d of %d KV blocks free; leaving",
                     self.worker_id, self.kv.allocator.num_free, self.kv.num_blocks)
            return True
        if time.monotonic() >= self.drain_deadline:
            log.warning("worker %s: drain deadline (%g s) passed holding %d requests and %d KV leases; "
                        "leaving: the broker re-runs or moves them as for a dead worker", self.worker_id,
                        self.drain_timeout, len(self.sched.seqs), len(self.sched.leases))
            return True
        return False

    # -----------------------------------------------------------------------------------------
    # the loop

    def run(self) -> None:
        self._connect()
        try:
            while not self.stop_event.is_set():
                self._step()
                if self._drained():
                    break
                if self.source is not None and not self.source.alive:
                    # it can no longer serve its KV: leave service rather than heartbeat on
                    # while every request routed here fails or waits for its timeout
                    self.failure = "its KV source thread died"
                    log.error("worker %s: %s; leaving service", self.worker_id, self.failure)
                    break
        finally:
            try:
                if self.discovery is not None:
                    self.discovery.close()     # its etcd key goes first: nobody finds it any more
            except Exception:
                log.exception("worker %s: leaving etcd failed", self.worker_id)
            try:
                reason = self.failure or ("drained" if self.sched.draining else "shutting down")
                self.sched.outbox.append(p.Disconnect(reason))
                self._flush()
            except Exception:
                pass
            self.sched.drop_all()
            for t in (self.source, self.sink):
                if t is not None:
                    t.close()
            if self.refusals is not None:
                self.refusals.close()
            self.sock.close(0)
            self.ctx.term()

    def _step(self) -> None:
        if self.sock.poll(self.sched.poll_timeout_ms(), zmq.POLLIN):
            self._receive()
        if self.parent is not None and os.getppid() != self.parent:
            log.warning("parent process exited; stopping")
            self.stop_event.set()
            return
        silent = self.sched.broker_silence()
        moved = self.discovery.address if self.discovery is not None else None
        if moved is not None and moved != self.broker_addr:
            log.warning("etcd names a new broker at %s; dropping all work and reconnecting", moved)
            self.broker_addr = moved
            self._reconnect()
        elif silent is not None:
            log.warning("no word from the broker for %.1f s; dropping all work and reconnecting", silent)
            self._reconnect()
        self._poll_transfers()
        for pull in self.sched.admit():
            try:
                self.sink.start_pull(pull.seq.key, pull.seq.kv_handle, pull.blocks)
            except TransferError as e:
                self.sched.pull_failed(pull.seq.key, e.code, str(e))
        self._flush()            # failures and KvPulled from above, before the compute below
        chunk = self.sched.next_prefill()
        if chunk is not None:
            scores = chunk.seq.scores_prompt
            logits = self.runner.prefill(chunk.token_ids, chunk.seq.blocks, start_pos=chunk.start,
                                         on_layer=self._heartbeat_if_due, every_position=scores)
            if scores:
                k = chunk.seq.params.prompt_logprobs
                self.sched.prompt_scored(chunk, prompt_logprobs(logits, chunk.targets, k))
                logits = logits[-1]
            self.sched.prefilled(chunk)
            if chunk.samples:
                seq = chunk.seq
                rows = ban_tokens(logits[None], [seq.banned()]) if seq.bad_ids else logits[None]
                token = sample(rows, [seq.params], [seq.prompt_ids], [0], self.tok.eos_token_ids)[0]
                lps = token_logprobs(logits[None], [seq.params], [token])   # the model's, before bans
                self.sched.first_token(seq, token, lps[0] if lps else None)
            self._flush()
        batch = self.sched.next_decode()
        if batch is not None:
            logits = self.runner.decode(batch.tokens, batch.positions, batch.block_tables)
            banned, params = batch.banned, batch.params
            rows = ban_tokens(logits, banned) if banned is not None else logits
            tokens = sample(rows, params, batch.histories, batch.steps, self.tok.eos_token_ids)
            self.sched.decoded(batch, tokens, token_logprobs(logits, params, tokens))   # the model's, before bans
            self._flush()
        self._heartbeat_if_due()        # flushes what it queues

    def _receive(self) -> None:
        for _ in range(10_000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.sched.heard_from_broker()
            try:
                msgs = p.decode_all(frames)
            except p.ProtocolError as e:
                msgs = [e]
            reconnect = None
            for msg in msgs:
                if isinstance(msg, p.ProtocolError):
                    self._bad_log(logging.WARNING, "dropping malformed message from the broker: %.500s", msg)
                elif isinstance(msg, p.Reconnect):
                    reconnect = msg      # the rest of the batch was for the old registration
                    break
                elif isinstance(msg, p.Drain):    # no new work after this: finish, then leave
                    self._start_drain(f"the broker says: {msg.reason}")
                    self.drain_acked = True
                else:
                    self.sched.on_message(msg)
                    self._heartbeat_if_due()     # tokenising a batch of long prompts takes a while
            # One reconnect per batch, and at most one per heartbeat interval: a restarted broker
            # answers every message of the old connection with a Reconnect, and each one obeyed
            # was a registration (14-30 within 40 ms) that requests were dispatched to and lost.
            # One ignored here is sent again in answer to the next heartbeat, if still meant.
            if reconnect is not None and time.monotonic() - self._reconnected_at >= self._reconnect_gap:
                log.warning("broker asks to reconnect (%s); dropping all work", reconnect.reason)
                self._reconnect()
                break            # the old socket's remaining messages are moot

    def _heartbeat_if_due(self, _layer: int = 0) -> None:
        if self.sched.heartbeat_if_due():
            self._flush()        # also called between layers of a long prefill

    def _poll_transfers(self) -> None:
        if self.source is not None:
            for ev in self.source.poll():
                if ev.kind == "expired":
                    log.warning("KV transfer %s expired on the context side; freeing its blocks",
                                ev.transfer_id)
                if ev.kind in ("pulled", "expired"):   # pulled: the generation side has every byte
                    self.sched.release_lease(ev.transfer_id)
        self.sched.expire_leases()
        if self.sink is not None:
            for res in self.sink.poll():
                if res.ok:
                    self.sched.pull_done(res.pull_id, res.seconds, res.nbytes)
                else:
                    err = res.error
                    self.sched.pull_failed(res.pull_id, getattr(err, "code", Code.KV_TRANSFER_FAILED),
                                           str(err), retryable=not isinstance(err, TransferTimeout))
