"""Clients given etcd://HOST:PORT follow a broker that moved (client/follow.py), reading etcd at
most one lookup at a time and no more often than FOLLOW_EVERY_S, however many requests resume
while the broker is away. etcd is stubbed here (its lookup counted); tests/test_etcd.py follows a
real broker through a real etcd."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from client import AsyncClient, Client
from client.follow import FOLLOW_EVERY_S, Follow

from .test_client_fakebroker import echo, hold_until_cancel, make_broker  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)

ETCD = "etcd://127.0.0.1:1"      # never dialled: the lookup is stubbed
WINDOW = 0.5                     # the clients' liveness window
REQUESTS = 16


def test_a_lookup_is_due_once_at_a_time_and_not_again_within_every():
    f = Follow(ETCD, "c", every=0.5)
    assert f.start(10.0) and not f.start(10.0) and not f.start(20.0)      # one runs
    assert f.end(12.0, "tcp://a:1", "tcp://a:1") is None                  # same address: stay
    assert not f.start(12.4) and f.start(12.5)                            # the last ended 0.5 s ago
    assert f.end(12.6, None, "tcp://a:1") is None                         # etcd away: stay
    assert f.start(13.1) and f.end(13.2, "tcp://b:2", "tcp://a:1") == "tcp://b:2"
    assert not Follow(None, "c").start(100.0)                             # tcp://: never looks up


class StubEtcd:
    """Stands in for ``find_broker``: answers ``address``, counts the lookups and the most that
    ran at once; each takes a little while, as an HTTP call does."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[float] = []
        self.running = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, uri: str, cluster_name: str, which: str, timeout: float) -> str:
        assert (uri, cluster_name, which) == (ETCD, "moving", "frontend")
        with self._lock:
            self.calls.append(time.monotonic())
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self._lock:
            self.running -= 1
            return self.address


def _check(etcd: StubEtcd, since: float, new: str, address: str, texts: list, prompts: list) -> None:
    assert address == new
    assert texts == [p.upper() for p in prompts]
    assert etcd.most == 1, "two etcd lookups ran at once"
    reads = [t for t in etcd.calls if t >= since]
    # one lookup per FOLLOW_EVERY_S at most (each ends 0.05 s after it starts), plus the first
    assert 2 <= len(reads) <= (reads[-1] - reads[0]) / FOLLOW_EVERY_S + 1, (len(reads), reads)


async def test_many_resuming_async_requests_share_one_rate_limited_etcd_lookup(make_broker, monkeypatch):
    old, new = make_broker(hold_until_cancel), make_broker(echo)
    etcd = StubEtcd(old.address)
    monkeypatch.setattr("client.request.find_broker", etcd)
    prompts = [f"request number {i}" for i in range(REQUESTS)]
    async with AsyncClient(ETCD, cluster_name="moving", timeout=30, liveness=WINDOW, resume=True) as c:
        streams = [c.stream(p, max_tokens=50) for p in prompts]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))   # every one under way
        await asyncio.to_thread(old.stop)             # the broker goes; etcd still names it a while
        since = time.monotonic()

        async def rest(stream, first) -> str:
            return first.text + "".join([chunk.text async for chunk in stream])
        reading = asyncio.gather(*(rest(s, f) for s, f in zip(streams, firsts)))
        deadline = time.monotonic() + 20
        while len([t for t in etcd.calls if t >= since]) < 4:       # several lookups find it gone
            assert time.monotonic() < deadline, f"the clients stopped looking up: {etcd.calls}"
            await asyncio.sleep(0.05)
        etcd.address = new.address                    # then a new broker on another port
        texts = await reading
        _check(etcd, since, new.address, c.address, texts, prompts)


def test_resuming_sync_streams_follow_the_broker_with_rate_limited_lookups(make_broker, monkeypatch):
    old, new = make_broker(hold_until_cancel), make_broker(echo)
    etcd = StubEtcd(old.address)
    monkeypatch.setattr("client.request.find_broker", etcd)
    prompts = [f"request number {i}" for i in range(4)]
    with Client(ETCD, cluster_name="moving", timeout=30, liveness=WINDOW, resume=True) as c:
        streams = [c.stream(p, max_tokens=50) for p in prompts]
        firsts = [next(s) for s in streams]
        old.stop()
        since = time.monotonic()
        moved = threading.Timer(4 * FOLLOW_EVERY_S + 3 * WINDOW, setattr, (etcd, "address", new.address))
        moved.start()
        try:
            texts = [f.text + "".join(chunk.text for chunk in s) for s, f in zip(streams, firsts)]
        finally:
            moved.cancel()
            moved.join(5)
        _check(etcd, since, new.address, c.address, texts, prompts)
