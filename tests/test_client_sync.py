"""The synchronous Client against a scripted fake broker."""
from __future__ import annotations

import time

import pytest

from broker.protocol import (Accepted, Cancel, Code, Error, Final, Ping, Submit, Tokens,
                             VERSION)
from client import (BrokerUnavailable, Chunk, Client, ClientError, Completion, InvalidRequest,
                    Overloaded, RequestFailed, RequestTimeout)

from .test_client_fakebroker import (TIMINGS, answer, free_tcp_address, hold_until_cancel,
                                     make_broker)  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def make_client():
    clients: list[Client] = []

    def make(address: str, **kw) -> Client:
        c = Client(address, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
        assert c._sock.closed and c._ctx.closed


def test_generate_returns_text_tokens_usage_timings(make_broker, make_client):
    broker = make_broker()
    c = make_client(broker.address, timeout=5)
    out = c.generate("hello world", max_tokens=16, temperature=0.5, request_id="r1")
    assert out == Completion("r1", "HELLO WORLD", [ord(ch) for ch in "HELLO WORLD"], "stop",
                             {"prompt_tokens": 11, "completion_tokens": 11}, TIMINGS)
    sub = broker.wait_for(lambda m: isinstance(m, Submit))
    assert sub.prompt == "hello world"
    assert sub.sampling == {"max_tokens": 16, "temperature": 0.5}   # only what the caller set
    assert sub.timeout_ms == 5000
    assert c._inbox == {}   # nothing kept for a finished request


def test_default_request_id_is_uuid_hex_and_timeout_overrides(make_broker, make_client):
    broker = make_broker()
    c = make_client(broker.address)
    out = c.generate(token_ids=[104, 105], timeout=2.5)
    assert out.text == "HI" and len(out.request_id) == 32
    int(out.request_id, 16)
    assert broker.wait_for(lambda m: isinstance(m, Submit)).timeout_ms == 2500


def test_chat_sends_messages(make_broker, make_client):
    broker = make_broker()
    c = make_client(broker.address, timeout=5)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert c.chat(msgs, max_tokens=4).text == "HI THERE"
    assert broker.wait_for(lambda m: isinstance(m, Submit)).messages == msgs


def test_stream_yields_chunks_in_order(make_broker, make_client):
    broker = make_broker()
    c = make_client(broker.address, timeout=5)
    s = c.stream("abcdefgh", request_id="s1")
    chunks = list(s)
    assert chunks == [Chunk("s1", 0, [65, 66, 67], "ABC"), Chunk("s1", 3, [68, 69, 70], "DEF"),
                      Chunk("s1", 6, [71, 72], "GH")]
    assert s.completion.finish_reason == "stop" and s.completion.text == "ABCDEFGH"
    assert broker.wait_for(lambda m: isinstance(m, Submit)).request_id == "s1"
    assert not broker.of_type(Cancel)   # a stream read to the end is not cancelled


def test_breaking_out_of_stream_sends_cancel(make_broker, make_client):
    def hold_s1(broker, ident, msg):
        if getattr(msg, "request_id", None) == "s1":
            hold_until_cancel(broker, ident, msg)
        elif isinstance(msg, Submit):
            broker.send(ident, *answer(msg))

    broker = make_broker(hold_s1)
    c = make_client(broker.address, timeout=5)
    for chunk in c.stream("abcdef", request_id="s1"):
        assert chunk.text == "ABC"
        break
    assert broker.wait_for(lambda m: isinstance(m, Cancel)).request_id == "s1"
    # the late Final("cancelled") for s1 is dropped; the client keeps working
    assert c.generate("xy", request_id="s2", timeout=5).text == "XY"
    assert c._inbox == {}


def test_stream_close_and_with_block_cancel(make_broker, make_client):
    broker = make_broker(hold_until_cancel)
    c = make_client(broker.address, timeout=5)
    with c.stream("abcdef", request_id="a") as s:
        next(s)
    s2 = c.stream("abcdef", request_id="b")
    next(s2)
    s2.close()
    broker.wait_for(lambda m: isinstance(m, Cancel) and m.request_id == "b")
    assert {m.request_id for m in broker.of_type(Cancel)} == {"a", "b"}
    with pytest.raises(StopIteration):
        next(s2)


def test_cancel_ends_stream_with_cancelled(make_broker, make_client):
    broker = make_broker(hold_until_cancel)
    c = make_client(broker.address, timeout=5)
    s = c.stream("abcdef", request_id="s1")
    assert next(s).index == 0
    c.cancel("s1")
    assert list(s) == []
    assert s.completion.finish_reason == "cancelled" and s.completion.text == "ABC"


def test_other_requests_messages_are_buffered(make_broker, make_client):
    """An unfinished stream's messages that arrive during another call are kept for it."""
    def interleave(broker, ident, msg):
        if isinstance(msg, Submit) and msg.request_id == "a":
            broker.send(ident, *answer(msg)[:2])           # Accepted, first batch
            interleave.rest = answer(msg)[2:]
        elif isinstance(msg, Submit):
            b = answer(msg)
            broker.send(ident, b[0], *interleave.rest[:1], b[1], *interleave.rest[1:], *b[2:])

    broker = make_broker(interleave)
    c = make_client(broker.address, timeout=5)
    a = c.stream("abcdefg", request_id="a")
    assert next(a).text == "ABC"
    assert c.generate("uvwxyz", request_id="b").text == "UVWXYZ"
    assert [ch.text for ch in a] == ["DEF", "G"]
    assert a.completion.text == "ABCDEFG"
    assert c._inbox == {}
    assert not broker.of_type(Cancel)


def test_duplicate_tokens_are_dropped(make_broker, make_client):
    def dup(broker, ident, msg):
        if isinstance(msg, Submit):
            rid = msg.request_id
            broker.send(ident, Accepted(rid), Accepted(rid), Tokens(rid, 0, [1, 2], "ab"),
                        Tokens(rid, 0, [1, 2], "ab"), Tokens(rid, 2, [3], "c"),
                        Tokens(rid, 1, [2], "b"), Tokens(rid, 3, [4, 5], "de"),
                        Final(rid, "length", {"prompt_tokens": 1, "completion_tokens": 5}, {}))

    c = make_client(make_broker(dup).address, timeout=5)
    assert [ch.index for ch in c.stream("x")] == [0, 2, 3]
    out = c.generate("x")
    assert out.token_ids == [1, 2, 3, 4, 5] and out.text == "abcde"
    assert out.finish_reason == "length"


def test_last_tokens_in_the_final_are_the_last_chunk(make_broker, make_client):
    def tail(broker, ident, msg):
        if isinstance(msg, Submit):
            rid = msg.request_id
            broker.send(ident, Accepted(rid), Tokens(rid, 0, [1, 2], "ab"),
                        Final(rid, "stop", {"prompt_tokens": 1, "completion_tokens": 3}, {}, 2, [3], "c"))

    c = make_client(make_broker(tail).address, timeout=5)
    s = c.stream("x", request_id="t1")
    assert list(s) == [Chunk("t1", 0, [1, 2], "ab"), Chunk("t1", 2, [3], "c")]
    assert s.completion.token_ids == [1, 2, 3] and s.completion.text == "abc"
    out = c.generate("x")
    assert out.token_ids == [1, 2, 3] and out.finish_reason == "stop"


@pytest.mark.parametrize("bad_index", [5, 1])   # a gap; a partial overlap
def test_token_gap_is_a_protocol_error_and_cancels(make_broker, make_client, bad_index):
    def gap(broker, ident, msg):
        if isinstance(msg, Submit):
            rid = msg.request_id
            broker.send(ident, Accepted(rid), Tokens(rid, 0, [1, 2], "ab"),
                        Tokens(rid, bad_index, [7, 8], "xy"))

    broker = make_broker(gap)
    c = make_client(broker.address, timeout=5)
    with pytest.raises(RequestFailed) as e:
        c.generate("x", request_id="g")
    assert e.value.code == Code.PROTOCOL and e.value.request_id == "g"
    assert f"got tokens [{bad_index}, {bad_index + 2}), expected index 2" in e.value.message
    assert broker.wait_for(lambda m: isinstance(m, Cancel)).request_id == "g"


def test_error_raises_request_failed_with_brokers_message(make_broker, make_client):
    def fail(broker, ident, msg):
        if isinstance(msg, Submit):
            broker.send(ident, Accepted(msg.request_id), Tokens(msg.request_id, 0, [1], "a"),
                        Error(msg.request_id, Code.WORKER_DIED, "worker ctx-0 stopped answering"))

    broker = make_broker(fail)
    c = make_client(broker.address, timeout=5)
    with pytest.raises(RequestFailed) as e:
        c.generate("x", request_id="e1")
    err = e.value
    assert type(err) is RequestFailed and isinstance(err, ClientError)
    assert (err.code, err.message, err.retryable, err.request_id) == \
        (Code.WORKER_DIED, "worker ctx-0 stopped answering", False, "e1")
    assert "worker ctx-0 stopped answering" in str(err)
    assert not broker.of_type(Cancel)   # the broker already finished it


def test_overloaded_is_retryable(make_broker, make_client):
    def full(broker, ident, msg):
        if isinstance(msg, Submit):
            broker.send(ident, Error(msg.request_id, Code.OVERLOADED, "queue full (128)", True))

    c = make_client(make_broker(full).address, timeout=5)
    with pytest.raises(Overloaded) as e:
        c.generate("x")
    assert isinstance(e.value, RequestFailed)
    assert e.value.retryable is True and e.value.code == Code.OVERLOADED
    assert e.value.message == "queue full (128)"
    with pytest.raises(Overloaded):   # streams report it on the first read
        next(c.stream("x"))


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -1}, ["temperature", "-1"]),
    ({"top_p": 0}, ["top_p", "0"]),
    ({"max_tokens": 0}, ["max_tokens", "0"]),
    ({"temprature": 0.5}, ["temprature"]),
    ({"token_ids": [1, -3]}, ["token_ids[1]", "-3"]),
    ({"token_ids": [1, 2], "prompt": "x"}, ["prompt", "token_ids"]),
    ({"messages": [{"role": "user"}]}, ["messages[0]"]),
    ({"prompt": ""}, ["prompt"]),
    ({"timeout": -2}, ["timeout", "-2"]),
    ({"request_id": ""}, ["request_id"]),
])
def test_invalid_input_raises_before_sending(make_broker, make_client, kwargs, words):
    broker = make_broker()
    c = make_client(broker.address, timeout=5)
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", None if {"token_ids", "messages"} & set(kwargs) else "hi")
    for call in (c.generate, c.stream):
        with pytest.raises(InvalidRequest) as e:
            call(prompt, **kwargs)
        assert e.value.code == Code.INVALID_REQUEST
        for w in words:
            assert w in str(e.value)
    c.ping()
    assert [type(m) for m in broker.received] == [Ping]   # nothing else left the process
    assert c._inbox == {}


def test_timeout_raises_and_sends_cancel(make_broker, make_client):
    def stall(broker, ident, msg):
        if isinstance(msg, Submit):
            broker.send(ident, Accepted(msg.request_id))

    broker = make_broker(stall)
    c = make_client(broker.address, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout) as e:
        c.generate("x", request_id="t1", timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert e.value.request_id == "t1"
    assert broker.wait_for(lambda m: isinstance(m, Cancel)).request_id == "t1"
    assert broker.wait_for(lambda m: isinstance(m, Submit)).timeout_ms == 300


def test_silent_broker_is_unavailable(make_broker, make_client):
    broker = make_broker(None, answer_pings=False)
    c = make_client(broker.address, timeout=0.3)
    with pytest.raises(BrokerUnavailable):
        c.generate("x")
    with pytest.raises(BrokerUnavailable):
        c.ping(timeout=0.3)
    broker.wait_for(lambda m: isinstance(m, Cancel))


def test_no_broker_fails_within_timeout(make_client):
    c = make_client(free_tcp_address(), timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        c.generate("x")
    with pytest.raises(BrokerUnavailable):
        c.ping(timeout=0.2)
    with pytest.raises(BrokerUnavailable):
        list(c.stream("x", timeout=0.2))
    assert time.monotonic() - t0 < 5


def test_ping_returns_stats_and_ignores_junk(make_broker, make_client):
    def junk(broker, ident, msg):
        if isinstance(msg, Submit):
            rid = msg.request_id
            broker.send_raw(ident, [b"NOPE\x0b\x80"])                      # wrong version
            broker.send_raw(ident, [VERSION + b"\xff\x80"])                 # unknown command
            broker.send(ident, Final("someone-else", "stop", {}, {}))     # unknown request
            broker.send(ident, *answer(msg))

    c = make_client(make_broker(junk).address, timeout=5)
    assert c.ping() == {"queued": 0, "workers": 2}
    assert c.generate("ok").text == "OK"


def test_duplicate_request_id_in_flight_is_refused_locally(make_broker, make_client):
    broker = make_broker(hold_until_cancel)
    c = make_client(broker.address, timeout=5)
    s = c.stream("abc", request_id="same")
    with pytest.raises(RequestFailed) as e:
        c.generate("abc", request_id="same")
    assert e.value.code == Code.DUPLICATE_REQUEST
    s.close()
    assert len(broker.of_type(Submit)) <= 1


def test_closed_client_refuses_calls(make_broker):
    c = Client(make_broker().address, timeout=1)
    with c:
        assert c.generate("a").text == "A"
    assert c._sock.closed and c._ctx.closed
    with pytest.raises(ClientError):
        c.generate("a")


def test_bad_address_is_a_client_error():
    with pytest.raises(ClientError, match="nowhere"):
        Client("nowhere://x")
