"""The context side of the control channel: ``ChannelSource``, a ``KvSource`` for every backend.

Owns the source's registrations and one ROUTER served by one background thread, which answers
the sinks' requests (``messages.py``), starts each transfer's clock, refuses what it no longer
holds, and drives the backend's data plane (``planes.SourcePlane``). It never trusts a request:
malformed ones are logged and dropped, byte ranges outside the transfer's blocks are refused,
and nothing a peer sends can stop the thread. With CURVE (a ``broker.auth.CurveServer``), only
the generation workers whose public keys it admits can connect at all (docs/architecture.md §9).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import zmq

from broker.addresses import advertised, join
from broker.ratelog import RateLimitedLog

from .base import (KvLayout, KvSource, Registration, Registrations, TransferError, make_handle,
                   pool_bytes)
from .config import CacheTransceiverConfig
from .messages import (MAX_ERROR_CHARS, Ack, Done, Hello, Malformed, Refused, Start, Welcome,
                       decode_request, encode)
from .planes import RELEASE_WAIT_S, SourceLink, SourcePlane
from .sockets import tune

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class _Waker:
    """An inproc PAIR pair and a queue: the owner's calls reach the channel thread at once."""

    def __init__(self, ctx: zmq.Context) -> None:
        addr = f"inproc://kv-channel-wake-{next(_ids)}"
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


@dataclass
class _Registration(Registration):
    blocks: frozenset = frozenset()      # the block ids as a set: a Round check reads it

    def __post_init__(self) -> None:
        self.blocks = frozenset(self.block_ids)


class ChannelSource(KvSource, SourceLink):
    def __init__(self, cfg: CacheTransceiverConfig, pool: torch.Tensor, layout: KvLayout,
                 backend: str, plane: Callable[[torch.Tensor], SourcePlane],
                 devices: tuple = ("cpu",), *, host: str = "127.0.0.1", curve: Any = None,
                 advertise: Optional[str] = None) -> None:
        """``host``: where the channel binds; ``advertise``: the host its handles name (default:
        ``host``, a wildcard made this host's address: ``broker.addresses.advertised``). ``curve``: a
        ``broker.auth.CurveServer`` (this worker's pair, and the public keys of the generation
        workers it admits under the ``kv-peers`` ZAP domain)."""
        self.backend = backend
        self._layout = layout
        self._timeout_s = cfg.timeout_s
        self._pool = pool_bytes(pool, layout, backend, devices)
        self._plane = plane(self._pool)
        self._ctx = zmq.Context(io_threads=1)
        self._curve = curve.start(self._ctx) if curve is not None else None
        self._ipv6 = ":" in host
        self._router = self._make_router()
        self._router.bind(join("tcp", host, "*"))
        self.bound = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoint = advertised(self.bound, advertise)
        self.curve_key = curve.pair.public.decode() if curve is not None else ""
        self._regs = Registrations(layout, self._pool.shape[0], self._timeout_s, _Registration)
        self._lock = self._regs.lock
        self._waker = _Waker(self._ctx)
        self._bad_log = RateLimitedLog(log, "malformed KV requests")
        self._poller = zmq.Poller()
        self._plane.attach(self)
        self._thread: Optional[threading.Thread] = threading.Thread(
            target=self._serve, daemon=True,
            name=f"kv-{backend.lower()}-source {self.endpoint}")
        self._thread.start()

    # -- owner's thread ------------------------------------------------------------------------

    def register(self, transfer_id: str, block_ids: list, num_tokens: int) -> dict:
        reg = self._regs.add(transfer_id, block_ids, num_tokens)
        handle = make_handle(self.backend, self.endpoint, transfer_id, reg.block_ids, num_tokens,
                             self._layout, self.worker_id, self.curve_key)
        handle.update(self._plane.handle_extra())
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._thread is None:
            return
        with self._lock:
            self._regs.clear()
        if self._thread.is_alive():
            self._waker.send(("stop",))
            self._thread.join(timeout=10)
        self._waker.tx.close(linger=0)
        if self._thread.is_alive():
            log.error("KV source %s: channel thread did not stop; leaving its ZeroMQ context "
                      "open", self.endpoint)
        else:
            if self._curve is not None:
                self._curve.stop()
            self._ctx.term()
        self._thread = None

    def _drop(self, tid: str) -> None:
        """Wait (bounded) until the data plane no longer reads the transfer's blocks."""
        if not self._plane.push:
            return                  # one-sided readers: their Done is refused from now on
        done = threading.Event()
        self._waker.send(("drop", tid, done))
        if not done.wait(RELEASE_WAIT_S * 3):
            log.error("KV source %s: the data plane did not confirm that it stopped sending "
                      "transfer %r", self.endpoint, tid)

    # -- channel thread ------------------------------------------------------------------------

    def send(self, peer: bytes, msg: Any, data: Any = None) -> Optional[zmq.MessageTracker]:
        head = [peer, *encode(msg)]
        if data is None:
            self._router.send_multipart(head, zmq.NOBLOCK)
            return None
        self._router.send_multipart(head, zmq.SNDMORE | zmq.NOBLOCK)
        return self._router.send(data, zmq.NOBLOCK, copy=False, track=True)

    def reset(self) -> None:
        """Close the ROUTER (dropping what it queued) and bind a fresh one at the same address."""
        self._poller.unregister(self._router)
        self._router.close(linger=0)
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            fresh = self._make_router()
            try:
                fresh.bind(self.bound)
                break
            except zmq.ZMQError as exc:          # the old listener closes asynchronously
                fresh.close(linger=0)
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._router = fresh
        self._poller.register(fresh, zmq.POLLIN)

    def _make_router(self) -> zmq.Socket:
        sock = tune(self._ctx.socket(zmq.ROUTER))
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self._curve is not None:
            self._curve.apply(sock, "kv-peers")     # broker.auth.PEERS
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unroutable answer is an error, not a drop
        sock.setsockopt(zmq.SNDHWM, 0)             # KV frames reference the pool: queueing is free
        return sock

    def _serve(self) -> None:
        wake = self._waker.rx
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(wake, zmq.POLLIN)
        try:
            while True:
                busy = self._plane.busy()
                active = False
                if self._plane.tick and not busy:
                    with self._lock:
                        active = any(r.started is not None for r in self._regs.values())
                ready = dict(self._poller.poll(0 if busy and self._plane.spin else
                                               1 if busy or active else 200))
                if wake in ready:
                    for command in self._waker.drain():
                        if command[0] == "stop":
                            return
                        self._run_drop(*command[1:])
                if self._router in ready:
                    for _ in range(64):          # bounded, so commands are never starved
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._plane.progress()
        except Exception:                        # a bug: say so loudly, pulls will time out
            log.exception("KV source %s: channel thread crashed", self.endpoint)
        finally:
            self._router.close(linger=0)
            wake.close(linger=0)
            try:
                self._plane.close()
            except Exception:
                log.exception("KV source %s: closing the data plane failed", self.endpoint)

    def _run_drop(self, tid: str, done: threading.Event) -> None:
        try:
            self._plane.drop(tid)
        except TransferError as exc:
            log.error("KV source %s: %s", self.endpoint, exc)
        finally:
            done.set()

    def _handle(self, frames: list) -> None:
        ident = frames[0]
        try:
            msg = decode_request(frames[1:])
        except Malformed as exc:
            self._bad_log(logging.WARNING, "KV source %s: dropped a malformed request (%.500s)",
                          self.endpoint, exc)
            return
        try:
            answer = self._answer(ident, msg)
        except TransferError as exc:
            answer = Refused(msg.seq, str(exc)[:MAX_ERROR_CHARS])
        except Exception as exc:
            log.exception("KV source %s: request %r failed", self.endpoint, msg)
            why = (f"the context worker at {self.endpoint} failed to serve "
                   f"{type(msg).__name__}: {type(exc).__name__}: {exc}")
            answer = Refused(msg.seq, why[:MAX_ERROR_CHARS])
        if answer is None:
            return
        try:
            self.send(ident, answer)
        except zmq.ZMQError as exc:
            log.info("KV source %s: could not answer: %s", self.endpoint, exc)

    def _answer(self, ident: bytes, msg: Any) -> Any:
        if isinstance(msg, Hello):
            if not isinstance(msg.info, self._plane.peer_info_type):
                raise TransferError(f"a {self.backend} sink says hello with "
                                    f"{type(msg.info).__name__}, expected "
                                    f"{self._plane.peer_info_type.__name__}")
            return Welcome(msg.seq, self._plane.hello(ident, msg.info))
        tid = msg.tid
        with self._lock:
            reg = self._regs.get(tid)
            now = time.monotonic()
            expired = reg is not None and self._regs.expired(reg, now)
            if reg is None or expired:
                why = (f": it expired (kv_transfer_timeout_ms={round(self._timeout_s * 1000)})"
                       if expired else " (released, expired, already pulled or never registered)")
                raise TransferError(f"the context worker at {self.endpoint} no longer holds the "
                                    f"KV for transfer {tid!r}{why}")
            if reg.started is None:              # the transfer's clock starts at its first word
                reg.started = now
            if isinstance(msg, Start):
                return Ack(msg.seq)
            if isinstance(msg, Done):
                reg.pulled = True
                return Ack(msg.seq)
            self._check_frames(tid, reg, msg.frames)
        self._plane.serve(ident, tid, msg.frames)
        return None

    def _check_frames(self, tid: str, reg: _Registration, frames: list) -> None:
        """Every byte range lies in the transfer's blocks (types and bounds: messages.py)."""
        bnb = self._layout.block_nbytes
        for off, n, _ in frames:
            first, last = off // bnb, (off + n - 1) // bnb
            if last - first >= len(reg.blocks) or not all(
                    b in reg.blocks for b in range(first, last + 1)):
                raise TransferError(f"request for bytes {str(frames)[:200]} outside transfer "
                                    f"{tid!r}")
