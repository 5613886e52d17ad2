"""The asyncio AsyncClient against a scripted fake broker."""
from __future__ import annotations

import asyncio
import time

import pytest

from broker.protocol import Accepted, Cancel, Code, Error, Final, Ping, Submit, Tokens
from client import (AsyncClient, BrokerUnavailable, Chunk, ClientError, InvalidRequest,
                    Overloaded, RequestFailed, RequestTimeout)

from .test_client_fakebroker import (TIMINGS, free_tcp_address, hold_until_cancel,
                                     make_broker)  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(20)


async def received(broker, pred):
    """Wait for the fake broker to receive a matching message without blocking the loop."""
    return await asyncio.to_thread(broker.wait_for, pred)


async def test_generate_returns_text_tokens_usage_timings(make_broker):
    broker = make_broker()
    async with AsyncClient(broker.address, timeout=5) as c:
        out = await c.generate("hello", max_tokens=8, request_id="r1")
        assert (out.request_id, out.text, out.token_ids, out.finish_reason) == \
            ("r1", "HELLO", [72, 69, 76, 76, 79], "stop")
        assert out.usage == {"prompt_tokens": 5, "completion_tokens": 5} and out.timings == TIMINGS
        sub = await received(broker, lambda m: isinstance(m, Submit))
        assert sub.sampling == {"max_tokens": 8} and sub.timeout_ms == 5000
        assert c._queues == {}
    assert c._sock.closed and c._ctx.closed


async def test_64_concurrent_generates_get_their_own_results(make_broker):
    broker = make_broker()
    async with AsyncClient(broker.address, timeout=10) as c:
        prompts = [f"request number {i}" for i in range(64)]
        outs = await asyncio.gather(*(c.generate(p) for p in prompts))
        assert [o.text for o in outs] == [p.upper() for p in prompts]
        assert len({o.request_id for o in outs}) == 64
        assert all(o.token_ids == [ord(ch) for ch in o.text] for o in outs)
        chats = await asyncio.gather(*(c.chat([{"role": "user", "content": p}]) for p in prompts[:8]))
        assert [o.text for o in chats] == [p.upper() for p in prompts[:8]]
        assert c._queues == {}
    assert len(broker.of_type(Submit)) == 72


async def test_stream_yields_chunks_in_order(make_broker):
    broker = make_broker()
    async with AsyncClient(broker.address, timeout=5) as c:
        s = c.stream("abcdefg", request_id="s1")
        chunks = [ch async for ch in s]
        assert chunks == [Chunk("s1", 0, [65, 66, 67], "ABC"), Chunk("s1", 3, [68, 69, 70], "DEF"),
                          Chunk("s1", 6, [71], "G")]
        assert s.completion.text == "ABCDEFG" and s.completion.finish_reason == "stop"
    assert (await received(broker, lambda m: isinstance(m, Submit))).request_id == "s1"
    assert not broker.of_type(Cancel)


async def test_breaking_out_of_stream_sends_cancel(make_broker):
    broker = make_broker(hold_until_cancel)
    async with AsyncClient(broker.address, timeout=5) as c:
        async for chunk in c.stream("abcdef", request_id="s1"):
            assert chunk.text == "ABC"
            break
        assert (await received(broker, lambda m: isinstance(m, Cancel))).request_id == "s1"
        async with c.stream("abcdef", request_id="s2") as s:
            await s.__anext__()
        await received(broker, lambda m: isinstance(m, Cancel) and m.request_id == "s2")
        assert await c.ping() == {"queued": 0, "workers": 2}   # late Finals are dropped
        assert c._queues == {}


async def test_cancel_ends_stream_with_cancelled(make_broker):
    broker = make_broker(hold_until_cancel)
    async with AsyncClient(broker.address, timeout=5) as c:
        s = c.stream("abcdef", request_id="s1")
        assert (await s.__anext__()).text == "ABC"
        await c.cancel("s1")
        assert [ch async for ch in s] == []
        assert s.completion.finish_reason == "cancelled"


async def test_duplicates_dropped_and_gap_fails(make_broker):
    def script(broker, ident, msg):
        if isinstance(msg, Submit):
            rid = msg.request_id
            tail = Tokens(rid, 9, [9], "z") if msg.prompt == "gap" else Tokens(rid, 2, [3], "c")
            broker.send(ident, Accepted(rid), Tokens(rid, 0, [1, 2], "ab"),
                        Tokens(rid, 0, [1, 2], "ab"), tail, Final(rid, "stop", {}, {}))

    broker = make_broker(script)
    async with AsyncClient(broker.address, timeout=5) as c:
        out = await c.generate("ok")
        assert out.token_ids == [1, 2, 3] and out.text == "abc"
        with pytest.raises(RequestFailed) as e:
            await c.generate("gap", request_id="g")
        assert e.value.code == Code.PROTOCOL
        assert (await received(broker, lambda m: isinstance(m, Cancel))).request_id == "g"


async def test_errors_map_to_exceptions(make_broker):
    def fail(broker, ident, msg):
        if isinstance(msg, Submit):
            code = Code.OVERLOADED if msg.prompt == "busy" else Code.NO_WORKERS
            broker.send(ident, Error(msg.request_id, code, f"broker says {msg.prompt}",
                                     code == Code.OVERLOADED))

    async with AsyncClient(make_broker(fail).address, timeout=5) as c:
        with pytest.raises(Overloaded) as e:
            await c.generate("busy")
        assert e.value.retryable and e.value.message == "broker says busy"
        with pytest.raises(RequestFailed) as e:
            await c.generate("empty")
        assert (e.value.code, e.value.message, e.value.retryable) == \
            (Code.NO_WORKERS, "broker says empty", False)


async def test_invalid_sampling_raises_before_sending(make_broker):
    broker = make_broker()
    async with AsyncClient(broker.address, timeout=5) as c:
        with pytest.raises(InvalidRequest) as e:
            await c.generate("x", temperature=-1)
        assert "temperature" in str(e.value) and "-1" in str(e.value)
        with pytest.raises(InvalidRequest):
            c.stream("x", top_k=-5)
        await c.ping()
        assert [type(m) for m in broker.received] == [Ping]


async def test_timeout_raises_and_sends_cancel(make_broker):
    def stall(broker, ident, msg):
        if isinstance(msg, Submit):
            broker.send(ident, Accepted(msg.request_id))

    broker = make_broker(stall)
    async with AsyncClient(broker.address, timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await c.generate("x", request_id="t1", timeout=0.3)
        assert time.monotonic() - t0 < 3
        assert (await received(broker, lambda m: isinstance(m, Cancel))).request_id == "t1"
        assert c._queues == {}


async def test_caller_cancellation_sends_cancel(make_broker):
    broker = make_broker(hold_until_cancel)
    async with AsyncClient(broker.address, timeout=5) as c:
        task = asyncio.ensure_future(c.generate("abcdef", request_id="c1"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await received(broker, lambda m: isinstance(m, Cancel))).request_id == "c1"


async def test_no_broker_fails_within_timeout():
    async with AsyncClient(free_tcp_address(), timeout=0.4) as c:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await c.generate("x")
        with pytest.raises(BrokerUnavailable):
            await c.ping(timeout=0.2)
        assert time.monotonic() - t0 < 5


async def test_close_fails_waiting_calls(make_broker):
    broker = make_broker(None, answer_pings=False)
    c = AsyncClient(broker.address, timeout=10)
    task = asyncio.ensure_future(c.generate("x"))
    await received(broker, lambda m: isinstance(m, Submit))
    await c.close()
    with pytest.raises(ClientError):
        await asyncio.wait_for(task, 5)
    with pytest.raises(ClientError):
        await c.generate("x")


def test_bad_address_is_a_client_error():
    with pytest.raises(ClientError, match="nowhere"):
        AsyncClient("nowhere://x")
