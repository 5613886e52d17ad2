"""The broker's I/O loop: two ROUTER sockets, frames in, state calls, frames out.

It only turns frames into ``BrokerState`` calls and the state's decisions into frames; every
lifecycle decision lives in ``broker/state.py``. It never imports torch or transfer/, and KV bytes
never pass through it.
"""
from __future__ import annotations

import gc
import logging
import threading
from typing import Optional, Sequence

import zmq

from broker import protocol as p
from broker.auth import CLIENTS, WORKERS, CurveServer, warn_exposed
from broker.config import BrokerConfig, Routing
from broker.ratelog import RateLimitedLog
from broker.state import FRONT, BrokerState, Out

log = logging.getLogger("broker")

# ---------------------------------------------------------------------------------------------
# cheap multipart send and receive
#
# The broker moves a dozen messages per request, so these are its hot path. pyzmq's
# send_multipart/recv_multipart spend most of their 10-15 us a message in Python: flag enums per
# frame, and a getsockopt(RCVMORE) per frame that converts the option to an enum (2-3 us alone on
# a small VM). Here the Cython socket methods take int flags, and a frame received with
# copy=False carries its RCVMORE bit in ``Frame.more``, so no getsockopt is needed. They are
# pyzmq's base-class methods, not its documented API: a pyzmq without them falls back to the
# public methods (the same behaviour, slower).

_SNDMORE_NB, _NB = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)
try:
    from zmq.backend import Socket as _BaseSocket
    if not issubclass(zmq.Socket, _BaseSocket):
        raise ImportError("zmq.Socket does not derive from zmq.backend.Socket")
    _raw_send, _raw_recv = _BaseSocket.send, _BaseSocket.recv
except (ImportError, AttributeError):   # pragma: no cover - depends on the pyzmq build
    def _raw_send(sock, data, flags, copy, track):
        return zmq.Socket.send(sock, data, flags, copy=copy, track=track)

    def _raw_recv(sock, flags, copy, track):
        return zmq.Socket.recv(sock, flags, copy=copy, track=track)


def send_frames(sock: zmq.Socket, frames: Sequence[bytes]) -> None:
    """Send a multipart message without blocking (raises zmq.Again at the high-water mark, and
    zmq.ZMQError for an unroutable peer on a ROUTER_MANDATORY socket)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _raw_send(sock, f, _SNDMORE_NB if i < last else _NB, True, False)


def recv_frames(sock: zmq.Socket) -> Optional[list]:
    """One whole multipart message (a list of bytes) if one is waiting, else None."""
    try:
        frame = _raw_recv(sock, _NB, False, False)
    except zmq.Again:   # once per drain: cheaper than asking EVENTS before every message
        return None
    parts = [frame.bytes]
    while frame.more:
        frame = _raw_recv(sock, _NB, False, False)
        parts.append(frame.bytes)
    return parts


# A turn of the loop drains at most DRAIN_LIMIT ZeroMQ messages from each socket (so one busy side
# cannot starve the other or the timers), and sends what it has produced whenever that reaches
# FLUSH_AFTER messages. Batching makes a message cheap, but holding a whole turn's output turns the
# requests in flight into one convoy: the broker sits idle while workers and clients answer the
# whole wave at once. Flushing every ~128 messages keeps them working while the broker goes on
# (measured with bench.broker: about 75% of a core busy when flushing once per turn, 95-99% at
# 128, with the cost per request unchanged).
DRAIN_LIMIT = 1000
FLUSH_AFTER = 128


def normalize_endpoint(addr: str) -> str:
    """Accept ``tcp://HOST:0`` for "any free port" as well as ZeroMQ's ``tcp://HOST:*``."""
    if addr.startswith("tcp://") and addr.endswith(":0"):
        return addr[:-2] + ":*"
    return addr


class BrokerServer:
    """Binds the frontend (clients) and backend (workers) ROUTERs; ``run()`` serves until stopped."""

    def __init__(self, frontend: str = "tcp://127.0.0.1:*", backend: str = "tcp://127.0.0.1:*",
                 config: BrokerConfig = BrokerConfig(), ctx: Optional[zmq.Context] = None,
                 curve: Optional[CurveServer] = None, minimum: Optional[dict] = None,
                 routing: Routing = Routing()):
        """``minimum``: role -> workers that must be up (not draining) before a request is
        accepted (``disagg_cluster.minimal_instances``); until then Submit gets the retryable
        NO_WORKERS. None: no minimum. ``routing``: the routers and conditional disaggregation."""
        # CURVE needs a ZAP handler of its own context: one per context, so never the shared one
        self._own_ctx = ctx is None and curve is not None
        self.ctx = ctx or (zmq.Context() if curve is not None else zmq.Context.instance())
        self.curve = curve.start(self.ctx) if curve is not None else None
        self.state = BrokerState(config, routing=routing)
        self.state.pool.minimum = dict(minimum or {})
        log.info("routers: context servers %s, generation servers %s; conditional disaggregation %s",
                 routing.context.type, routing.generation.type,
                 "off" if routing.max_local_prefill_length is None
                 else f"up to {routing.max_local_prefill_length} uncached tokens")
        self.max_message_bytes = config.max_message_bytes
        self._bad_log = RateLimitedLog(log, "malformed messages")
        self.front: Optional[zmq.Socket] = None
        self.front = self._bind(normalize_endpoint(frontend), CLIENTS)
        try:
            self.back = self._bind(normalize_endpoint(backend), WORKERS)
        except OSError:
            self.front.close(0)
            self._stop_auth()
            raise
        self.frontend = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        if curve is None:
            warn_exposed([self.frontend, self.backend], "CURVE authentication",
                         "set auth.curve_key, auth.client_keys and auth.worker_keys (README: Authentication)")
        self._stop = threading.Event()

    def _bind(self, addr: str, domain: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        if self.curve is not None:
            self.curve.apply(s, domain)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unreachable peer raises instead of vanishing
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.SNDTIMEO, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)   # a larger one drops its sender
        try:
            s.bind(addr)
        except zmq.ZMQError as e:
            s.close()
            if self.front is None:     # the first socket: nothing else to close
                self._stop_auth()
            raise OSError(f"cannot bind {addr}: {e}") from e
        return s

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.front.close(0)
        self.back.close(0)
        self._stop_auth()

    def _stop_auth(self) -> None:
        if self.curve is not None:
            self.curve.stop()
        if self._own_ctx:
            self.ctx.term()
            self._own_ctx = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        state = self.state
        quiet_gc()
        self._send(state.tick())
        while not self._stop.is_set():
            timeout_ms = min(200, max(1, int(state.next_timer() * 1000) + 1))
            ready = dict(poller.poll(timeout_ms))
            # Drain each ready socket in a bounded batch (so one busy side cannot starve the other
            # or the timers), then send everything the batch produced.
            out: list = []
            if self.back in ready:
                self._drain(self.back, state.on_worker, out, DRAIN_LIMIT)
            if self.front in ready:
                self._drain(self.front, state.on_client, out, DRAIN_LIMIT)
            out.extend(state.tick())
            if out:
                self._send(out)

    def _drain(self, sock: zmq.Socket, handler, out: list, limit: int) -> int:
        """Receive and handle up to ``limit`` waiting ZeroMQ messages (each one message or a
        batch); their replies go to ``out``."""
        n = 0
        decode_all, bad = p.decode_all, p.ProtocolError
        while n < limit:
            frames = recv_frames(sock)
            if frames is None:
                break
            n += 1
            if len(frames) < 2:
                continue
            identity = frames[0]
            try:
                msgs = decode_all(frames[1:])
            except bad as e:
                self._malformed(sock, identity, e, out)
                continue
            except Exception as e:   # a decoder bug: no peer may stop the loop with it
                self._malformed(sock, identity, p.ProtocolError(f"{type(e).__name__}: {e}"), out)
                continue
            for msg in msgs:
                if type(msg) is bad:
                    self._malformed(sock, identity, msg, out)
                    continue
                try:
                    out.extend(handler(identity, msg))
                except Exception:   # a bug must not take the whole broker down with every request in it
                    log.exception("error handling %s from %s", type(msg).__name__, identity.hex())
            if len(out) >= FLUSH_AFTER:
                self._send(out)
                out.clear()
        return n

    def _malformed(self, sock: zmq.Socket, identity: bytes, e: p.ProtocolError, out: list) -> None:
        side = "client" if sock is self.front else "worker"
        self._bad_log(logging.WARNING, "dropping malformed message from %s %s: %.500s", side,
                      identity.hex(), e)
        if sock is self.front:
            rid = e.request_id
            out.append(Out(FRONT, identity, p.Error(rid, p.Code.INVALID_REQUEST if rid else p.Code.PROTOCOL,
                                                    str(e))))

    def _send(self, outs: list[Out]) -> None:
        # Everything for one peer goes as one ZeroMQ message (a batch when there is more than
        # one), in the order it was produced: under load the loop drains many messages per turn,
        # and one send per peer instead of one per message is most of the broker's I/O saved.
        groups: dict = {}
        for o in outs:
            key = (o.socket, o.identity)
            g = groups.get(key)
            if g is None:
                groups[key] = [o.msg]
            else:
                g.append(o.msg)
        gone_clients: list = []
        gone_workers: list = []
        front, back = self.front, self.back
        for (side, ident), msgs in groups.items():
            try:
                for frames in p.encode_batches(msgs):
                    send_frames(front if side == FRONT else back, [ident, *frames])
            except zmq.ZMQError as e:
                (gone_clients if side == FRONT else gone_workers).append(ident)
                log.debug("cannot send %d message(s) to %s: %s", len(msgs), ident.hex(), e)
            except Exception:    # an unencodable message is a bug; the loop goes on
                log.exception("cannot encode %d message(s) to %s", len(msgs), ident.hex())
        for ident in gone_clients:
            self._send(self.state.client_gone(ident))
        for ident in gone_workers:
            w = self.state.workers.get(ident)
            if w is not None:
                self._send(self.state.on_worker(ident, p.Disconnect("unreachable")))


def quiet_gc() -> None:
    """Make Python's cycle collector rare: the broker allocates a few dicts per message and
    almost never a cycle, yet with the default threshold (a collection every 700 allocations) a
    busy broker spent about a fifth of its time collecting. Objects alive at start-up are moved
    out of the collector's sight for good (gc.freeze)."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(50_000, g1, g2)
