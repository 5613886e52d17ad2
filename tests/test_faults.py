"""Workers killed mid-request: requests finish elsewhere or fail clearly, never hang or leak."""
import asyncio
import signal
import time

import pytest

from client import AsyncClient, Client, RequestFailed
from tests.harness import Deployment

pytestmark = pytest.mark.timeout(180)

# liveness window: 10 intervals of 0.2 s = 2 s


async def _gather(frontend, n, prompt_len=20, max_tokens=8, timeout=60):
    async with AsyncClient(frontend, timeout=timeout) as c:
        return await asyncio.gather(*[
            c.generate(token_ids=[(i + j) % 256 for j in range(prompt_len)], max_tokens=max_tokens,
                       ignore_eos=True) for i in range(n)], return_exceptions=True)


def test_killed_context_worker_requests_finish_on_another():
    with Deployment() as d:
        d.add_worker("context", "ctx1")
        d.add_worker("context", "ctx2")
        d.add_worker("generation", "gen")
        d.kill("ctx1", signal.SIGSTOP)       # ctx1 takes requests and never answers ...

        async def scenario():
            task = asyncio.ensure_future(_gather(d.frontend, 8))
            # ... until the broker has dispatched some to it; then it dies
            await asyncio.get_running_loop().run_in_executor(None, lambda: d.wait_for(
                lambda s: any(w["worker_id"] == "ctx1" and w["inflight"] > 0 for w in s["workers"]),
                20, "requests dispatched to ctx1"))
            d.kill("ctx1", signal.SIGKILL)
            return await task

        results = asyncio.run(scenario())
        assert all(not isinstance(r, Exception) for r in results), results
        assert all(len(r.token_ids) == 8 for r in results)
        s = d.wait_idle()
        assert "ctx1" not in {w["worker_id"] for w in s["workers"]}


def test_killed_last_context_worker_fails_clearly_within_the_liveness_window():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        d.kill("ctx", signal.SIGSTOP)
        with Client(d.frontend, timeout=60) as c:
            t0 = time.monotonic()
            it = c.stream(token_ids=[1] * 10, max_tokens=4)
            d.wait_for(lambda s: s["requests"] == 1, 10, "request accepted")
            d.kill("ctx", signal.SIGKILL)
            with pytest.raises(RequestFailed) as e:
                list(it)
            elapsed = time.monotonic() - t0
        assert e.value.code == "NO_WORKERS"
        assert "context worker ctx" in e.value.message and "stopped answering" in e.value.message
        assert elapsed < 10, f"failure took {elapsed:.1f} s"
        d.wait_idle()


def test_killed_generation_worker_fails_its_requests_clearly():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        with Client(d.frontend, timeout=60) as c:
            it = c.stream(token_ids=[2] * 10, max_tokens=4000, ignore_eos=True)
            assert next(it).index == 0
            assert next(it).index == 1                   # decoding on gen
            d.kill("gen", signal.SIGKILL)
            with pytest.raises(RequestFailed) as e:
                list(it)
        assert e.value.code == "WORKER_DIED" and "generation worker gen" in e.value.message
        s = d.wait_idle()
        assert [w["worker_id"] for w in s["workers"]] == ["ctx"]


def test_generation_worker_dying_before_the_pull_hands_over_to_another():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen1", options={"max_batch_size": 64})
        d.add_worker("generation", "gen2", options={"max_batch_size": 1})   # fewer credits: 2nd choice
        d.kill("gen1", signal.SIGSTOP)
        with Client(d.frontend, timeout=60) as c:
            it = c.stream(token_ids=[3] * 30, max_tokens=6, ignore_eos=True)
            d.wait_for(lambda s: any(w["worker_id"] == "gen1" and w["inflight"] for w in s["workers"]),
                       20, "decode dispatched to gen1")
            d.kill("gen1", signal.SIGKILL)
            chunks = list(it)
        ids = [t for ch in chunks for t in ch.token_ids]
        assert len(ids) == 6
        indices = [ch.index + i for ch in chunks for i in range(len(ch.token_ids))]
        assert indices == list(range(6))
        s = d.wait_idle()
        assert {w["worker_id"] for w in s["workers"]} == {"ctx", "gen2"}


def test_request_deadline_fails_with_timeout_and_frees_the_work():
    with Deployment() as d:
        d.add_worker("context", "ctx")
        d.add_worker("generation", "gen")
        with Client(d.frontend, timeout=60) as c:
            with pytest.raises(Exception) as e:
                c.generate(token_ids=[1] * 10, max_tokens=4000, ignore_eos=True, timeout=1.5)
            assert "TIMEOUT" in repr(e.value).upper() or "timed out" in str(e.value).lower()
        d.wait_idle()


def test_launcher_starts_workers_and_leaves_no_orphan(tmp_path):
    import os
    import subprocess
    import sys

    from tests.harness import ROOT, _env
    cfg = tmp_path / "disagg.yaml"
    cfg.write_text("model: tiny\ncontext_servers:\n  num_instances: 1\n  heartbeat_ms: 200\n"
                   "generation_servers:\n  num_instances: 2\n  kv_cache_config:\n    max_tokens: 4096\n")
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "launch", "-c", str(cfg), "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env(), cwd=ROOT)
    try:
        frontend = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("ready:"):
                frontend = dict(w.split("=", 1) for w in line.split()[1:])["frontend"]
                break
            assert line, "launcher exited before it was ready"
        assert frontend
        with Client(frontend, timeout=60) as c:
            assert len(c.generate(prompt="hi", max_tokens=3).token_ids) == 3
            pids = [w["pid"] for w in c.ping()["workers"]]
        assert len(pids) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in pids:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"worker pid {pid} outlived the launcher")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
