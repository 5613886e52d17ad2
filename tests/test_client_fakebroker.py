"""A scripted fake of the broker's frontend for the client tests (no tests of its own here).

``FakeBroker(handler)`` binds a ROUTER to tcp://127.0.0.1:* on its own thread, records every
message it receives, answers Ping (unless told not to), and calls ``handler(broker, ident, msg)``
for the rest. Handlers run on the broker thread and answer with ``broker.send(ident, *msgs)``.
"""
from __future__ import annotations

import socket
import threading
from typing import Callable, Optional

import pytest
import zmq

from broker.protocol import (Accepted, Cancel, Final, Message, Ping, Pong, ProtocolError, Submit,
                             Tokens, decode)

TIMINGS = {"queue": 0.001, "prefill": 0.01, "kv_transfer": 0.002, "ttft": 0.02, "total": 0.05}


class FakeBroker:
    def __init__(self, handler: Optional[Callable] = None, *, answer_pings: bool = True) -> None:
        self.handler = handler
        self.answer_pings = answer_pings
        self.received: list[Message] = []
        self.address = ""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._sock = None
        self._thread = threading.Thread(target=self._run, name="fake-broker", daemon=True)

    def start(self) -> "FakeBroker":
        self._thread.start()
        assert self._ready.wait(5), "fake broker did not start"
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "fake broker thread did not stop"
        if self._error:
            raise self._error

    def send(self, ident: bytes, *msgs: Message) -> None:
        for m in msgs:
            self._sock.send_multipart([ident, *m.encode()])

    def send_raw(self, ident: bytes, frames: list) -> None:
        self._sock.send_multipart([ident, *frames])

    def wait_for(self, pred: Callable[[Message], bool], timeout: float = 5.0) -> Message:
        """The first received message matching ``pred``, waiting up to ``timeout``."""
        def find():
            return next((m for m in self.received if pred(m)), None)
        with self._cond:
            assert self._cond.wait_for(lambda: find() is not None, timeout), \
                f"fake broker never received the expected message; got {self.received}"
            return find()

    def of_type(self, cls: type) -> list:
        with self._cond:
            return [m for m in self.received if isinstance(m, cls)]

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = self._sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind("tcp://127.0.0.1:*")
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._ready.set()
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                ident, *frames = sock.recv_multipart()
                try:
                    msg = decode(frames)
                except ProtocolError as e:   # the client must never send these
                    self._error = AssertionError(f"client sent an undecodable message: {e}")
                    continue
                with self._cond:
                    self.received.append(msg)
                    self._cond.notify_all()
                if isinstance(msg, Ping) and self.answer_pings:
                    self.send(ident, Pong(msg.nonce, {"queued": 0, "workers": 2}))
                elif self.handler is not None:
                    self.handler(self, ident, msg)
        except BaseException as e:  # surfaced by stop()
            self._error = e
        finally:
            self._ready.set()
            sock.close(linger=0)
            ctx.term()


def output_of(submit: Submit) -> str:
    """What the fake model answers: the prompt (or last chat message) upper-cased."""
    if submit.prompt is not None:
        return submit.prompt.upper()
    if submit.messages is not None:
        return submit.messages[-1]["content"].upper()
    return "".join(chr(t) for t in submit.token_ids).upper()


def answer(submit: Submit, batch: int = 3) -> list[Message]:
    """The messages of a successful request: Accepted, Tokens in batches, Final."""
    text = output_of(submit)
    rid = submit.request_id
    msgs: list[Message] = [Accepted(rid)]
    for i in range(0, len(text), batch):
        part = text[i:i + batch]
        msgs.append(Tokens(rid, i, [ord(c) for c in part], part))
    usage = {"prompt_tokens": len(submit.prompt or ""), "completion_tokens": len(text)}
    msgs.append(Final(rid, "stop", usage, dict(TIMINGS)))
    return msgs


def echo(broker: FakeBroker, ident: bytes, msg: Message) -> None:
    if isinstance(msg, Submit):
        broker.send(ident, *answer(msg))


def hold_until_cancel(broker: FakeBroker, ident: bytes, msg: Message) -> None:
    """Accept and send the first batch, then stay silent until Cancel, answered with Final."""
    if isinstance(msg, Submit):
        broker.send(ident, *answer(msg)[:2])
    elif isinstance(msg, Cancel):
        broker.send(ident, Final(msg.request_id, "cancelled", {}, {}))


def free_tcp_address() -> str:
    """A loopback address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@pytest.fixture
def make_broker():
    brokers: list[FakeBroker] = []

    def make(handler=echo, **kw) -> FakeBroker:
        b = FakeBroker(handler, **kw).start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()
