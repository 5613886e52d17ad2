"""The control channel shared by the NIXL, UCX, MPI and SHM backends; each brings a data plane.

These backends move the bytes with their own library but agree on one small ZeroMQ side channel
for everything else (never pickled: ``[MAGIC, msgpack]`` frames). The context side
(``ChannelSource``) owns a ROUTER served by one background thread, which also drives the source's
data plane; the generation side (``ChannelSink``) has no thread: its ``poll()`` advances every
pull one step, so the worker loop's iteration is the progress loop (NIXL and UCXX then need no
progress thread of their own, which halves bandwidth on 2 cores).

Sink to source, each answered with ``{seq, ...}`` or ``{seq, error}``:
  {op: "hello", seq, info}   -- once per peer, cached: the planes swap what they need to connect
                                (NIXL agent metadata, UCX worker addresses, an MPI port, a shm fd)
  {op: "start", seq, tid}    -- the transfer begins: starts the source's kv_transfer_timeout_ms
  {op: "round", seq, tid, frames: [[src_off, nbytes, tag], ...]}
                             -- push planes only (UCX, MPI): send these byte ranges of the pool;
                                answered only on error
  {op: "done", seq, tid}     -- every byte arrived; answered ``ok`` only if the source still held
                                the transfer, so bytes read one-sidedly after an expiry or a
                                release are never accepted
Pull planes (NIXL, SHM) read the source's memory one-sidedly between "start" and "done".
"""
from __future__ import annotations

import itertools
import logging
import socket as pysocket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from .base import (KvLayout, KvSink, KvSource, PullResult, Registration, Registrations,
                   TransferError,
                   TransferTimeout, check_block_ids, copy_tokens, make_handle, parse_handle,
                   pool_bytes, token_view)
from .config import CacheTransceiverConfig
from .plan import buffer_blocks, plan_rounds, split_frames
from .zmq_backend import _pack, _stop_thread, _tune, _unpack, _Waker

log = logging.getLogger(__name__)

MAGIC = b"KVC1"
FRAME_BYTES = 1 << 30              # push planes: one tagged message per frame (< 2 GiB: MPI counts are ints)
RELEASE_WAIT_S = 2.0               # release()/cancel(): bound on waiting for in-flight operations


# ---------------------------------------------------------------------------------------------
# the data planes' contracts

class SourcePlane:
    """Context side of a data plane; every call comes from the channel thread."""

    push = False
    spin = False          # progress without sleeping while busy (the sender moves the bytes)

    def hello(self, peer: bytes, info: dict) -> dict:
        """What a new sink needs to reach this pool (plain msgpack data)."""
        return {}

    def serve(self, peer: bytes, tid: str, frames: list) -> None:
        """Push planes: send ``[[src_off, nbytes, tag], ...]`` of the pool to ``peer``."""
        raise TransferError("this backend does not push")

    def busy(self) -> bool:
        """True while operations are in flight (the thread then progresses every 1 ms)."""
        return False

    def progress(self) -> None: ...

    def drop(self, tid: str) -> None:
        """Stop reading the blocks of ``tid`` (bounded): cancel or finish its sends."""

    def close(self) -> None: ...


class SinkPlane:
    """Generation side of a data plane; every call comes from the owner's thread."""

    push = False
    device = "cpu"

    def info(self) -> dict:
        return {}

    def connect(self, endpoint: str, info: dict) -> Any:
        """A connection to the source at ``endpoint`` (may still be in progress)."""
        return info

    def connected(self, conn: Any) -> bool:
        """True once usable; raises TransferError if connecting failed."""
        return True

    def forget(self, conn: Any) -> None:
        """The peer is gone (or restarted): drop what was cached for it."""

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def unstage(self, buf: torch.Tensor) -> None: ...

    def post(self, conn: Any, frames: list, dst: torch.Tensor) -> Any:
        """Start moving ``frames`` (``[(src_off, dst_off, nbytes, tag)]``) into ``dst`` (flat
        uint8); returns an operation for ``test``/``cancel``."""
        raise NotImplementedError

    def test(self, op: Any) -> bool:
        """True when the operation finished; raises TransferError if it failed."""
        raise NotImplementedError

    def cancel(self, op: Any) -> None:
        """Once it returns, the operation writes nothing any more."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# context side

@dataclass
class _Registration(Registration):
    blocks: frozenset = frozenset()      # the block ids as a set: a "done" check reads it

    def __post_init__(self) -> None:
        self.blocks = frozenset(self.block_ids)


class ChannelSource(KvSource):
    BACKEND = "?"
    DEVICES = ("cpu",)

    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                 host: str = "127.0.0.1") -> None:
        self._layout = layout
        self._timeout_s = cfg.timeout_s
        self._pool = pool_bytes(pool, layout, self.BACKEND, self.DEVICES)
        self._plane = self.make_plane(self._pool)
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        _tune(self._router)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.bind(f"tcp://{host}:*")
        bound = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        if host in ("0.0.0.0", "*", "::"):
            bound = f"tcp://{pysocket.gethostname()}:{bound.rsplit(':', 1)[1]}"
        self.endpoint = bound
        self._regs = Registrations(layout, self._pool.shape[0], self._timeout_s, _Registration)
        self._lock = self._regs.lock
        self._waker = _Waker(self._ctx)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"kv-{self.BACKEND.lower()}-source {self.endpoint}")
        self._thread.start()

    def make_plane(self, pool: torch.Tensor) -> SourcePlane:
        raise NotImplementedError

    def handle_extra(self) -> dict:
        """Extra keys for the KV handle (e.g. the SHM host id)."""
        return {}

    # -- owner's thread ------------------------------------------------------------------------

    def register(self, transfer_id: str, block_ids: list, num_tokens: int) -> dict:
        reg = self._regs.add(transfer_id, block_ids, num_tokens)
        handle = make_handle(self.BACKEND, self.endpoint, transfer_id, reg.block_ids, num_tokens,
                             self._layout)
        handle.update(self.handle_extra())
        return handle

    def release(self, transfer_id: str) -> None:
        with self._lock:
            reg = self._regs.pop(transfer_id, None)
        if reg is not None and reg.started is not None:
            self._drop(transfer_id)

    def poll(self) -> list:
        done = [event for event, _ in self._regs.sweep()]
        for event in done:
            if event.kind == "expired":
                self._drop(event.transfer_id)
        return done

    @property
    def num_registered(self) -> int:
        return len(self._regs)

    def close(self) -> None:
        if self._thread is None:
            return
        with self._lock:
            self._regs.clear()
        _stop_thread(self._thread, self._waker, self._ctx, f"KV source {self.endpoint}")
        self._thread = None

    def _drop(self, tid: str) -> None:
        """Wait (bounded) until the data plane no longer reads the transfer's blocks."""
        if not self._plane.push:
            return                  # one-sided readers: their "done" is refused from now on
        done = threading.Event()
        self._waker.send(("drop", tid, done))
        if not done.wait(RELEASE_WAIT_S * 2):
            log.error("KV source %s: the data plane did not confirm that it stopped sending "
                      "transfer %r", self.endpoint, tid)

    # -- channel thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        router, wake = self._router, self._waker.rx
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while True:
                busy = self._plane.busy()
                with self._lock:
                    active = any(r.started is not None for r in self._regs.values())
                ready = dict(poller.poll(0 if busy and self._plane.spin else
                                         1 if busy or active else 200))
                if wake in ready:
                    for command in self._waker.drain():
                        if command[0] == "stop":
                            return
                        try:
                            self._plane.drop(command[1])
                        finally:
                            command[2].set()
                if router in ready:
                    for _ in range(64):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
                self._plane.progress()
        except Exception:                        # a bug: say so loudly, pulls will time out
            log.exception("KV source %s: channel thread crashed", self.endpoint)
        finally:
            try:
                self._plane.close()
            except Exception:
                log.exception("KV source %s: closing the data plane failed", self.endpoint)
            router.close(linger=0)
            wake.close(linger=0)

    def _handle(self, router: zmq.Socket, frames: list) -> None:
        ident = frames[0]
        try:
            if len(frames) != 3 or frames[1] != MAGIC:
                raise ValueError(f"{len(frames)} frames")
            body = _unpack(frames[2])
            op, seq = body["op"], body["seq"]
        except Exception as exc:
            log.warning("KV source %s: dropped a malformed request (%s)", self.endpoint, exc)
            return
        try:
            answer = self._answer(ident, op, body)
        except TransferError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:
            log.exception("KV source %s: request %r failed", self.endpoint, op)
            answer = {"error": f"the context worker at {self.endpoint} failed to serve {op!r}: "
                               f"{type(exc).__name__}: {exc}"}
        if answer is None:
            return
        try:
            router.send_multipart([ident, MAGIC, _pack({"seq": seq, **answer})], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.info("KV source %s: could not answer: %s", self.endpoint, exc)

    def _answer(self, ident: bytes, op: str, body: dict) -> Optional[dict]:
        if op == "hello":
            info = body.get("info")
            return {"info": self._plane.hello(ident, info if isinstance(info, dict) else {})}
        tid = body.get("tid")
        with self._lock:
            reg = self._regs.get(tid) if isinstance(tid, str) else None
            now = time.monotonic()
            expired = reg is not None and reg.started is not None and \
                now - reg.started > self._timeout_s
            if reg is None or expired:
                why = (f": it expired (kv_transfer_timeout_ms={round(self._timeout_s * 1000)})"
                       if expired else " (released, expired, already pulled or never registered)")
                raise TransferError(f"the context worker at {self.endpoint} no longer holds the "
                                    f"KV for transfer {tid!r}{why}")
            if op == "start":
                if reg.started is None:
                    reg.started = now
                return {"ok": True}
            if op == "done":
                reg.pulled = True
                return {"ok": True}
            if op != "round":
                raise TransferError(f"unknown op {op!r}")
            frames = self._check_frames(tid, reg, body.get("frames"))
        self._plane.serve(ident, tid, frames)
        return None

    def _check_frames(self, tid: str, reg: _Registration, frames: Any) -> list:
        bnb = self._layout.block_nbytes
        try:
            out = []
            for off, n, tag in frames:
                if not all(isinstance(v, int) and v >= 0 for v in (off, n, tag)) or n < 1:
                    raise ValueError
                if not all(b in reg.blocks for b in range(off // bnb, (off + n - 1) // bnb + 1)):
                    raise ValueError
                out.append((off, n, tag))
            return out
        except (TypeError, ValueError):
            raise TransferError(f"request for bytes {str(frames)[:200]} outside transfer "
                                f"{tid!r}") from None


# ---------------------------------------------------------------------------------------------
# generation side

@dataclass
class _Peer:
    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket
    conn: Any = None               # the plane's connection, once the hello was answered
    hello_seq: Optional[int] = None
    error: Optional[TransferError] = None


@dataclass
class _Pull:
    pull_id: str
    handle: Any                    # KvHandle
    dst_ids: list
    started: float
    deadline: float
    rounds: list
    staged: bool
    state: str = "hello"           # hello -> start -> round -> done -> finished
    acked: bool = False            # the source answered "start"
    seq: int = -1
    round_index: int = 0
    op: Any = None
    nbytes: int = 0
    staging: Optional[torch.Tensor] = None
    error: Optional[TransferError] = None


class ChannelSink(KvSink):
    BACKEND = "?"
    DEVICES = ("cpu",)

    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor,
                 layout: KvLayout) -> None:
        self._cfg, self._layout = cfg, layout
        self._pool = pool_bytes(pool, layout, self.BACKEND, self.DEVICES)
        self._flat = self._pool.reshape(-1)
        self._tokens = token_view(self._pool, layout)
        self._plane = self.make_plane(self._pool)
        self._ctx = zmq.Context(io_threads=1)
        self._peers: dict = {}         # endpoint -> _Peer
        self._monitors: dict = {}      # monitor socket -> _Peer
        self._poller = zmq.Poller()
        self._pulls: dict = {}         # pull_id -> _Pull, started and not finished/cancelled
        self._results: list = []
        self._waiting: dict = {}       # seq -> _Pull or _Peer with a request out
        self._seq = itertools.count(1)
        self.rounds_done = 0           # rounds moved, for tests of chunking

    def make_plane(self, pool: torch.Tensor) -> SinkPlane:
        raise NotImplementedError

    def check_handle(self, handle: dict, h: Any) -> None:
        """Backend-specific checks of a KV handle (raise TransferError)."""

    # -- the contract --------------------------------------------------------------------------

    def start_pull(self, pull_id: str, handle: dict, dest_block_ids: list) -> None:
        h = parse_handle(handle, self.BACKEND)
        if not h.endpoint.startswith("tcp://"):
            raise TransferError(f"malformed KV handle: endpoint={h.endpoint!r} is not tcp://")
        self.check_handle(handle, h)
        self._layout.check_compatible(h.layout)
        dst = check_block_ids(dest_block_ids, h.num_tokens, self._layout, self._pool.shape[0],
                              "dest_block_ids")
        if pull_id in self._pulls:
            raise TransferError(f"pull {pull_id!r} is already running")
        staged = h.layout.block_size != self._layout.block_size
        per_round = buffer_blocks(self._cfg.buffer_tokens(self._layout.block_size),
                                  h.layout.block_size)
        rounds = plan_rounds(h.block_ids, None if staged else dst, per_round)
        now = time.monotonic()
        pull = _Pull(pull_id, h, dst, now, now + self._cfg.timeout_s, rounds, staged)
        self._pulls[pull_id] = pull
        self._step(pull)

    def poll(self) -> list:
        self._pump()
        for pull in list(self._pulls.values()):
            self._step(pull)
        out, self._results = self._results, []
        return out

    def cancel(self, pull_id: str) -> None:
        pull = self._pulls.pop(pull_id, None)
        if pull is not None:
            self._abandon(pull)

    @property
    def num_active(self) -> int:
        return len(self._pulls)

    def close(self) -> None:
        if self._ctx is None:
            return
        for pull in list(self._pulls.values()):
            self._abandon(pull)
        self._pulls.clear()
        for peer in list(self._peers.values()):
            self._forget(peer)
        self._plane.close()
        self._ctx.destroy(linger=0)
        self._ctx = None

    # -- control channel -----------------------------------------------------------------------

    def _peer(self, endpoint: str) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            sock = self._ctx.socket(zmq.DEALER)
            _tune(sock)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(endpoint)
            peer = self._peers[endpoint] = _Peer(endpoint, sock, monitor)
            self._monitors[monitor] = peer
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        return peer

    def _forget(self, peer: _Peer) -> None:
        self._waiting = {s: w for s, w in self._waiting.items() if w is not peer}
        self._peers.pop(peer.endpoint, None)
        self._monitors.pop(peer.monitor, None)
        for sock in (peer.sock, peer.monitor):
            self._poller.unregister(sock)
            sock.close(linger=0)
        if peer.conn is not None:
            try:
                self._plane.forget(peer.conn)
            except Exception:
                log.exception("KV sink: forgetting the context worker at %s", peer.endpoint)
            peer.conn = None

    def _request(self, peer: _Peer, waiter: Any, body: dict) -> int:
        seq = next(self._seq)
        self._waiting[seq] = waiter
        try:
            peer.sock.send_multipart([MAGIC, _pack({"seq": seq, **body})], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise TransferError(f"cannot send to the context worker at {peer.endpoint}: {exc}")
        return seq

    def _pump(self) -> None:
        """Read every answer and disconnect event that is there, without waiting."""
        if not self._peers:
            return
        for sock, _ in self._poller.poll(0):
            if sock in self._monitors:
                self._on_monitor(sock)
                continue
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    if len(frames) != 2 or frames[0] != MAGIC:
                        raise ValueError("bad framing")
                    answer = _unpack(frames[1])
                except Exception as exc:
                    log.warning("KV sink: dropped a malformed answer (%s)", exc)
                    continue
                seq = answer.get("seq")
                waiter = self._waiting.get(seq)
                if isinstance(waiter, _Peer):
                    del self._waiting[seq]
                    self._on_hello(waiter, answer)
                elif isinstance(waiter, _Pull) and self._pulls.get(waiter.pull_id) is waiter:
                    if seq == waiter.seq:
                        del self._waiting[seq]
                    self._on_answer(waiter, answer, seq == waiter.seq)

    def _on_hello(self, peer: _Peer, answer: dict) -> None:
        peer.hello_seq = None
        if "error" in answer or not isinstance(answer.get("info"), dict):
            peer.error = TransferError(str(answer.get("error", "malformed hello answer")))
            return
        try:
            peer.conn = self._plane.connect(peer.endpoint, answer["info"])
        except TransferError as exc:
            peer.error = exc

    def _on_answer(self, pull: _Pull, answer: dict, current: bool) -> None:
        if "error" in answer:
            pull.error = TransferError(str(answer["error"]))
        elif not current:
            return                                # answers to "round" requests are errors only
        elif pull.state == "start":
            pull.acked = True
        elif pull.state == "done":
            pull.state = "finished"

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        peer = self._monitors[monitor]
        lost = False
        while monitor.poll(0):
            lost |= recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        if not lost:
            return
        for pull in self._pulls.values():
            if pull.handle.endpoint == peer.endpoint and pull.error is None:
                pull.error = TransferError(
                    f"lost the connection to the context worker at {peer.endpoint} during the "
                    f"KV transfer {pull.handle.transfer_id!r} (it died or stalled)")
        self._forget(peer)

    # -- one pull's state machine --------------------------------------------------------------

    def _step(self, pull: _Pull) -> None:
        if pull.error is None:
            try:
                self._advance(pull)
            except TransferError as exc:
                pull.error = exc
        if pull.error is not None:
            return self._finish(pull, pull.error)
        if pull.state == "finished":
            return self._finish(pull, None)
        if time.monotonic() >= pull.deadline:
            self._finish(pull, TransferTimeout(
                f"KV transfer timed out: pull {pull.pull_id!r} of transfer "
                f"{pull.handle.transfer_id!r} from the context worker at {pull.handle.endpoint} "
                f"did not finish within kv_transfer_timeout_ms="
                f"{round(self._cfg.timeout_s * 1000)} ({pull.nbytes} bytes received, "
                f"state {pull.state})"))

    def _advance(self, pull: _Pull) -> None:
        h = pull.handle
        if pull.state in ("hello", "start"):
            peer = self._peer(h.endpoint)
            if peer.error is not None:
                error = peer.error
                self._forget(peer)                # the next pull asks again
                raise error
            if peer.conn is None and peer.hello_seq is None:
                peer.hello_seq = self._request(peer, peer,
                                               {"op": "hello", "info": self._plane.info()})
            if pull.state == "hello":             # "start" goes right behind "hello": the
                pull.state = "start"              # source's clock starts at once
                pull.seq = self._request(peer, pull, {"op": "start", "tid": h.transfer_id})
            if not pull.acked or peer.conn is None:
                return
            try:
                if not self._plane.connected(peer.conn):
                    return
            except TransferError:
                self._forget(peer)
                raise
            pull.state = "round"
        if pull.state != "round":
            return
        if pull.op is None:                       # one round per poll: the worker loop and
            self._post_round(pull)                # other pulls get their turn in between
        if self._plane.test(pull.op):
            pull.op = None
            rnd = pull.rounds[pull.round_index]
            if pull.staged:
                self._scatter(pull, rnd)
            pull.nbytes += rnd.count * h.layout.block_nbytes
            self.rounds_done += 1
            pull.round_index += 1
            if pull.round_index == len(pull.rounds):
                pull.state = "done"
                pull.seq = self._request(self._peers[h.endpoint], pull,
                                         {"op": "done", "tid": h.transfer_id})

    def _post_round(self, pull: _Pull) -> None:
        h, rnd = pull.handle, pull.rounds[pull.round_index]
        src_bnb = h.layout.block_nbytes
        if pull.staged:
            if pull.staging is None:
                most = max(r.count for r in pull.rounds)
                pull.staging = self._plane.staging(most * src_bnb)
            dst, dst_bnb = pull.staging, src_bnb
        else:
            dst, dst_bnb = self._flat, self._layout.block_nbytes
        frame_bytes = FRAME_BYTES if self._plane.push else 1 << 62
        frames = [(f.src, f.dst, f.nbytes, (pull.seq << 12 | i) & (2**63 - 1))
                  for i, f in enumerate(split_frames(rnd.segments, src_bnb, dst_bnb,
                                                     frame_bytes))]
        peer = self._peers[h.endpoint]
        pull.op = self._plane.post(peer.conn, frames, dst)
        if self._plane.push:
            self._request(peer, pull, {"op": "round", "tid": h.transfer_id,
                                       "frames": [[s, n, t] for s, _, n, t in frames]})

    def _scatter(self, pull: _Pull, rnd: Any) -> None:
        src = pull.handle.layout
        staged = token_view(pull.staging[:rnd.count * src.block_nbytes].view(rnd.count, -1), src)
        t0 = rnd.first * src.block_size
        t1 = min((rnd.first + rnd.count) * src.block_size, pull.handle.num_tokens)
        copy_tokens(self._tokens, pull.dst_ids, staged, lambda i: i - rnd.first,
                    t0, t1, src.block_size, self._layout.block_size)

    def _abandon(self, pull: _Pull) -> None:
        """Stop the pull's data movement and forget its requests (answers arriving later are
        dropped by their seq)."""
        if pull.op is not None:
            op, pull.op = pull.op, None
            self._plane.cancel(op)
        if pull.staging is not None:
            self._plane.unstage(pull.staging)
            pull.staging = None
        self._waiting = {s: w for s, w in self._waiting.items() if w is not pull}

    def _finish(self, pull: _Pull, error: Optional[TransferError]) -> None:
        if self._pulls.get(pull.pull_id) is not pull:
            return
        del self._pulls[pull.pull_id]
        self._abandon(pull)
        self._results.append(PullResult(pull.pull_id, error is None, error, pull.nbytes,
                                        time.monotonic() - pull.started))
