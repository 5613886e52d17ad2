"""The fault suite at load: 2 context + 2 generation workers serve 300 requests while workers are
SIGKILLed one at a time and replaced. Every request ends with exactly one final, none fails while
a worker of its role is alive (streams move to the other generation worker), greedy outputs equal
an undisturbed run's, and blocks, leases and requests go back to zero with the broker alive."""
import asyncio
import random
import time

import pytest

from client import AsyncClient
from tests.harness import Deployment

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

N_REQUESTS = 300
RATE = 10.0                     # requests started per second: the load spans the kills
PROMPTS = [[(31 * k + 7 * j) % 250 + 1 for j in range(12 + 3 * k)] for k in range(8)]
MAX_TOKENS = [60 + 10 * k for k in range(8)]


def _start(d: Deployment, role: str, name: str) -> None:
    d.add_worker(role, name, wait=False, options={"max_batch_size": 16})


def _registered(d: Deployment) -> dict:
    return {w["worker_id"]: w["role"] for w in d.stats()["workers"]}


async def _chaos(d: Deployment, done: asyncio.Event, log: list) -> None:
    """Kill a worker whose role has another one registered, start its replacement, repeat."""
    loop = asyncio.get_running_loop()
    serial = 0
    await asyncio.sleep(2.0)
    for role in ["generation", "context", "generation", "context", "generation", "generation"]:
        if done.is_set():
            return
        mine: list = []
        while not done.is_set():  # a kill must leave a worker of the role alive: wait for a replacement
            live = await loop.run_in_executor(None, _registered, d)
            mine = sorted(n for n, r in live.items() if r == role)
            if len(mine) >= 2:
                break
            await asyncio.sleep(0.5)
        if done.is_set():
            return
        victim = random.Random(serial).choice(mine)
        await loop.run_in_executor(None, d.kill, victim)
        serial += 1
        replacement = f"{role[:3]}-r{serial}"
        _start(d, role, replacement)
        log.append((time.monotonic(), victim, replacement))
        await asyncio.sleep(3.0)


async def _load(d: Deployment, order: list) -> list:
    async with AsyncClient(d.frontend, timeout=120) as c:
        async def one(i: int, k: int):
            await asyncio.sleep(i / RATE)
            try:
                return k, await c.generate(token_ids=PROMPTS[k], max_tokens=MAX_TOKENS[k],
                                           ignore_eos=True)
            except Exception as e:
                return k, e
        return await asyncio.gather(*[one(i, k) for i, k in enumerate(order)])


def test_300_requests_survive_workers_killed_and_replaced_at_load():
    with Deployment() as d:
        for name, role in [("ctx1", "context"), ("ctx2", "context"),
                           ("gen1", "generation"), ("gen2", "generation")]:
            _start(d, role, name)
        d.wait_for(lambda s: len(s["workers"]) == 4, 120, "four workers registered")

        async def reference():
            async with AsyncClient(d.frontend, timeout=120) as c:
                return await asyncio.gather(*[c.generate(token_ids=p, max_tokens=m, ignore_eos=True)
                                              for p, m in zip(PROMPTS, MAX_TOKENS)])
        want = [r.token_ids for r in asyncio.run(reference())]
        base = d.stats()["counters"]

        order = random.Random(7).choices(range(len(PROMPTS)), k=N_REQUESTS)
        kills: list = []

        async def scenario():
            done = asyncio.Event()
            chaos = asyncio.ensure_future(_chaos(d, done, kills))
            try:
                return await _load(d, order)
            finally:
                done.set()
                await chaos

        results = asyncio.run(scenario())
        failures = [(k, r) for k, r in results if isinstance(r, Exception)]
        assert failures == [], failures[:5]
        wrong = [k for k, r in results if r.token_ids != want[k]]
        assert wrong == [], f"{len(wrong)} outputs differ from the undisturbed run"
        # the kills run while the load lasts: on a slow machine a replacement takes longer to
        # register, so fewer fit; at least one of each role always does
        roles = {r[:3] for _, _, r in kills}          # the replacement is named after the role
        assert len(kills) >= 3 and roles == {"con", "gen"}, kills
        s = d.wait_idle(30)
        counters = {k: s["counters"][k] - base.get(k, 0) for k in s["counters"]}
        # exactly one final each: the broker finished every request it accepted once
        assert counters["submitted"] == N_REQUESTS
        assert counters["finished"] == N_REQUESTS and counters["failed"] == 0
        assert counters["migrated"] >= 1
        assert s["requests"] == 0
        print(f"kills: {[v for _, v, _ in kills]}; counters: {counters}")
