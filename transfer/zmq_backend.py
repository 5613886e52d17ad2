"""The ZMQ transfer backend: KV blocks pulled over ZeroMQ TCP. Always available.

The context side (``ZmqSource``) owns a ROUTER served by one background thread. The generation
side (``ZmqSink``) owns a background thread with one DEALER per context worker (cached). The sink
asks for one round at a time (at most ``max_tokens_in_buffer`` tokens, merged block segments);
the source answers with one message per frame ``[MAGIC, msgpack header, raw bytes]``, the bytes
sent straight from the pool (``copy=False``, tracked so that ``release()`` can wait for them),
and the sink receives each frame with ``recv_into`` straight into its pool (same block size) or
into a staging buffer that it scatters token-wise (different block sizes).

Wire messages (never pickled), sink to source ``[MAGIC, msgpack]``:
  {op: "pull", seq, tid, segs: [[src_block, nblocks], ...], frame_bytes}
  {op: "done", seq, tid}                  -- every block arrived; no answer
source to sink ``[MAGIC, msgpack, bytes]`` per frame: {seq, i, n, nbytes}, or ``[MAGIC, msgpack]``
{seq, error} when the source no longer holds the transfer or the request is invalid.
Every header carries the request's ``seq`` so that a late answer to an abandoned request on a
reused DEALER is recognised and dropped.
"""
from __future__ import annotations

import itertools
import logging
import queue
import socket as pysocket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import msgpack
import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from .base import (KvLayout, KvSink, KvSource, PullResult, Registration, Registrations,
                   TransferError,
                   TransferTimeout, check_block_ids, copy_tokens, make_handle, parse_handle,
                   pool_bytes, token_view)
from .config import CacheTransceiverConfig
from .plan import Segment, buffer_blocks, plan_rounds, split_frames

log = logging.getLogger(__name__)

BACKEND = "ZMQ"
MAGIC = b"KVX1"
FRAME_BYTES = 8 << 20                      # 1-16 MiB frames: big enough to amortise, small
FRAME_BYTES_RANGE = (64 << 10, 64 << 20)   # enough to pipeline copies with the network
RELEASE_WAIT_S = 2.0                       # release(): bound on waiting for in-flight sends
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000
_ids = itertools.count(1)


def _tune(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 2)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    body = msgpack.unpackb(data, raw=False)
    if not isinstance(body, dict):
        raise ValueError("not a map")
    return body


def _discard_rest(sock: zmq.Socket) -> None:
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv_into(bytearray())


class _Waker:
    """An inproc PAIR pair: the owner's calls wake the background thread at once."""

    def __init__(self, ctx: zmq.Context) -> None:
        addr = f"inproc://kvx-wake-{next(_ids)}"
        self.rx = ctx.socket(zmq.PAIR)
        self.rx.bind(addr)
        self.tx = ctx.socket(zmq.PAIR)
        self.tx.connect(addr)
        self._lock = threading.Lock()
        self.commands: queue.Queue = queue.Queue()

    def send(self, command: tuple) -> None:
        self.commands.put(command)
        with self._lock:
            self.tx.send(b"", zmq.NOBLOCK)

    def drain(self) -> list:
        while self.rx.poll(0):
            self.rx.recv()
        out = []
        while True:
            try:
                out.append(self.commands.get_nowait())
            except queue.Empty:
                return out


def _stop_thread(thread: threading.Thread, waker: _Waker, ctx: zmq.Context, what: str) -> None:
    if thread.is_alive():
        waker.send(("stop",))
        thread.join(timeout=10)
    waker.tx.close(linger=0)
    if thread.is_alive():
        log.error("%s: background thread did not stop; leaving its ZeroMQ context open", what)
        return
    ctx.term()


# ---------------------------------------------------------------------------------------------
# context side

@dataclass
class _Registration(Registration):
    served: set = field(default_factory=set)
    trackers: list = field(default_factory=list)


class ZmqSource(KvSource):
    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                 host: str = "127.0.0.1") -> None:
        self._layout = layout
        self._timeout_s = cfg.timeout_s
        self._pool = pool_bytes(pool, layout, BACKEND).numpy()   # shares the pool's memory
        self._flat = self._pool.reshape(-1)
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._make_router()
        self._router.bind(f"tcp://{host}:*")
        self._bound = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        advertised = self._bound
        if host in ("0.0.0.0", "*", "::"):
            advertised = f"tcp://{pysocket.gethostname()}:{self._bound.rsplit(':', 1)[1]}"
        self.endpoint = advertised
        self._regs = Registrations(layout, self._pool.shape[0], cfg.timeout_s, _Registration)
        self._lock = self._regs.lock
        self._waker = _Waker(self._ctx)
        self._thread = threading.Thread(target=self._serve, name=f"kv-source {self.endpoint}",
                                        daemon=True)
        self._thread.start()

    def _make_router(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        _tune(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unroutable answer is an error, not a drop
        sock.setsockopt(zmq.SNDHWM, 0)             # frames reference the pool: queueing is free
        return sock

    # -- owner's thread ------------------------------------------------------------------------

    def register(self, transfer_id: str, block_ids: list, num_tokens: int) -> dict:
        reg = self._regs.add(transfer_id, block_ids, num_tokens)
        return make_handle(BACKEND, self.endpoint, transfer_id, reg.block_ids, num_tokens,
                           self._layout)

    def release(self, transfer_id: str) -> None:
        with self._lock:
            reg = self._regs.pop(transfer_id, None)
        if reg is not None:
            self._wait_sent(reg.trackers, transfer_id)

    def poll(self) -> list:
        done = self._regs.sweep()
        for event, reg in done:
            self._wait_sent(reg.trackers, event.transfer_id)
        return [event for event, _ in done]

    @property
    def num_registered(self) -> int:
        return len(self._regs)

    def close(self) -> None:
        if self._thread is None:
            return
        with self._lock:
            trackers = [t for reg in self._regs.values() for t in reg.trackers]
            self._regs.clear()
        _stop_thread(self._thread, self._waker, self._ctx, f"KV source {self.endpoint}")
        self._thread = None
        for tracker in trackers:                  # closed with linger 0: frames are dropped
            try:
                tracker.wait(RELEASE_WAIT_S)
            except zmq.NotDone:
                log.error("KV source %s: a frame is still queued after close", self.endpoint)

    def _wait_sent(self, trackers: list, transfer_id: str) -> None:
        """Wait, bounded, until ZeroMQ no longer reads the blocks; a stalled peer's queued
        frames are dropped by resetting the ROUTER (its other peers' pulls then fail)."""
        if self._wait_trackers(trackers, RELEASE_WAIT_S):
            return
        log.warning("KV source %s: frames of transfer %r still queued after %.1f s; resetting "
                    "the socket to drop them", self.endpoint, transfer_id, RELEASE_WAIT_S)
        done = threading.Event()
        self._waker.send(("reset", done))
        if not (done.wait(RELEASE_WAIT_S) and self._wait_trackers(trackers, RELEASE_WAIT_S)):
            raise TransferError(f"KV source {self.endpoint}: could not stop sending transfer "
                                f"{transfer_id!r}; do not reuse its blocks")

    @staticmethod
    def _wait_trackers(trackers: list, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        try:
            for tracker in trackers:
                tracker.wait(max(0.0, deadline - time.monotonic()))
        except zmq.NotDone:
            return False
        return True

    # -- server thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        router, wake = self._router, self._waker.rx
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(1000))
                if wake in ready:
                    for command in self._waker.drain():
                        if command[0] == "stop":
                            return
                        poller.unregister(router)
                        router = self._reset(router)
                        poller.register(router, zmq.POLLIN)
                        command[1].set()
                if router in ready:
                    for _ in range(64):          # bounded, so commands are never starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
                self._prune()
        except Exception:                        # a bug: say so loudly, pulls will time out
            log.exception("KV source %s: server thread crashed", self.endpoint)
        finally:
            router.close(linger=0)
            wake.close(linger=0)

    def _reset(self, router: zmq.Socket) -> zmq.Socket:
        router.close(linger=0)
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            fresh = self._make_router()
            try:
                fresh.bind(self._bound)
                return fresh
            except zmq.ZMQError as exc:          # the old listener closes asynchronously
                fresh.close(linger=0)
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _prune(self) -> None:
        with self._lock:
            for reg in self._regs.values():
                if reg.trackers:
                    reg.trackers = [t for t in reg.trackers if not t.done]

    def _handle(self, router: zmq.Socket, frames: list) -> None:
        ident = frames[0]
        try:
            if len(frames) != 3 or frames[1] != MAGIC:
                raise ValueError(f"{len(frames)} frames")
            body = _unpack(frames[2])
            op, seq, tid = body["op"], body["seq"], body["tid"]
        except Exception as exc:
            log.warning("KV source %s: dropped a malformed request (%s)", self.endpoint, exc)
            return
        if op == "done":
            with self._lock:
                reg = self._regs.get(tid)
                if reg is not None and len(reg.served) == len(reg.block_ids):
                    reg.pulled = True
            return
        if op != "pull":
            self._answer(router, ident, {"seq": seq, "error": f"unknown op {op!r}"})
            return
        with self._lock:
            error = self._check_pull(tid, body)
            if error is not None:
                self._answer(router, ident, {"seq": seq, "error": error})
                return
            reg = self._regs[tid]
            bnb = self._layout.block_nbytes
            segments = [Segment(s, s, n) for s, n in body["segs"]]
            plan = split_frames(segments, bnb, bnb, body["frame_bytes"])
            try:
                for i, frame in enumerate(plan):
                    header = _pack({"seq": seq, "i": i, "n": len(plan), "nbytes": frame.nbytes})
                    router.send_multipart([ident, MAGIC, header], zmq.SNDMORE | zmq.NOBLOCK)
                    data = memoryview(self._flat[frame.src:frame.src + frame.nbytes])
                    reg.trackers.append(router.send(data, zmq.NOBLOCK, copy=False, track=True))
            except zmq.ZMQError as exc:          # the sink went away: its pull fails there
                log.info("KV source %s: could not answer transfer %r: %s", self.endpoint, tid, exc)
                return
            for seg in segments:
                reg.served.update(range(seg.src, seg.src + seg.n))

    def _check_pull(self, tid: object, body: dict) -> Optional[str]:
        """None when the pull may be served (the registration lock is held), else why not."""
        reg = self._regs.get(tid) if isinstance(tid, str) else None
        if reg is None:
            return (f"the context worker at {self.endpoint} no longer holds the KV for transfer "
                    f"{tid!r} (released, expired, already pulled or never registered)")
        now = time.monotonic()
        if reg.started is None:
            reg.started = now
        elif now - reg.started > self._timeout_s:
            return (f"the context worker at {self.endpoint} no longer holds the KV for transfer "
                    f"{tid!r}: it expired (kv_transfer_timeout_ms="
                    f"{round(self._timeout_s * 1000)})")
        frame_bytes, segs = body.get("frame_bytes"), body.get("segs")
        if not isinstance(frame_bytes, int) or not (
                FRAME_BYTES_RANGE[0] <= frame_bytes <= FRAME_BYTES_RANGE[1]):
            return f"invalid frame_bytes={frame_bytes!r}"
        mine = set(reg.block_ids)
        try:
            for s, n in segs:
                if not (isinstance(s, int) and isinstance(n, int) and n >= 1
                        and all(b in mine for b in range(s, s + n))):
                    raise ValueError
        except (TypeError, ValueError):
            return f"pull of blocks {segs!r} outside transfer {tid!r}"
        return None

    def _answer(self, router: zmq.Socket, ident: bytes, header: dict) -> None:
        try:
            router.send_multipart([ident, MAGIC, _pack(header)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.info("KV source %s: could not answer: %s", self.endpoint, exc)


# ---------------------------------------------------------------------------------------------
# generation side

@dataclass
class _Pull:
    pull_id: str
    handle: object                 # KvHandle
    dst_ids: list
    started: float
    deadline: float
    rounds: list
    staged: bool                   # different block sizes: receive into a staging buffer
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False        # set under write_lock by cancel()
    round_index: int = 0
    seq: int = -1
    frames: list = field(default_factory=list)
    frame_index: int = 0
    nbytes: int = 0
    staging: Optional[np.ndarray] = None


class ZmqSink(KvSink):
    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor,
                 layout: KvLayout) -> None:
        self._cfg, self._layout = cfg, layout
        self._pool = pool_bytes(pool, layout, BACKEND)
        self._flat = self._pool.numpy().reshape(-1)
        self._tokens = token_view(self._pool, layout)
        self._lock = threading.Lock()
        self._pulls: dict = {}         # pull_id -> _Pull, started and not finished/cancelled
        self._results: list = []
        self._ctx = zmq.Context(io_threads=1)
        self._waker = _Waker(self._ctx)
        self._seq = itertools.count(1)
        self.rounds_done = 0           # rounds received, for tests of chunking
        self._thread = threading.Thread(target=self._run, name="kv-sink", daemon=True)
        self._thread.start()

    # -- owner's thread ------------------------------------------------------------------------

    def start_pull(self, pull_id: str, handle: dict, dest_block_ids: list) -> None:
        h = parse_handle(handle, BACKEND)
        if not h.endpoint.startswith("tcp://"):
            raise TransferError(f"malformed KV handle: endpoint={h.endpoint!r} is not tcp://")
        self._layout.check_compatible(h.layout)
        dst = check_block_ids(dest_block_ids, h.num_tokens, self._layout, self._pool.shape[0],
                              "dest_block_ids")
        staged = h.layout.block_size != self._layout.block_size
        per_round = buffer_blocks(self._cfg.buffer_tokens(self._layout.block_size),
                                  h.layout.block_size)
        rounds = plan_rounds(h.block_ids, None if staged else dst, per_round)
        now = time.monotonic()
        pull = _Pull(pull_id, h, dst, now, now + self._cfg.timeout_s, rounds, staged)
        with self._lock:
            if pull_id in self._pulls:
                raise TransferError(f"pull {pull_id!r} is already running")
            self._pulls[pull_id] = pull
        self._waker.send(("start", pull))

    def poll(self) -> list:
        with self._lock:
            out, self._results = self._results, []
        return out

    def cancel(self, pull_id: str) -> None:
        with self._lock:
            pull = self._pulls.pop(pull_id, None)
        if pull is not None:
            with pull.write_lock:                # waits out a frame being written right now
                pull.cancelled = True

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._pulls)

    def close(self) -> None:
        if self._thread is None:
            return
        with self._lock:
            pulls, self._pulls = list(self._pulls.values()), {}
        for pull in pulls:
            with pull.write_lock:
                pull.cancelled = True
        _stop_thread(self._thread, self._waker, self._ctx, "KV sink")
        self._thread = None

    # -- background thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self._peers: dict = {}         # endpoint -> DEALER
        self._monitors: dict = {}      # monitor socket -> endpoint
        self._waiting: dict = {}       # seq -> _Pull with a request out
        self._active: list = []
        self._poller = zmq.Poller()
        self._poller.register(self._waker.rx, zmq.POLLIN)
        try:
            while True:
                wait = 1.0
                if self._active:
                    wait = min(wait, min(p.deadline for p in self._active) - time.monotonic())
                ready = dict(self._poller.poll(max(0, int(wait * 1000) + 1)))
                if self._waker.rx in ready:
                    for command in self._waker.drain():
                        if command[0] == "stop":
                            return
                        self._begin(command[1])
                for sock in ready:
                    if sock in self._monitors:
                        self._on_monitor(sock)
                    elif sock is not self._waker.rx:
                        self._on_answers(sock)
                self._expire()
        except Exception:
            log.exception("KV sink: background thread crashed")
            for pull in list(self._active):
                self._finish(pull, TransferError("KV sink background thread crashed; see log"))
        finally:
            for sock in list(self._peers.values()) + list(self._monitors):
                sock.close(linger=0)
            self._waker.rx.close(linger=0)

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._peers.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            _tune(sock)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(endpoint)
            self._peers[endpoint] = sock
            self._monitors[monitor] = endpoint
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        return sock

    def _begin(self, pull: _Pull) -> None:
        if pull.cancelled:
            return
        self._active.append(pull)
        try:
            self._dealer(pull.handle.endpoint)
        except zmq.ZMQError as exc:
            self._finish(pull, TransferError(
                f"cannot reach the context worker at {pull.handle.endpoint!r}: {exc}"))
            return
        self._request(pull)

    def _request(self, pull: _Pull) -> None:
        """Ask for the pull's next round."""
        rnd = pull.rounds[pull.round_index]
        src_bnb = pull.handle.layout.block_nbytes
        dst_bnb = src_bnb if pull.staged else self._layout.block_nbytes
        pull.frames = split_frames(rnd.segments, src_bnb, dst_bnb, FRAME_BYTES)
        pull.frame_index = 0
        if pull.staged and pull.staging is None:
            pull.staging = np.empty(max(r.count for r in pull.rounds) * src_bnb, np.uint8)
        self._waiting.pop(pull.seq, None)
        pull.seq = next(self._seq)
        self._waiting[pull.seq] = pull
        body = {"op": "pull", "seq": pull.seq, "tid": pull.handle.transfer_id,
                "segs": [[s.src, s.n] for s in rnd.segments], "frame_bytes": FRAME_BYTES}
        self._send(pull, body)

    def _send(self, pull: _Pull, body: dict) -> None:
        try:
            self._peers[pull.handle.endpoint].send_multipart([MAGIC, _pack(body)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._finish(pull, TransferError(f"cannot send to the context worker at "
                                             f"{pull.handle.endpoint}: {exc}"))

    def _on_answers(self, sock: zmq.Socket) -> None:
        for _ in range(256):                     # bounded, so deadlines are checked
            try:
                magic = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if magic != MAGIC or not sock.getsockopt(zmq.RCVMORE):
                    raise ValueError("bad framing")
                header = _unpack(sock.recv())
                pull = self._waiting.get(header.get("seq"))
            except Exception as exc:
                log.warning("KV sink: dropped a malformed answer (%s)", exc)
                _discard_rest(sock)
                continue
            if pull is None or pull.cancelled:   # stale: an abandoned request's late answer
                _discard_rest(sock)
                if pull is not None:
                    self._drop(pull)
                continue
            self._on_frame(sock, pull, header)

    def _on_frame(self, sock: zmq.Socket, pull: _Pull, header: dict) -> None:
        if "error" in header:
            _discard_rest(sock)
            self._finish(pull, TransferError(str(header["error"])))
            return
        frame = pull.frames[pull.frame_index] if pull.frame_index < len(pull.frames) else None
        expected = (pull.frame_index, len(pull.frames), frame and frame.nbytes)
        if (frame is None or (header.get("i"), header.get("n"), header.get("nbytes")) != expected
                or not sock.getsockopt(zmq.RCVMORE)):
            _discard_rest(sock)
            self._finish(pull, TransferError(
                f"the context worker at {pull.handle.endpoint} sent frame {header!r}, expected "
                f"frame {pull.frame_index} of {len(pull.frames)}"))
            return
        base = pull.staging if pull.staged else self._flat
        with pull.write_lock:
            if pull.cancelled:
                _discard_rest(sock)
                return
            got = sock.recv_into(memoryview(base[frame.dst:frame.dst + frame.nbytes]))
        _discard_rest(sock)
        if got != frame.nbytes:
            self._finish(pull, TransferError(f"frame of {got} bytes, expected {frame.nbytes}"))
            return
        pull.nbytes += got
        pull.frame_index += 1
        if pull.frame_index < len(pull.frames):
            return
        if pull.staged and not self._scatter(pull):
            return
        self.rounds_done += 1
        pull.round_index += 1
        if pull.round_index < len(pull.rounds):
            self._request(pull)
            return
        self._send(pull, {"op": "done", "seq": pull.seq, "tid": pull.handle.transfer_id})
        self._finish(pull, None)

    def _scatter(self, pull: _Pull) -> bool:
        """Copy a staged round token-wise into the destination blocks."""
        rnd, src = pull.rounds[pull.round_index], pull.handle.layout
        staged = token_view(torch.from_numpy(pull.staging), src)
        t0 = rnd.first * src.block_size
        t1 = min((rnd.first + rnd.count) * src.block_size, pull.handle.num_tokens)
        with pull.write_lock:
            if pull.cancelled:
                return False
            copy_tokens(self._tokens, pull.dst_ids, staged, lambda i: i - rnd.first,
                        t0, t1, src.block_size, self._layout.block_size)
        return True

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        endpoint = self._monitors[monitor]
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            for pull in [p for p in self._active if p.handle.endpoint == endpoint]:
                if pull.seq in self._waiting:
                    self._finish(pull, TransferError(
                        f"lost the connection to the context worker at {endpoint} during the "
                        f"KV transfer {pull.handle.transfer_id!r} (it died or stalled)"))

    def _expire(self) -> None:
        now = time.monotonic()
        for pull in list(self._active):
            if pull.cancelled:
                self._drop(pull)
            elif now >= pull.deadline:
                self._finish(pull, TransferTimeout(
                    f"KV transfer timed out: pull {pull.pull_id!r} of transfer "
                    f"{pull.handle.transfer_id!r} from the context worker at "
                    f"{pull.handle.endpoint} did not finish within kv_transfer_timeout_ms="
                    f"{round(self._cfg.timeout_s * 1000)} ({pull.nbytes} bytes received)"))

    def _drop(self, pull: _Pull) -> None:
        if self._waiting.get(pull.seq) is pull:
            del self._waiting[pull.seq]
        if pull in self._active:
            self._active.remove(pull)
        pull.staging = None

    def _finish(self, pull: _Pull, error: Optional[TransferError]) -> None:
        self._drop(pull)
        result = PullResult(pull.pull_id, error is None, error, pull.nbytes,
                            time.monotonic() - pull.started)
        with self._lock:
            if self._pulls.get(pull.pull_id) is pull:    # a cancelled pull reports nothing
                del self._pulls[pull.pull_id]
                self._results.append(result)


def make_source(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout, *,
                host: str = "127.0.0.1") -> KvSource:
    return ZmqSource(cfg, pool, layout, host=host)


def make_sink(cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout) -> KvSink:
    return ZmqSink(cfg, pool, layout)
