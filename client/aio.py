"""The asyncio client: one ZeroMQ DEALER socket, one reader task, one queue per request.

Safe for many concurrent requests from one event loop (``asyncio.gather`` of many ``generate``
calls). The reader task routes each broker message to its request's queue and drops messages for
requests this client no longer tracks; every wait is bounded by the call's timeout. A watchdog
task pings a silent broker while requests are in flight and fails them all with
``BrokerUnavailable`` once the broker has been silent for the liveness window
(``client/liveness.py``). Use an
``AsyncClient`` from the event loop that first used it only.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Optional

import zmq
import zmq.asyncio

from broker.protocol import MAX_MESSAGE_BYTES, Accepted, Cancel, Message, Ping, Pong, ProtocolError, decode_all

from .errors import BrokerUnavailable, ClientError, RequestTimeout
from .follow import Follow, move
from .liveness import Liveness
from .request import Chunk, Completion, RequestState, StreamBase, broker_address, check_timeout, prepare_submit

log = logging.getLogger(__name__)


class _Stop:
    """Put in a request's queue when the client can no longer deliver to it."""

    def __init__(self, error: ClientError) -> None:
        self.error = error


class AsyncClient:
    """Asyncio client. ``async with AsyncClient(addr) as c: await c.generate("Hi")``."""

    def __init__(self, address: str, *, timeout: float = 120.0, liveness: float = 5.0,
                 resume: bool = False, curve: Any = None, cluster_name: str = "default",
                 discovery_timeout: float = 10.0) -> None:
        """``timeout``: each call's default, in seconds. ``liveness``: seconds of silence from the
        broker (pinged meanwhile) after which every request in flight fails with the retryable
        ``BrokerUnavailable``. ``resume``: instead, wait (within each request's timeout) for the
        broker to answer again, e.g. after a restart, and continue the request after the tokens
        already received; the stream goes on with no gap and no repeat. ``curve``: a
        ``broker.auth.CurveClient`` (this client's key pair and the broker's public key) when the
        broker runs CURVE; ``broker.auth.curve_client(KEY, SERVER_KEY)``.

        ``address``: the broker's frontend, ``tcp://HOST:PORT``, or ``etcd://HOST:PORT``: the
        etcd server the broker of ``cluster_name`` registered in (``--disagg-cluster-uri``); its
        frontend is read from there (waiting up to ``discovery_timeout`` s for one, blocking), and
        read again whenever the broker stops answering, to follow a broker restarted elsewhere."""
        self._etcd = Follow(address if address.startswith("etcd://") else None, cluster_name)
        self._following: Optional[asyncio.Future] = None  # the etcd lookup running, if one is
        address = broker_address(address, cluster_name, discovery_timeout)
        self.address = address
        self.resume = resume
        self.timeout = check_timeout(timeout, timeout)
        self._live = Liveness(liveness, time.monotonic())
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)   # a larger one drops the peer
        if curve is not None:
            curve.apply(self._sock)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            self._ctx.term()
            raise ClientError(f"cannot connect to broker address {address!r}: {e}") from None
        self._queues: dict[str, asyncio.Queue] = {}      # in-flight request id -> its messages
        self._pings: dict[int, asyncio.Future] = {}
        self._reader: Optional[asyncio.Task] = None
        self._watchdog: Optional[asyncio.Task] = None
        self._lost: set[str] = set()                     # requests already failed as broker-lost
        self._accepted_by: dict[str, str] = {}           # in-flight request id -> broker instance
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.closed = False

    # -- public API ----------------------------------------------------------------------------

    async def generate(self, prompt: Optional[str] = None, *, token_ids: Any = None,
                       messages: Any = None, timeout: Optional[float] = None,
                       request_id: Optional[str] = None, model: Optional[str] = None,
                       **sampling: Any) -> Completion:
        """Run one request to the end and return its completion. ``model``: the model to run on
        (a name a worker announced, as ``/v1/models`` lists them); None: the broker's default
        (the only model up, else ``broker.default_model``, else the first registered)."""
        stream = self._submit(prompt, token_ids, messages, timeout, request_id, sampling, model)
        async with stream:
            async for _ in stream:
                pass
        assert stream.completion is not None
        return stream.completion

    def stream(self, prompt: Optional[str] = None, *, token_ids: Any = None, messages: Any = None,
               timeout: Optional[float] = None, request_id: Optional[str] = None,
               model: Optional[str] = None, **sampling: Any) -> "AsyncStream":
        """Submit now; ``async for chunk in client.stream(...)``. Leaving early (``break``,
        ``aclose()``, the end of ``async with``) cancels the request."""
        return self._submit(prompt, token_ids, messages, timeout, request_id, sampling, model)

    async def chat(self, messages: list[dict], **kw: Any) -> Completion:
        return await self.generate(messages=messages, **kw)

    async def cancel(self, request_id: str) -> None:
        """Ask the broker to stop a request; its stream then ends with finish_reason "cancelled"."""
        self._start()
        await self._await_send(self._send(Cancel(request_id).encode()), self.timeout)

    async def ping(self, timeout: float = 5.0, metrics: bool = False) -> dict:
        """Round trip to the broker; returns its ``Pong.stats`` (with ``metrics``, also the
        Prometheus text under "prometheus"). Raises ``BrokerUnavailable``."""
        self._start()
        timeout = check_timeout(timeout, timeout)
        deadline = time.monotonic() + timeout
        nonce = random.getrandbits(62)
        pong = self._pings[nonce] = self._loop.create_future()
        try:
            await self._await_send(self._send(Ping(nonce, metrics).encode()), timeout)
            return dict(await asyncio.wait_for(pong, max(0.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            raise BrokerUnavailable(f"no answer from the broker at {self.address} to ping "
                                    f"within {timeout:g} s") from None
        finally:
            self._pings.pop(nonce, None)

    async def close(self) -> None:
        """Stop the reader, fail waiting calls, close the socket and context (linger 0)."""
        if self.closed:
            return
        if self._reader is not None:
            for task in (self._watchdog, self._reader):
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        else:
            await asyncio.sleep(0)   # let cancels scheduled by finalizers go out first
        self.closed = True
        self._stop_all(ClientError("client is closed"))
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- internals used by AsyncStream --------------------------------------------------------

    def _start(self) -> None:
        if self.closed:
            raise ClientError("client is closed")
        if self._reader is None:
            self._loop = asyncio.get_running_loop()
            self._reader = self._loop.create_task(self._read_loop())
            self._watchdog = self._loop.create_task(self._watch_loop())

    def in_flight(self, request_id: str) -> bool:
        """Whether a request of this id is in flight on this client (a second one is refused)."""
        return request_id in self._queues

    def _submit(self, prompt, token_ids, messages, timeout, request_id, sampling, model=None) -> "AsyncStream":
        self._start()
        submit, timeout, frames = prepare_submit(prompt, token_ids, messages, timeout, self.timeout,
                                                 request_id, sampling, self._queues, self.resume, model)
        rid = submit.request_id
        if not self._queues:
            self._live.start_waiting(time.monotonic())
        self._queues[rid] = asyncio.Queue()
        return AsyncStream(self, RequestState(rid, submit if self.resume else None),
                           time.monotonic() + timeout, timeout, self._send(frames))

    async def _next_message(self, state: RequestState, deadline: float, timeout: float) -> Message:
        """The next broker message for this request, or a timeout error."""
        rid = state.request_id
        queue = self._queues.get(rid)
        if queue is None:
            raise ClientError("client is closed")
        try:
            if queue.empty():
                item = await asyncio.wait_for(queue.get(), deadline - time.monotonic())
            else:
                item = queue.get_nowait()
        except asyncio.TimeoutError:
            if not state.heard:
                raise BrokerUnavailable(f"no answer from the broker at {self.address} to request "
                                        f"{rid} within {timeout:g} s", rid) from None
            raise RequestTimeout(f"request {rid} did not finish within {timeout:g} s; cancelled",
                                 rid) from None
        if isinstance(item, _Stop):
            raise item.error
        return item

    async def _resume(self, state: RequestState, deadline: float, error: ClientError) -> None:
        """Send the request again as a continuation once the broker answers; re-raises ``error``
        when the request's deadline passes first."""
        rid = state.request_id
        log.warning("request %s: %s; resuming it after %d tokens", rid, error, len(state.token_ids))
        if state.resumes:       # a refusal of the last resume (no worker yet): give it a moment
            await asyncio.sleep(max(0.0, min(self._live.every, deadline - time.monotonic())))
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or rid not in self._queues:
                raise error
            await self._follow(left)
            left = deadline - time.monotonic()      # the lookup may have taken some of it
            if left <= 0:
                raise error
            try:
                await self.ping(timeout=min(self._live.window, left))
                break
            except BrokerUnavailable:
                continue
        self._lost.discard(rid)      # its queue keeps what came after the loss (a slow broker goes on)
        self._accepted_by.pop(rid, None)
        left = max(0.001, deadline - time.monotonic())
        await self._await_send(self._send(state.resume_frames(left)), left)

    def _release(self, state: RequestState, deferred: bool = False) -> None:
        """Forget a request; cancel it at the broker unless the broker already finished it.
        ``deferred``: called from a finalizer, which may run anywhere (even inside a send)."""
        self._lost.discard(state.request_id)
        self._accepted_by.pop(state.request_id, None)
        if self._queues.pop(state.request_id, None) is None or self.closed or state.finished:
            return
        frames = Cancel(state.request_id).encode()
        if not deferred:
            self._send(frames)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._send_if_open, frames)

    # -- socket I/O ----------------------------------------------------------------------------

    def _send(self, frames: list) -> asyncio.Future:
        """Start a send (pyzmq sends at once when it can); the future is safe to leave unawaited."""
        fut = self._sock.send_multipart(frames)
        fut.add_done_callback(_consume_exception)
        return fut

    def _send_if_open(self, frames: list) -> None:
        if not self.closed:
            self._send(frames)

    async def _await_send(self, fut: asyncio.Future, timeout: float) -> None:
        if fut.done():
            fut.result()
            return
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable(f"cannot send to the broker at {self.address} "
                                    f"within {timeout:g} s") from None

    async def _read_loop(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart()
                self._live.on_message(time.monotonic())
                try:
                    msgs = decode_all(frames)
                except ProtocolError as e:
                    msgs = [e]
                for msg in msgs:     # one message, or a batch
                    if isinstance(msg, ProtocolError):
                        log.warning("dropped an undecodable message from the broker: %s", msg)
                    elif isinstance(msg, Pong):
                        self._lose(self._live.restarted(self._accepted_by, msg.stats.get("instance")),
                                   self._live.restart_error)
                        pong = self._pings.get(msg.nonce)
                        if pong is not None and not pong.done():
                            pong.set_result(msg.stats)
                    else:
                        if isinstance(msg, Accepted) and msg.request_id in self._queues:
                            self._accepted_by[msg.request_id] = msg.broker
                        queue = self._queues.get(getattr(msg, "request_id", None))
                        if queue is not None:
                            queue.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket failed: every waiting call gets a clear error
            log.error("reader for the broker at %s stopped: %s", self.address, e)
            self._stop_all(ClientError(f"connection to the broker at {self.address} failed: {e}"))
            self.closed = True

    async def _watch_loop(self) -> None:
        """Ping a silent broker while requests are in flight; past the liveness window, fail them."""
        live = self._live
        while True:
            now = time.monotonic()
            waiting = [rid for rid in self._queues if rid not in self._lost]
            if not waiting:
                await asyncio.sleep(live.every)
                continue
            if live.lost(now):
                log.warning("the broker at %s stopped answering (%g s); failing %d requests",
                            self.address, live.window, len(waiting))
                self._lose(waiting, live.error)
                live.start_waiting(now)       # a fresh window for what comes next
                await self._follow(live.window)
            elif live.ping_due(now):
                self._send(Ping().encode())
            await asyncio.sleep(live.next_check(now))

    async def _follow(self, timeout: float) -> None:
        """With an etcd:// address: connect to where the broker's key points now, if it moved.
        One lookup at a time, off the event loop (etcd is asked over blocking HTTP), at most every
        ``FOLLOW_EVERY_S`` (client/follow.py); a caller finding one running waits for it, up to
        ``timeout`` s (it goes on under etcd's own call deadline)."""
        if self._etcd.start(time.monotonic()):
            try:
                self._following = asyncio.get_running_loop().run_in_executor(None, self._etcd.lookup)
            except RuntimeError:          # the loop's executor is shut down: no lookup ran
                self._etcd.end(time.monotonic(), None, self.address)
                return
            self._following.add_done_callback(self._followed)    # runs before any waiter resumes
        if self._following is not None and not self._following.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._following), timeout)
            except Exception:          # its end is handled (and logged) by _followed
                pass

    def _followed(self, lookup: asyncio.Future) -> None:
        """The lookup ended (on the event loop): move if etcd names another frontend."""
        failed = lookup.cancelled() or lookup.exception() is not None
        if failed and not lookup.cancelled():
            log.warning("etcd lookup of the broker failed: %r", lookup.exception())
        found = None if failed else lookup.result()
        new = self._etcd.end(time.monotonic(), found, self.address)
        if new is not None and not self.closed:
            self.address = move(self._sock, self.address, new)

    def _lose(self, rids: list, error) -> None:
        """These requests are lost with their broker: each fails when its caller reads it."""
        for rid in rids:
            queue = self._queues.get(rid)
            if queue is not None and rid not in self._lost:
                queue.put_nowait(_Stop(error(self.address, rid)))
                self._lost.add(rid)
            self._accepted_by.pop(rid, None)

    def _stop_all(self, error: ClientError) -> None:
        for queue in self._queues.values():
            queue.put_nowait(_Stop(error))
        for pong in self._pings.values():
            if not pong.done():
                pong.set_exception(error)


class AsyncStream(StreamBase):
    """The chunks of one streamed request, in order. After the last chunk, ``completion`` holds
    the finish reason, usage and timings. Leaving before the end cancels the request."""

    def __init__(self, client: AsyncClient, state: RequestState, deadline: float, timeout: float,
                 sent: asyncio.Future) -> None:
        super().__init__(client, state, deadline, timeout)
        self._sent: Optional[asyncio.Future] = sent

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Chunk:
        state = self._state
        try:
            if self._sent is not None:
                sent, self._sent = self._sent, None
                await self._client._await_send(sent, max(0.0, self._deadline - time.monotonic()))
            while not self._closed and not state.done:
                try:
                    chunk = state.feed(await self._client._next_message(state, self._deadline,
                                                                        self._timeout))
                except ClientError as e:
                    if not state.resumable(e):
                        raise
                    await self._client._resume(state, self._deadline, e)
                    continue
                if chunk is not None:
                    return chunk
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopAsyncIteration

    def close(self, _deferred: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._client._release(self._state, _deferred)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close(_deferred=True)
        except Exception:   # a finalizer must not raise (loop closed, interpreter shutdown)
            pass


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
