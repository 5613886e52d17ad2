"""The synchronous client: one ZeroMQ DEALER socket to the broker's frontend, many requests.

Not thread-safe: use one ``Client`` per thread (or ``AsyncClient``). Every receive polls with the
time left of the call, so nothing waits forever; while it waits for a request it pings a silent
broker and fails every request in flight with ``BrokerUnavailable`` once the broker has been
silent for the liveness window (``client/liveness.py``). Messages for other in-flight requests (a stream
the caller has not finished reading) are buffered per request until read; messages for requests
this client no longer tracks are dropped.
"""
from __future__ import annotations

import collections
import logging
import math
import random
import time
from typing import Any, Callable, Iterator, Optional

import zmq

from broker.protocol import (MAX_MESSAGE_BYTES, Accepted, Cancel, DrainWorker, Message, Ping, Pong, ProtocolError,
                             decode_all)

from .errors import BrokerUnavailable, ClientError, RequestTimeout
from .follow import Follow, move
from .liveness import Liveness
from .request import Chunk, Completion, RequestState, StreamBase, broker_address, check_timeout, prepare_submit

log = logging.getLogger(__name__)

_LOST = object()     # what _receive returns when the broker's liveness window passed
_QUEUED = object()   # ... when the request waited for has a message in its inbox (a loss)


class Client:
    """Synchronous client. ``with Client("tcp://127.0.0.1:5555") as c: c.generate("Hi")``."""

    def __init__(self, address: str, *, timeout: float = 120.0, liveness: float = 5.0,
                 resume: bool = False, curve: Any = None, cluster_name: str = "default",
                 discovery_timeout: float = 10.0) -> None:
        """The arguments mean what they mean for ``AsyncClient`` (client/aio.py)."""
        self._etcd = Follow(address if address.startswith("etcd://") else None, cluster_name)
        address = broker_address(address, cluster_name, discovery_timeout)
        self.address = address
        self.resume = resume
        self.timeout = check_timeout(timeout, timeout)
        self._live = Liveness(liveness, time.monotonic())
        self._inbox: dict[str, collections.deque] = {}   # in-flight request id -> unread messages
        self._accepted_by: dict[str, str] = {}           # in-flight request id -> broker instance
        self._sending = False
        self._deferred: list[list] = []                  # frames to send once a send finishes
        self.closed = False
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)   # a larger one drops the peer
        if curve is not None:
            curve.apply(self._sock)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as e:
            self.close()
            raise ClientError(f"cannot connect to broker address {address!r}: {e}") from None

    # -- public API ----------------------------------------------------------------------------

    def generate(self, prompt: Optional[str] = None, *, token_ids: Any = None, messages: Any = None,
                 timeout: Optional[float] = None, request_id: Optional[str] = None,
                 model: Optional[str] = None, **sampling: Any) -> Completion:
        """Run one request to the end and return its completion."""
        stream = self._submit(prompt, token_ids, messages, timeout, request_id, sampling, model)
        with stream:
            for _ in stream:
                pass
        assert stream.completion is not None
        return stream.completion

    def stream(self, prompt: Optional[str] = None, *, token_ids: Any = None, messages: Any = None,
               timeout: Optional[float] = None, request_id: Optional[str] = None,
               model: Optional[str] = None, **sampling: Any) -> "Stream":
        """Submit now; iterate the returned ``Stream`` for chunks. Closing it early (``break`` out
        of a ``for`` over it, ``close()``, or leaving its ``with`` block) cancels the request."""
        return self._submit(prompt, token_ids, messages, timeout, request_id, sampling, model)

    def chat(self, messages: list[dict], **kw: Any) -> Completion:
        return self.generate(messages=messages, **kw)

    def cancel(self, request_id: str) -> None:
        """Ask the broker to stop a request; its stream then ends with finish_reason "cancelled"."""
        self._check_open()
        self._send(Cancel(request_id).encode(), self.timeout)

    def ping(self, timeout: float = 5.0, metrics: bool = False) -> dict:
        """Round trip to the broker; returns its ``Pong.stats`` (with ``metrics``, also the
        Prometheus text under "prometheus"). Raises ``BrokerUnavailable``."""
        return dict(self._round_trip(lambda nonce: Ping(nonce, metrics), timeout, "ping").stats)

    def drain_worker(self, worker_id: str, timeout: float = 5.0) -> int:
        """Ask the broker to drain the worker(s) registered as ``worker_id`` (``worker drain
        --worker-id``): it dispatches nothing more to them, and each finishes what it holds, then
        leaves. Returns how many registered workers have that id (0: none). Raises
        ``BrokerUnavailable``."""
        pong = self._round_trip(lambda nonce: DrainWorker(worker_id, nonce), timeout, f"drain {worker_id!r}")
        return int(pong.stats.get("draining", 0))

    def _round_trip(self, make, timeout: float, what: str) -> Pong:
        """Send ``make(nonce)`` and wait for the ``Pong`` with that nonce; raises
        ``BrokerUnavailable`` naming ``what`` after ``timeout`` s."""
        self._check_open()
        timeout = check_timeout(timeout, timeout)
        deadline = time.monotonic() + timeout
        nonce = random.getrandbits(62)
        self._send(make(nonce).encode(), timeout)
        pong = self._receive(lambda m: isinstance(m, Pong) and m.nonce == nonce, deadline)
        if pong is None:
            raise BrokerUnavailable(f"no answer from the broker at {self.address} to {what} "
                                    f"within {timeout:g} s")
        return pong

    def close(self) -> None:
        """Close the socket and context at once (linger 0); in-flight requests are abandoned."""
        self.closed = True
        self._inbox.clear()
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals used by Stream -------------------------------------------------------------

    def _submit(self, prompt, token_ids, messages, timeout, request_id, sampling, model=None) -> "Stream":
        self._check_open()
        submit, timeout, frames = prepare_submit(prompt, token_ids, messages, timeout, self.timeout,
                                                 request_id, sampling, self._inbox, self.resume, model)
        rid = submit.request_id
        deadline = time.monotonic() + timeout
        if not self._inbox:
            self._live.start_waiting(time.monotonic())
        self._inbox[rid] = collections.deque()
        try:
            self._send(frames, timeout)
        except BaseException:
            del self._inbox[rid]
            raise
        return Stream(self, RequestState(rid, submit if self.resume else None), deadline, timeout)

    def _next_message(self, state: RequestState, deadline: float, timeout: float) -> Message:
        """The next broker message for this request, or a timeout error."""
        rid = state.request_id
        while True:
            queued = self._inbox.get(rid)
            if queued:
                msg = queued.popleft()
                if isinstance(msg, BrokerUnavailable):
                    raise msg
                return msg
            msg = self._receive(lambda m: getattr(m, "request_id", None) == rid, deadline, live=rid)
            if msg is _LOST:     # every request in flight fails, each when its caller reads it
                self._lose(list(self._inbox), self._live.error)
                self._follow()
                self._live.start_waiting(time.monotonic())     # a fresh window for what comes next
            elif msg is not _QUEUED:
                break
        if msg is not None:
            return msg
        if not state.heard:
            raise BrokerUnavailable(f"no answer from the broker at {self.address} to request "
                                    f"{rid} within {timeout:g} s", rid)
        raise RequestTimeout(f"request {rid} did not finish within {timeout:g} s; cancelled", rid)

    def _resume(self, state: RequestState, deadline: float, error: ClientError) -> None:
        """Send the request again as a continuation once the broker answers; re-raises ``error``
        when the request's deadline passes first."""
        log.warning("request %s: %s; resuming it after %d tokens", state.request_id, error,
                    len(state.token_ids))
        if state.resumes:       # a refusal of the last resume (no worker yet): give it a moment
            time.sleep(max(0.0, min(self._live.every, deadline - time.monotonic())))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise error
            self._follow()
            try:
                self.ping(timeout=min(self._live.window, left))
                break
            except BrokerUnavailable:
                continue
        # keep what came after the loss (a broker that was only slow goes on streaming), not the loss
        rid = state.request_id
        self._inbox[rid] = collections.deque(m for m in self._inbox.get(rid, ())
                                             if not isinstance(m, BrokerUnavailable))
        self._accepted_by.pop(rid, None)
        left = max(0.001, deadline - time.monotonic())
        self._send(state.resume_frames(left), left)

    def _release(self, state: RequestState) -> None:
        """Forget a request; cancel it at the broker unless the broker already finished it."""
        self._accepted_by.pop(state.request_id, None)
        if self._inbox.pop(state.request_id, None) is None or self.closed:
            return
        if not state.finished:
            frames = Cancel(state.request_id).encode()
            if self._sending:   # called from a finalizer in the middle of a multipart send
                self._deferred.append(frames)
            else:
                self._send(frames, self.timeout, quiet=True)

    # -- socket I/O ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ClientError("client is closed")

    def _send(self, frames: list, timeout: float, quiet: bool = False) -> None:
        """Send without ever blocking longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        self._sending = True
        try:
            while True:
                try:
                    self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._sock.poll(_ms(left), zmq.POLLOUT):
                        if quiet:
                            log.warning("could not send to the broker at %s; dropped", self.address)
                            return
                        raise BrokerUnavailable(f"cannot send to the broker at {self.address} "
                                                f"within {timeout:g} s") from None
        finally:
            self._sending = False
        while self._deferred:
            self._send(self._deferred.pop(0), timeout, quiet=True)

    def _follow(self) -> None:
        """With an etcd:// address: connect to where the broker's key points now, if it moved
        (looked up at most every ``FOLLOW_EVERY_S``, client/follow.py)."""
        if not self._etcd.start(time.monotonic()):
            return
        found = None
        try:
            found = self._etcd.lookup()
        finally:
            new = self._etcd.end(time.monotonic(), found, self.address)
        if new is not None:
            self.address = move(self._sock, self.address, new)

    def _lose(self, rids: list, error: Callable[[str, str], BrokerUnavailable]) -> None:
        """These requests are lost with their broker: each fails when its caller reads it."""
        for rid in rids:
            queue = self._inbox.get(rid)
            if queue is not None:
                queue.append(error(self.address, rid))
            self._accepted_by.pop(rid, None)

    def _receive(self, wanted: Callable[[Message], bool], deadline: float,
                 live: Optional[str] = None) -> Any:
        """Read until a message satisfies ``wanted`` (returned) or the deadline passes (None).
        With ``live`` (the request waited for), ping a silent broker; return ``_LOST`` once its
        liveness window passed, ``_QUEUED`` once that request has a message in its inbox.
        Messages for other in-flight requests are buffered; anything else is dropped."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            wait = deadline - now
            if live is not None:
                if self._live.ping_due(now):
                    self._send(Ping().encode(), self._live.every, quiet=True)
                wait = min(wait, self._live.next_check(now))
            if not self._sock.poll(_ms(wait), zmq.POLLIN):
                if live is not None and self._live.lost(time.monotonic()):
                    return _LOST
                continue
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            self._live.on_message(time.monotonic())
            try:
                msgs = decode_all(frames)
            except ProtocolError as e:
                msgs = [e]
            found = None
            for msg in msgs:     # one message, or a batch: every one is kept, in order
                if isinstance(msg, ProtocolError):
                    log.warning("dropped an undecodable message from the broker: %s", msg)
                    continue
                if isinstance(msg, Accepted) and msg.request_id in self._inbox:
                    self._accepted_by[msg.request_id] = msg.broker
                elif isinstance(msg, Pong):
                    self._lose(self._live.restarted(self._accepted_by, msg.stats.get("instance")),
                               self._live.restart_error)
                if found is None and wanted(msg):
                    found = msg
                else:
                    queued = self._inbox.get(getattr(msg, "request_id", None))
                    if queued is not None:
                        queued.append(msg)
            if found is not None:
                return found
            if live is not None and self._inbox.get(live):
                return _QUEUED


class Stream(StreamBase):
    """The chunks of one streamed request, in order. After the last chunk, ``completion`` holds
    the finish reason, usage and timings. ``close()`` before the end cancels the request."""

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        state = self._state
        try:
            while not self._closed and not state.done:
                try:
                    chunk = state.feed(self._client._next_message(state, self._deadline, self._timeout))
                except ClientError as e:
                    if not state.resumable(e):
                        raise
                    self._client._resume(state, self._deadline, e)
                    continue
                if chunk is not None:
                    return chunk
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self._state)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:   # a finalizer must not raise (interpreter shutdown, closed client)
            pass


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
