"""The broker's I/O loop: two ROUTER sockets, frames in, state calls, frames out.

It only turns frames into ``BrokerState`` calls and the state's decisions into frames; every
lifecycle decision lives in ``broker/state.py``. It never imports torch or transfer/, and KV bytes
never pass through it.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import zmq

from broker import protocol as p
from broker.config import BrokerConfig
from broker.state import FRONT, BrokerState, Out

log = logging.getLogger("broker")


def normalize_endpoint(addr: str) -> str:
    """Accept ``tcp://HOST:0`` for "any free port" as well as ZeroMQ's ``tcp://HOST:*``."""
    if addr.startswith("tcp://") and addr.endswith(":0"):
        return addr[:-2] + ":*"
    return addr


class BrokerServer:
    """Binds the frontend (clients) and backend (workers) ROUTERs; ``run()`` serves until stopped."""

    def __init__(self, frontend: str = "tcp://127.0.0.1:*", backend: str = "tcp://127.0.0.1:*",
                 config: BrokerConfig = BrokerConfig(), ctx: Optional[zmq.Context] = None):
        self.ctx = ctx or zmq.Context.instance()
        self.state = BrokerState(config)
        self.front = self._bind(normalize_endpoint(frontend))
        self.back = self._bind(normalize_endpoint(backend))
        self.frontend = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self.dropped = 0   # malformed messages logged and dropped

    def _bind(self, addr: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unreachable peer raises instead of vanishing
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.SNDTIMEO, 0)
        try:
            s.bind(addr)
        except zmq.ZMQError as e:
            s.close()
            raise OSError(f"cannot bind {addr}: {e}") from e
        return s

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.front.close(0)
        self.back.close(0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        self._send(self.state.tick())
        while not self._stop.is_set():
            timeout_ms = min(200, max(1, int(self.state.next_timer() * 1000) + 1))
            events = dict(poller.poll(timeout_ms))
            # drain in bounded batches so one busy side cannot starve the other or the timers
            if self.back in events:
                for _ in range(1000):
                    if not self._recv(self.back, self.state.on_worker):
                        break
            if self.front in events:
                for _ in range(1000):
                    if not self._recv(self.front, self.state.on_client):
                        break
            self._send(self.state.tick())

    def _recv(self, sock: zmq.Socket, handler) -> bool:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False
        if len(frames) < 2:
            return True
        identity, body = frames[0], frames[1:]
        try:
            msg = p.decode(body)
        except p.ProtocolError as e:
            self.dropped += 1
            side = "client" if sock is self.front else "worker"
            log.warning("dropping malformed message from %s %s: %s", side, identity.hex(), e)
            if sock is self.front:
                rid = _request_id_of(body)
                self._send([Out(FRONT, identity, p.Error(rid, p.Code.INVALID_REQUEST
                                                         if rid else p.Code.PROTOCOL, str(e)))])
            return True
        try:
            self._send(handler(identity, msg))
        except Exception:   # a bug must not take the whole broker down with every request in it
            log.exception("error handling %s from %s", type(msg).__name__, identity.hex())
        return True

    def _send(self, outs: list[Out]) -> None:
        gone_clients: set = set()
        gone_workers: set = set()
        for o in outs:
            sock = self.front if o.socket == FRONT else self.back
            try:
                sock.send_multipart([o.identity, *o.msg.encode()], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if o.socket == FRONT:
                    gone_clients.add(o.identity)
                else:
                    gone_workers.add(o.identity)
                log.debug("cannot send %s to %s: %s", type(o.msg).__name__, o.identity.hex(), e)
        for ident in gone_clients:
            self._send(self.state.client_gone(ident))
        for ident in gone_workers:
            w = self.state.workers.get(ident)
            if w is not None:
                self._send(self.state.on_worker(ident, p.Disconnect("unreachable")))


def _request_id_of(body: list) -> str:
    """Best effort: the request id of a Submit whose body was rejected, so the client can match it."""
    try:
        import msgpack
        d = msgpack.unpackb(body[2], raw=False)
        rid = d.get("request_id") if isinstance(d, dict) else None
        return rid if isinstance(rid, str) else ""
    except Exception:
        return ""
