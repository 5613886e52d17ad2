"""The worker process: one engine loop that talks to the broker and runs its role.

Roles: ``context`` (prefill, first token, hold the KV blocks until released or expired),
``generation`` (pull the KV, decode with continuous batching, stream tokens), ``both`` (the
whole request: aggregated serving). Heartbeats are sent from this loop, between engine steps, so
a wedged engine goes silent and the broker expires it. Long prefills run in chunks of
``max_num_tokens`` so heartbeats and decode steps interleave with them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket as pysocket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
import zmq

from broker import protocol as p
from broker.protocol import Code, SamplingParams
from transfer.base import KvLayout, TransferError, TransferTimeout
from transfer.registry import create_sink, create_source, resolve_backend
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner
from workers.engine.sampler import sample
from workers.options import WorkerOptions
from workers.sequence import CONTEXT, DECODE, FULL, Sequence

log = logging.getLogger("worker")

ROLES = ("context", "generation", "both")


class RequestRejected(Exception):
    """The request cannot run here as given; the message names the field and the value."""


@dataclass
class Lease:
    """KV blocks a context worker holds for a generation worker to pull."""
    request_id: str
    attempt: int
    key: str
    blocks: list
    expires: float


class Worker:
    def __init__(self, role: str, broker: str, model: str = "smollm2-135m",
                 options: WorkerOptions = WorkerOptions(), worker_id: Optional[str] = None,
                 host: str = "127.0.0.1", exit_with_parent: bool = False):
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
        self.role, self.broker_addr, self.opts = role, broker, options
        self.model_name = model
        self.worker_id = worker_id or f"{role}-{pysocket.gethostname()}-{os.getpid()}"
        self.parent = os.getppid() if exit_with_parent else None
        torch.set_num_threads(options.num_threads)
        self.model, self.tok = load_model(model)
        cfg = self.model.cfg
        self.eos_ids = tuple(self.tok.eos_token_ids)
        self.max_seq_len = min(options.max_seq_len or cfg.max_position, cfg.max_position)
        num_blocks = max(1, options.kv_max_tokens // options.tokens_per_block)
        self.kv = KVCache(cfg, num_blocks, options.tokens_per_block)
        self.runner = ModelRunner(self.model, self.kv)
        layout = KvLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                          str(self.kv.pool.dtype).replace("torch.", ""), options.tokens_per_block)
        self.source = self.sink = None
        self.transfer_info: dict = {}
        if role != "both":
            backend = resolve_backend(options.cache_transceiver.backend)   # logs a DEFAULT fallback once
            ctc = dataclasses.replace(options.cache_transceiver, backend=backend)
            if role == "context":
                self.source = create_source(ctc, self.kv.pool, layout, host=host)
                self.transfer_info = {"backend": backend, "endpoint": self.source.endpoint}
            else:
                self.sink = create_sink(ctc, self.kv.pool, layout)
                self.transfer_info = {"backend": backend}
        self.ctx = zmq.Context()
        self.sock: Optional[zmq.Socket] = None
        self.seqs: dict[str, Sequence] = {}          # by request id: every request this worker runs
        self._outbox: list[p.Message] = []           # messages for the broker, sent by _flush()
        self.waiting: deque[Sequence] = deque()      # admitted, waiting for KV blocks
        self.prefilling: deque[Sequence] = deque()
        self.pulling: dict[str, Sequence] = {}       # by key
        self.running: list[Sequence] = []
        self.leases: dict[str, Lease] = {}           # by key
        self.stop_event = threading.Event()
        self.last_broker = self.next_heartbeat = 0.0
        self.max_batch_since_heartbeat = 0

    # -----------------------------------------------------------------------------------------
    # connection

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(self.broker_addr)
        self.last_broker = time.monotonic()
        self._outbox.clear()     # nothing queued for the old connection is valid on the new one
        self._send(p.Ready(self.worker_id, self.role, self.model_name, self.opts.max_batch_size,
                           self.kv.num_blocks, self.kv.block_size, self.max_seq_len,
                           self.transfer_info, os.getpid(), self.opts.heartbeat_ms))
        self._flush()
        log.info("worker %s (%s, model %s) registering with %s", self.worker_id, self.role,
                 self.model_name, self.broker_addr)

    def _send(self, msg: p.Message) -> None:
        """Queue a message for the broker; ``_flush`` sends what is queued as one batch, after
        each phase of a step (a decode step's Tokens for every running request go together)."""
        self._outbox.append(msg)

    def _flush(self) -> None:
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        for frames in p.encode_batches(out):
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("broker not keeping up; dropped a batch of up to %d messages", p.BATCH_MAX)

    def stop(self) -> None:
        self.stop_event.set()

    # -----------------------------------------------------------------------------------------
    # the loop

    def run(self) -> None:
        self._connect()
        try:
            while not self.stop_event.is_set():
                self._step()
        finally:
            try:
                self._send(p.Disconnect("shutting down"))
                self._flush()
            except Exception:
                pass
            self._drop_all()
            for t in (self.source, self.sink):
                if t is not None:
                    t.close()
            self.sock.close(0)
            self.ctx.term()

    def _step(self) -> None:
        busy = bool(self.prefilling or self.running)
        # pulls finish in the transfer thread: look often; held leases only expire: look now and then
        timeout = 0 if busy else 1 if self.pulling else min(20 if self.leases else 1000,
                                                             self._until_heartbeat_ms())
        if self.sock.poll(timeout, zmq.POLLIN):
            for _ in range(10_000):
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.last_broker = time.monotonic()
                try:
                    msgs = p.decode_all(frames)
                except p.ProtocolError as e:
                    msgs = [e]
                for msg in msgs:
                    if isinstance(msg, p.ProtocolError):
                        log.warning("dropping malformed message from the broker: %s", msg)
                    else:
                        self._on_message(msg)
        now = time.monotonic()
        if self.parent is not None and os.getppid() != self.parent:
            log.warning("parent process exited; stopping")
            self.stop_event.set()
            return
        if now - self.last_broker > self.opts.broker_timeout_ms / 1000:
            log.warning("no word from the broker for %.1f s; dropping all work and reconnecting",
                        now - self.last_broker)
            self._drop_all()
            self._connect()
        self._poll_transfers(now)
        self._admit()
        self._flush()            # failures and KvPulled from above, before the compute below
        if self.prefilling:
            self._prefill_chunk()
            self._flush()
        if self.running:
            self._decode_step()
            self._flush()
        self._heartbeat_if_due()
        self._flush()

    def _heartbeat_if_due(self, _layer: int = 0) -> None:
        if time.monotonic() >= self.next_heartbeat:
            self._heartbeat()
            self._flush()        # also called between layers of a long prefill

    def _until_heartbeat_ms(self) -> int:
        return max(1, min(200, int((self.next_heartbeat - time.monotonic()) * 1000) + 1))

    def _heartbeat(self) -> None:
        self.next_heartbeat = time.monotonic() + self.opts.heartbeat_ms / 1000
        self._send(p.Heartbeat(self.opts.max_batch_size - len(self.seqs), self.kv.allocator.num_free,
                               len(self.leases), self.max_batch_since_heartbeat))
        self.max_batch_since_heartbeat = 0

    # -----------------------------------------------------------------------------------------
    # messages from the broker

    def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, (p.Prefill, p.Generate)):
            kind = CONTEXT if isinstance(msg, p.Prefill) else FULL
            expected = "context" if kind == CONTEXT else "both"
            if self.role != expected:
                return self._fail(msg.request_id, msg.attempt, Code.INTERNAL,
                                  f"worker {self.worker_id} has role {self.role}, not {expected}")
            try:
                seq = self._new_sequence(msg, kind)
            except RequestRejected as e:
                return self._fail(msg.request_id, msg.attempt, Code.INVALID_REQUEST, str(e))
            if kind == CONTEXT:
                seq.lease_ms = msg.lease_ms
            self._enqueue(seq)
        elif isinstance(msg, p.Decode):
            if self.role != "generation":
                return self._fail(msg.request_id, msg.attempt, Code.INTERNAL,
                                  f"worker {self.worker_id} has role {self.role}, not generation")
            try:
                seq = self._decode_sequence(msg)
            except RequestRejected as e:
                return self._fail(msg.request_id, msg.attempt, Code.INVALID_REQUEST, str(e))
            self._enqueue(seq)
        elif isinstance(msg, p.KvRelease):
            self._release_lease(f"{msg.request_id}#{msg.attempt}")
        elif isinstance(msg, p.CancelWork):
            seq = self.seqs.get(msg.request_id)
            if seq is not None and seq.attempt == msg.attempt:
                self._drop(seq)
            self._release_lease(f"{msg.request_id}#{msg.attempt}")
        elif isinstance(msg, p.Reconnect):
            log.warning("broker asks to reconnect (%s); dropping all work", msg.reason)
            self._drop_all()
            self._connect()

    def _enqueue(self, seq: Sequence) -> None:
        old = self.seqs.get(seq.request_id)
        if old is not None:      # a newer dispatch of the same request replaces the old one
            self._drop(old)
        self.seqs[seq.request_id] = seq
        self.waiting.append(seq)

    def _params(self, sampling: dict) -> SamplingParams:
        try:
            return SamplingParams.from_dict(sampling)
        except p.ProtocolError as e:
            raise RequestRejected(str(e)) from None

    def _new_sequence(self, msg, kind: str) -> Sequence:
        params = self._params(msg.sampling)
        if msg.token_ids is not None:
            ids = list(msg.token_ids)
            bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size]
            if bad:
                raise RequestRejected(f"invalid token_ids: {bad[0]} is outside the vocabulary "
                                      f"[0, {self.model.cfg.vocab_size})")
        elif msg.messages is not None:
            ids = self.tok.encode(self.tok.apply_chat_template(msg.messages))
        else:
            ids = self.tok.encode(msg.prompt)
        if not ids:
            raise RequestRejected("the prompt encodes to no tokens")
        return Sequence(msg.request_id, msg.attempt, kind, ids, params, self._max_new(ids, params))

    def _decode_sequence(self, msg: p.Decode) -> Sequence:
        params = self._params(msg.sampling)
        ids = list(msg.prompt_token_ids)
        seq = Sequence(msg.request_id, msg.attempt, DECODE, ids, params, self._max_new(ids, params),
                       output_ids=[msg.first_token], kv_handle=dict(msg.kv_handle))
        seq.emitted_chars = len(msg.first_text)
        seq.text = msg.first_text
        return seq

    def _max_new(self, ids: list, params: SamplingParams) -> int:
        n = len(ids)
        if n >= self.max_seq_len:
            raise RequestRejected(f"prompt is {n} tokens; the model's context (max_seq_len) is "
                                  f"{self.max_seq_len} tokens, leaving no room for output")
        capacity = self.kv.num_blocks * self.kv.block_size
        if n + 1 > capacity:
            raise RequestRejected(f"prompt is {n} tokens; this worker's KV cache holds {capacity} "
                                  f"tokens (kv_cache_config.max_tokens)")
        return max(1, min(params.max_tokens, self.max_seq_len - n, capacity - n))

    def _fail(self, rid: str, attempt: int, code: str, message: str, retryable: bool = False) -> None:
        log.info("request %s failed: %s %s", rid, code, message)
        self._send(p.Failed(rid, attempt, code, message, retryable))

    # -----------------------------------------------------------------------------------------
    # admission and transfers

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            need = self.kv.blocks_for(seq.reserve_tokens)
            if need > self.kv.allocator.num_free:
                return                       # FIFO: wait until blocks are freed
            self.waiting.popleft()
            seq.blocks = self.kv.allocator.allocate(need)
            if seq.kind == DECODE:
                try:
                    self.sink.start_pull(seq.key, seq.kv_handle, seq.blocks[:self.kv.blocks_for(len(seq.prompt_ids))])
                except TransferError as e:
                    self._drop(seq)
                    self._fail(seq.request_id, seq.attempt, e.code, str(e))
                    continue
                self.pulling[seq.key] = seq
            else:
                seq.t_prefill_start = time.monotonic()
                self.prefilling.append(seq)

    def _poll_transfers(self, now: float) -> None:
        if self.source is not None:
            for ev in self.source.poll():
                if ev.kind == "pulled":
                    self._release_lease(ev.transfer_id)      # the generation side has every byte
                elif ev.kind == "expired":
                    log.warning("KV transfer %s expired on the context side; freeing its blocks", ev.transfer_id)
                    self._release_lease(ev.transfer_id)
        for key in [k for k, l in self.leases.items() if now >= l.expires]:
            log.warning("KV lease %s expired without a release; freeing its blocks", key)
            self._release_lease(key)
        if self.sink is not None:
            for res in self.sink.poll():
                seq = self.pulling.pop(res.pull_id, None)
                if seq is None:
                    continue
                if res.ok:
                    self._send(p.KvPulled(seq.request_id, seq.attempt, res.seconds, res.nbytes))
                    self.running.append(seq)
                else:
                    err = res.error
                    self._drop(seq)
                    self._fail(seq.request_id, seq.attempt, getattr(err, "code", Code.KV_TRANSFER_FAILED),
                               str(err), retryable=not isinstance(err, TransferTimeout))

    def _release_lease(self, key: str) -> None:
        lease = self.leases.pop(key, None)
        if lease is None:
            return
        self.source.release(key)
        self.kv.allocator.free(lease.blocks)

    # -----------------------------------------------------------------------------------------
    # compute

    def _prefill_chunk(self) -> None:
        seq = self.prefilling[0]
        start = seq.num_cached
        chunk = seq.prompt_ids[start:start + self.opts.max_num_tokens]
        logits = self.runner.prefill(chunk, seq.blocks, start_pos=start, on_layer=self._heartbeat_if_due)
        seq.num_cached += len(chunk)
        if seq.num_cached < len(seq.prompt_ids):
            return
        self.prefilling.popleft()
        seq.prefill_s = time.monotonic() - seq.t_prefill_start
        token = sample(logits[None], [seq.params], [seq.prompt_ids], [0])[0]
        text = seq.accept(token, self.tok, self.eos_ids)
        if seq.kind == FULL:
            if seq.finish_reason:
                self._finish(seq, 0, [token], text)
            else:
                self._send(p.Tokens(seq.request_id, 0, [token], text, seq.attempt))
                self.running.append(seq)
            return
        # context role: hand the KV over, hold the blocks until released
        del self.seqs[seq.request_id]
        if seq.finish_reason:
            self.kv.allocator.free(seq.blocks)
            handle = {}
        else:
            handle = self.source.register(seq.key, seq.blocks, len(seq.prompt_ids))
            ttl = 2 * seq.lease_ms / 1000 + 5     # the broker's lease rules; this is the safety net
            self.leases[seq.key] = Lease(seq.request_id, seq.attempt, seq.key, seq.blocks, time.monotonic() + ttl)
        self._send(p.ContextDone(seq.request_id, seq.attempt, token, text, seq.prompt_ids, handle,
                                 seq.finish_reason, seq.prefill_s))

    def _decode_step(self) -> None:
        batch = self.running[:self.opts.max_batch_size]
        tokens = [s.output_ids[-1] for s in batch]
        positions = [len(s.prompt_ids) + len(s.output_ids) - 1 for s in batch]
        logits = self.runner.decode(tokens, positions, [s.blocks for s in batch])
        new = sample(logits, [s.params for s in batch], [s.prompt_ids + s.output_ids for s in batch],
                     [len(s.output_ids) for s in batch])
        self.max_batch_since_heartbeat = max(self.max_batch_since_heartbeat, len(batch))
        for seq, token in zip(batch, new):
            text = seq.accept(token, self.tok, self.eos_ids)
            if seq.finish_reason:
                self._finish(seq, len(seq.output_ids) - 1, [token], text)
            else:
                self._send(p.Tokens(seq.request_id, len(seq.output_ids) - 1, [token], text, seq.attempt))

    def _finish(self, seq: Sequence, index: int, token_ids: list, text: str) -> None:
        """The request is done here; its last tokens ride in the Finished message."""
        self._send(p.Finished(seq.request_id, seq.attempt, seq.finish_reason, len(seq.output_ids),
                              len(seq.prompt_ids), seq.prefill_s, index, token_ids, text))
        self._drop(seq)

    # -----------------------------------------------------------------------------------------
    # cleanup

    def _drop(self, seq: Sequence) -> None:
        """Forget a request and free everything it holds here (idempotent)."""
        if self.seqs.get(seq.request_id) is seq:
            del self.seqs[seq.request_id]
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if self.pulling.pop(seq.key, None) is not None:
            self.sink.cancel(seq.key)
        if seq.blocks:
            self.kv.allocator.free(seq.blocks)
            seq.blocks = []

    def _drop_all(self) -> None:
        for seq in list(self.seqs.values()):
            self._drop(seq)
        for key in list(self.leases):
            self._release_lease(key)
