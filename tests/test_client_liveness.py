"""Broker liveness from the clients' side: a SIGKILLed broker fails every request in flight with
the retryable BrokerUnavailable within the clients' liveness window, not at their timeouts; the
HTTP gateway turns that into 503 for a waiting call and an error event for an open stream."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

from client import AsyncClient, BrokerUnavailable, Client
from client.gateway import Gateway, GatewayThread
from client.liveness import Liveness
from broker.launch import read_line
from tests.harness import Deployment

pytestmark = pytest.mark.timeout(180)

WINDOW = 2.0          # the clients' liveness window in this test
TIMEOUT = 120.0       # the requests' own timeout, far beyond it
LONG = {"max_tokens": 4000, "ignore_eos": True}


def test_liveness_pings_a_silent_broker_and_gives_it_up_after_the_window():
    live = Liveness(5.0, now=100.0)
    assert not live.ping_due(100.5) and live.next_check(100.5) == pytest.approx(0.5)
    assert live.ping_due(101.0) and not live.ping_due(101.5)    # one ping per fifth of the window
    assert live.ping_due(102.0)
    live.on_message(102.5)                                       # any message is a sign of life
    assert not live.lost(106.0) and live.lost(107.5)
    live.start_waiting(200.0)                                    # idle time before a wait is not silence
    assert not live.lost(204.0)
    with pytest.raises(Exception, match="liveness=0"):
        Liveness(0, now=0.0)
    # a broker answering as another instance than the one that accepted a request lost it
    assert live.restarted({"a": "old", "b": "new", "c": ""}, "new") == ["a"]
    assert live.restarted({"a": "old"}, None) == []


def _sync_streams(frontend: str, ready: threading.Event, go: threading.Event) -> list:
    """Two streams on one Client, each past its first token; then read to the end."""
    with Client(frontend, timeout=TIMEOUT, liveness=WINDOW) as c:
        streams = [c.stream(token_ids=[i + 1] * 10, **LONG) for i in range(2)]
        for s in streams:
            next(s)
        ready.set()
        go.wait(60)
        ends = []
        for s in streams:
            try:
                list(s)
                ends.append(("finished", time.monotonic()))
            except Exception as e:
                ends.append((e, time.monotonic()))
        return ends


async def _async_stream(c: AsyncClient, first: asyncio.Event, i: int):
    stream = c.stream(token_ids=[i + 3] * 10, **LONG)
    try:
        async for _ in stream:
            first.set()
        return "finished", time.monotonic()
    except Exception as e:
        return e, time.monotonic()


async def _http(url: str, stream: bool, first: asyncio.Event):
    body = {"model": "tiny", "prompt": [9] * 10, "max_tokens": 4000, "stream": stream,
            "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as s:
        async with s.post(url + "/v1/completions", json=body) as r:
            if not stream:
                return r.status, await r.json(), time.monotonic()
            events = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip().decode())
                    first.set()
            return r.status, events, time.monotonic()


def test_broker_killed_mid_request_fails_every_request_within_the_liveness_window():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen", options={"max_batch_size": 64})
        gw = GatewayThread(Gateway(d.frontend, port=0, request_timeout=TIMEOUT, broker_liveness=WINDOW))
        url = gw.start()
        try:
            ready, go = threading.Event(), threading.Event()

            async def scenario():
                loop = asyncio.get_running_loop()
                sync_part = loop.run_in_executor(None, _sync_streams, d.frontend, ready, go)
                firsts = [asyncio.Event() for _ in range(3)]
                async with AsyncClient(d.frontend, timeout=TIMEOUT, liveness=WINDOW) as c:
                    tasks = [asyncio.ensure_future(_async_stream(c, firsts[i], i)) for i in range(2)]
                    tasks.append(asyncio.ensure_future(_http(url, True, firsts[2])))
                    tasks.append(asyncio.ensure_future(_http(url, False, asyncio.Event())))
                    for ev in firsts:
                        await asyncio.wait_for(ev.wait(), 60)
                    await loop.run_in_executor(None, ready.wait, 60)
                    await loop.run_in_executor(None, lambda: d.wait_for(
                        lambda s: s["requests"] == 6, 30, "six requests in flight"))
                    # the workers stop too, so nothing can finish: only the broker's death ends them
                    for name in ("ctx", "gen"):
                        d.kill(name, signal.SIGSTOP)
                    os.kill(d.broker.pid, signal.SIGKILL)
                    killed = time.monotonic()
                    go.set()
                    results = await asyncio.gather(*tasks)
                return killed, results, await sync_part

            killed, results, sync_ends = asyncio.run(scenario())
        finally:
            gw.stop()
        ends = sync_ends + results[:2]
        for error, t in ends:
            assert isinstance(error, BrokerUnavailable), error
            assert error.retryable and "liveness window" in str(error)
            assert t - killed < TIMEOUT / 4, f"ended {t - killed:.1f} s after the kill"
        status, events, t = results[2]
        assert status == 200 and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "broker_unavailable" and t - killed < TIMEOUT / 4
        status, body, t = results[3]
        assert status == 503 and body["error"]["code"] == "broker_unavailable"
        assert t - killed < TIMEOUT / 4
        last = max([t for _, t in ends] + [results[2][2], t])
        print(f"every request ended within {last - killed:.2f} s of the broker's death "
              f"(liveness window {WINDOW} s, timeout {TIMEOUT} s)")


def _restart_broker(d: Deployment) -> None:
    """A new broker process on the killed one's addresses (workers and clients reconnect). The
    tests start a fresh generation worker after it: one that decoded for the old broker meanwhile
    re-registers once per Reconnect its queued messages draw (issue 13, finding 8), and every
    re-registration would move the resumed stream again."""
    cmd = [sys.executable, "-m", "broker.cli", "start", "--frontend", d.frontend, "--backend", d.backend,
           "--no-http", "--heartbeat-interval", "0.2", "--liveness", "10"]
    proc = d.children.start("broker-2", cmd, stdout=subprocess.PIPE)
    assert read_line(proc, 30.0, "ready line").startswith("broker ready")


def test_a_resuming_client_continues_its_streams_across_a_broker_restart():
    prompt, n = [5, 9, 14, 3, 77, 31, 2, 8], 300
    seeded = {"temperature": 0.8, "top_k": 50, "seed": 99}
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        with Client(d.frontend, timeout=60) as c:
            want = [c.generate(token_ids=prompt, max_tokens=n, ignore_eos=True).token_ids,
                    c.generate(token_ids=prompt, max_tokens=n, ignore_eos=True, **seeded).token_ids]
        with Client(d.frontend, timeout=TIMEOUT, liveness=WINDOW, resume=True) as c:
            streams = [c.stream(token_ids=prompt, max_tokens=n, ignore_eos=True),
                       c.stream(token_ids=prompt, max_tokens=n, ignore_eos=True, **seeded)]
            chunks = [[next(s)] for s in streams]
            # nothing finishes before the broker dies (a fresh worker serves after); the worker is
            # frozen first, so the broker cannot see it go and fail the request before it dies itself
            d.kill("gen", signal.SIGSTOP)
            os.kill(d.broker.pid, signal.SIGKILL)
            d.kill("gen")
            d.broker.wait(10)
            _restart_broker(d)
            d.add_worker("generation", "gen-2", wait=False)
            for s, got in zip(streams, chunks):
                got.extend(s)
                assert s._state.resumes >= 1
        for got, ref in zip(chunks, want):
            indices = [ch.index + i for ch in got for i in range(len(ch.token_ids))]
            assert indices == list(range(n))      # no gap, no repeat across the restart
            assert [t for ch in got for t in ch.token_ids] == ref
        s = d.wait_idle()
        assert s["counters"]["finished"] == 2


def test_a_resuming_async_client_continues_its_stream_across_a_broker_restart():
    prompt, n = [4, 8, 15, 16, 23, 42], 300
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        with Client(d.frontend, timeout=60) as c:
            want = c.generate(token_ids=prompt, max_tokens=n, ignore_eos=True).token_ids

        async def scenario():
            loop = asyncio.get_running_loop()
            async with AsyncClient(d.frontend, timeout=TIMEOUT, liveness=WINDOW, resume=True) as c:
                stream = c.stream(token_ids=prompt, max_tokens=n, ignore_eos=True)
                got = [await stream.__anext__()]
                d.kill("gen", signal.SIGSTOP)      # frozen, not gone: see the test above
                os.kill(d.broker.pid, signal.SIGKILL)
                d.kill("gen")
                await loop.run_in_executor(None, d.broker.wait, 10)
                await loop.run_in_executor(None, _restart_broker, d)
                d.add_worker("generation", "gen-2", wait=False)
                got.extend([ch async for ch in stream])
                return got, stream._state.resumes

        got, resumes = asyncio.run(scenario())
        assert resumes >= 1
        assert [ch.index + i for ch in got for i in range(len(ch.token_ids))] == list(range(n))
        assert [t for ch in got for t in ch.token_ids] == want
        d.wait_idle()
