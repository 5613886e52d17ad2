"""Workers joining, draining and leaving at run time, under load: SIGTERM (or ``worker drain``)
makes a worker take no new work, finish what it holds and exit 0; a worker that registers takes
traffic at once; not one request fails and no KV block leaks. Also the drain deadline, a second
SIGTERM, and ``disagg_cluster.minimal_instances`` gating ``/health`` and admission."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from client import AsyncClient, Client, RequestFailed
from tests.harness import ROOT, Deployment, _env

pytestmark = pytest.mark.timeout(120)

MAX_TOKENS = 12


class Load:
    """``concurrency`` request loops on one AsyncClient in a thread of its own, from ``start()``
    until ``stop()``: every completion and every failure is kept."""

    def __init__(self, frontend: str, concurrency: int = 6):
        self.frontend, self.concurrency = frontend, concurrency
        self.done: list = []
        self.failures: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="load")

    async def _run(self) -> None:
        async with AsyncClient(self.frontend, timeout=60) as c:
            async def loop(k: int) -> None:
                i = 0
                while not self._stop.is_set():
                    ids = [(k * 37 + i * 11 + j) % 250 + 1 for j in range(24)]
                    try:
                        r = await c.generate(token_ids=ids, max_tokens=MAX_TOKENS, ignore_eos=True)
                        (self.done if len(r.token_ids) == MAX_TOKENS else self.failures).append(r)
                    except Exception as e:        # noqa: BLE001 -- every failure is counted and shown
                        self.failures.append(e)
                    i += 1
            await asyncio.gather(*(loop(k) for k in range(self.concurrency)))

    def start(self) -> "Load":
        self._thread.start()
        return self

    def wait_more(self, d: Deployment, n: int, what: str, timeout: float = 30) -> None:
        """Until ``n`` more requests than now have finished (failing at once on a failure)."""
        target = len(self.done) + n
        deadline = time.monotonic() + timeout
        while len(self.done) < target:
            assert not self.failures, self.failures[:3]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {len(self.done)} of {target} requests done\n{d.tail('broker')}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _serving(name: str):
    return lambda s: any(w["worker_id"] == name and (w["inflight"] or w["leases"]) for w in s["workers"])


def _gone(name: str):
    return lambda s: name not in {w["worker_id"] for w in s["workers"]}


def _drained_cleanly(d: Deployment, name: str, proc: subprocess.Popen) -> None:
    assert proc.wait(30) == 0, d.tail(name)
    log = d.tail(name, 400)
    m = re.search(r"drained: nothing left to serve, (\d+) of (\d+) KV blocks free", log)
    assert m and m.group(1) == m.group(2), log          # it left with every block back in its pool


@pytest.mark.parametrize("role", ["context", "generation"])
def test_workers_drain_one_after_another_while_a_new_one_joins_under_load(role):
    other = "generation" if role == "context" else "context"
    with Deployment() as d:
        first = d.add_worker(role, f"{role}-1")
        second = d.add_worker(role, f"{role}-2")
        d.add_worker(other, other)
        load = Load(d.frontend).start()
        try:
            load.wait_more(d, 10, "load running")
            third = d.add_worker(role, f"{role}-3", wait=False)      # joins while the first drains
            os.kill(first.pid, signal.SIGTERM)
            _drained_cleanly(d, f"{role}-1", first)
            d.wait_for(_gone(f"{role}-1"), 10, "drained worker gone")
            # the new one takes traffic as soon as it registers
            d.wait_for(_serving(f"{role}-3"), 60, f"{role}-3 serving", third)
            os.kill(second.pid, signal.SIGTERM)
            _drained_cleanly(d, f"{role}-2", second)
            load.wait_more(d, 20, f"served with {role}-3 alone")
        finally:
            load.stop()
        assert not load.failures, load.failures[:3]
        s = d.wait_idle()          # nothing held: no request, no block in use, no lease
        assert {w["worker_id"] for w in s["workers"]} == {f"{role}-3", other}
        assert s["counters"]["failed"] == 0 and s["counters"]["rejected"] == 0
        assert s["counters"]["finished"] == len(load.done)


def test_drain_deadline_and_a_second_sigterm_leave_at_once_and_the_stream_moves_on():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        # more slots, more credits: the stream goes to gen-a, then gen-b, then gen-c
        gen_a = d.add_worker("generation", "gen-a", options={"max_batch_size": 64}, extra=("--drain-timeout", "1.5"))
        gen_b = d.add_worker("generation", "gen-b", options={"max_batch_size": 32})
        d.add_worker("generation", "gen-c", options={"max_batch_size": 16})
        with Client(d.frontend, timeout=90) as c:
            it = c.stream(token_ids=[5] * 12, max_tokens=4000, ignore_eos=True)
            assert next(it).index == 0
            d.wait_for(_serving("gen-a"), 10, "decoding on gen-a")
            t0 = time.monotonic()
            os.kill(gen_a.pid, signal.SIGTERM)
            d.wait_for(_gone("gen-a"), 10, "gen-a gone")
            assert 1.4 < time.monotonic() - t0 < 5        # at its deadline (the process exits after)
            assert gen_a.wait(30) == 0
            assert "drain deadline (1.5 s) passed holding 1 requests" in d.tail("gen-a")
            d.wait_for(_serving("gen-b"), 20, "the stream moved to gen-b")
            os.kill(gen_b.pid, signal.SIGTERM)
            d.wait_for(lambda s: any(w["worker_id"] == "gen-b" and w["draining"] for w in s["workers"]),
                       10, "gen-b draining")
            t0 = time.monotonic()
            os.kill(gen_b.pid, signal.SIGTERM)             # the second: leave now, not in 60 s
            d.wait_for(_gone("gen-b"), 10, "gen-b gone")
            assert time.monotonic() - t0 < 2
            assert gen_b.wait(30) == 0
            chunks = list(it)                              # finished on gen-c
        indices = [ch.index + i for ch in chunks for i in range(len(ch.token_ids))]
        assert indices == list(range(1, 4000))           # moved twice, no gap, no repeat
        s = d.wait_idle()
        assert s["counters"]["migrated"] == 2 and s["counters"]["failed"] == 0


def _worker_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", "drain", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)


def test_worker_drain_command_by_worker_id_through_the_broker_and_by_pid():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        gen = d.add_worker("generation", "gen")
        other = d.add_worker("generation", "gen-b")
        with Client(d.frontend, timeout=60) as c:
            it = c.stream(token_ids=[9] * 12, max_tokens=300, ignore_eos=True)
            assert next(it).index == 0
            busy = next(n for n in ("gen", "gen-b") if _serving(n)(d.stats()))
            r = _worker_cli("--worker-id", busy, "--broker", d.frontend, "--timeout", "60")
            assert r.returncode == 0, r.stderr
            assert f"draining worker {busy}" in r.stdout and "drained" in r.stdout
            chunks = list(it)                            # it finished the stream before leaving
        assert sum(len(ch.token_ids) for ch in chunks) == 299
        assert d.stats()["counters"]["migrated"] == 0
        proc = gen if busy == "gen" else other
        _drained_cleanly(d, busy, proc)
        left = other if busy == "gen" else gen
        r = _worker_cli("--pid", str(left.pid))
        assert r.returncode == 0 and "drained" in r.stdout, r.stderr
        assert left.wait(5) == 0
        r = _worker_cli("--worker-id", "nobody", "--broker", d.frontend, "--no-wait")
        assert r.returncode == 2 and "no worker 'nobody'" in r.stderr
        r = _worker_cli("--worker-id", "ctx")
        assert r.returncode == 2 and "--worker-id needs --broker" in r.stderr


def _health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_minimal_instances_gate_health_and_admission_for_broker_start_c(tmp_path):
    config = tmp_path / "disagg.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "disagg_cluster": {
        "minimal_instances": {"context_servers": 2, "generation_servers": 1}}}))
    with Deployment(http=True, config=str(config)) as d:
        d.add_worker("context", "ctx1")
        d.add_worker("generation", "gen")
        code, body = _health(d.http)
        assert code == 503 and "context workers up 1, need 2" in body["reason"]
        with Client(d.frontend, timeout=30) as c:
            with pytest.raises(RequestFailed) as e:
                c.generate(token_ids=[1] * 8, max_tokens=2)
            assert e.value.code == "NO_WORKERS" and e.value.retryable
            assert "minimal_instances" in e.value.message and "need 2" in e.value.message
            ctx2 = d.add_worker("context", "ctx2")
            assert _health(d.http)[0] == 200
            assert len(c.generate(token_ids=[1] * 8, max_tokens=2, ignore_eos=True).token_ids) == 2
            # a draining worker no longer counts: below the minimum again until it is replaced
            os.kill(ctx2.pid, signal.SIGTERM)
            d.wait_for(_gone("ctx2"), 10, "ctx2 drained")
            assert ctx2.wait(10) == 0
            code, body = _health(d.http)
            assert code == 503 and "context workers up 1, need 2" in body["reason"]
            with pytest.raises(RequestFailed) as e:
                c.generate(token_ids=[1] * 8, max_tokens=2)
            assert e.value.code == "NO_WORKERS"
