"""Smoke tests of the benchmarks: each runs in a tiny configuration and writes its report with the
fields the README and the issue rely on. Timings are measured by bench/, never asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.common import ROOT, child_env, percentile, summarize
from bench.null_worker import FIRST_TOKEN, NullWorker
from bench.throughput import Result, goodput, metrics, sharegpt, synthetic
from broker import protocol as p


def _run(args: list, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _roundtrip(msg: p.Message) -> p.Message:
    return p.decode(msg.encode())


# ---------------------------------------------------------------------------------------------
# pure parts

def test_null_workers_speak_the_worker_protocol():
    held: set = set()     # the fake transfer's registry, shared as in one null-worker process
    ctx, gen = NullWorker("context", "c", held=held), NullWorker("generation", "g", held=held)
    assert _roundtrip(ctx.ready()).role == "context"
    (done,) = ctx.on_message(_roundtrip(p.Prefill("r1", 1, token_ids=[5, 6, 7], sampling={"max_tokens": 3})))
    done = _roundtrip(done)
    assert isinstance(done, p.ContextDone) and done.prompt_token_ids == [5, 6, 7]
    assert done.first_token == FIRST_TOKEN and done.finish_reason is None and ctx.leases == {"r1#1"}
    replies = [_roundtrip(m) for m in gen.on_message(_roundtrip(p.Decode(
        "r1", 2, done.prompt_token_ids, done.first_token, done.first_text, done.kv_handle, {"max_tokens": 3})))]
    assert [type(m).__name__ for m in replies] == ["KvPulled", "Tokens", "Finished"]
    assert [m.index for m in replies if isinstance(m, p.Tokens)] == [1]
    assert replies[-1].attempt == 2
    assert (replies[-1].index, replies[-1].token_ids) == (2, [43])      # the last token rides in it
    assert ctx.leases == set() and ctx.heartbeat().leases == 0     # the pull freed the "KV"
    ctx.on_message(p.Prefill("r3", 1, token_ids=[1], sampling={"max_tokens": 2}))
    assert ctx.heartbeat().leases == 1 and gen.heartbeat().leases == 0
    assert ctx.on_message(p.KvRelease("r3", 1)) == [] and ctx.leases == set()
    # one output token: the context phase ends the request and holds no KV
    (only,) = ctx.on_message(p.Prefill("r2", 1, token_ids=[1], sampling={"max_tokens": 1}))
    assert only.finish_reason == p.Finish.LENGTH and "r2#1" not in ctx.leases


def test_percentiles_and_summary():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    s = summarize([0.001, 0.002, 0.003, None], 1000)
    assert s["count"] == 3 and s["p50"] == pytest.approx(2.0) and s["max"] == pytest.approx(3.0)
    assert summarize([])["p50"] is None


def test_slo_attainment_and_goodput():
    def res(ttft, e2e, n):
        return Result(ok=True, ttft=ttft, e2e=e2e, output_tokens=n, input_tokens=4)
    results = [res(0.1, 1.1, 11), res(0.1, 0.2, 11), res(3.0, 4.0, 11), Result(ok=False, error="x")]
    m = metrics(results, 2.0, slo_ttft=1.0, slo_tpot=0.05)
    # tpot: 0.1 s, 0.01 s, 0.1 s -> only the second meets both SLOs; the failed one counts against
    assert m["completed"] == 3 and m["failed"] == 1 and m["slo_attainment"] == 0.25
    assert m["output_token_throughput"] == 33 / 2.0
    runs = [{"request_rate": r, "metrics": {"slo_attainment": a}}
            for r, a in ((0.5, 1.0), (1.0, 0.95), (2.0, 0.5), (float("inf"), 1.0))]
    assert goodput(runs, 0.9) == 1.0
    assert goodput(runs, 0.99) == 0.5
    assert goodput(runs[2:], 0.9) is None


def test_workloads(tmp_path):
    specs = synthetic(3, 10, 5, seed=1, text=False)
    assert len(specs) == 3 and all(len(s.token_ids) == 10 and s.output_len == 5 for s in specs)
    assert all(3 <= t < 256 for s in specs for t in s.token_ids)
    assert synthetic(3, 10, 5, seed=1, text=False)[0].token_ids == specs[0].token_ids
    assert len(synthetic(1, 12, 5, seed=1, text=True)[0].prompt.split()) == 12
    data = [{"conversations": [{"from": "human", "value": "hello there " * 10}, {"from": "gpt", "value": "x" * 80}]},
            {"conversations": [{"from": "human", "value": "too long " * 1000}, {"from": "gpt", "value": "y"}]},
            {"conversations": [{"from": "human", "value": "only one turn"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    got = sharegpt(str(path), 10, seed=0, max_input=100, max_output=16, output_len=None)
    assert len(got) == 1 and got[0].prompt.startswith("hello") and got[0].output_len == 16
    with pytest.raises(ValueError, match="no usable conversation"):
        sharegpt(str(path), 10, seed=0, max_input=1, max_output=16, output_len=None)


# ---------------------------------------------------------------------------------------------
# whole benchmarks, tiny configurations

def test_broker_bench_smoke(tmp_path):
    out = tmp_path / "broker.json"
    _run(["-m", "bench.broker", "--runs", "1", "--duration", "0.3", "--warmup", "0.1",
          "--latency-duration", "0.2", "--processes", "1", "--conns", "2", "--concurrency", "8",
          "--output-tokens", "3", "--out", str(out)], timeout=120)
    rep = json.loads(out.read_text())
    assert set(rep["summary"]) == {"direct-rt", "direct-seq", "broker"}
    for target, s in rep["summary"].items():
        assert s["errors"] == 0 and s["unfinished"] == 0, (target, s)
    for target, runs in rep["runs"].items():
        assert runs[0]["completed"] > 0, target
    assert rep["one_at_a_time"]["broker"]["latency_ms"]["count"] > 0
    h = rep["headline"]
    for key in ("broker_requests_per_s", "direct_rt_round_trips_per_s", "broker_vs_direct_rt",
                "added_latency_p50_ms_vs_direct_seq", "broker_cpu_us_per_request", "meets_target"):
        assert key in h, key
    assert rep["config"]["broker_messages_per_request"] == 11     # 2 * 3 output tokens + 5


def _check_run(run: dict, n: int, output_len: int) -> None:
    m = run["metrics"]
    assert m["completed"] == n and m["failed"] == 0, m["errors"]
    assert m["mean_output_tokens"] == output_len            # ignore_eos: exactly as requested
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(m[key]) >= {"mean", "p50", "p90", "p99"}, key
    assert m["ttft_ms"]["count"] == n and m["slo_attainment"] is not None
    assert len(run["per_request"]) == n


def test_throughput_compare_smoke(tmp_path):
    out = tmp_path / "t.json"
    proc = _run(["-m", "bench.throughput", "--launch", "--compare", "--model", "tiny", "--num-prompts", "3",
                 "--input-len", "8", "--output-len", "5", "--request-rate", "50,inf", "--warmup", "1",
                 "--out", str(out)], timeout=240)
    rep = json.loads(out.read_text())
    assert [(r["target"], r["request_rate"]) for r in rep["runs"]] == \
        [("agg", 50.0), ("agg", "inf"), ("disagg", 50.0), ("disagg", "inf")]
    for run in rep["runs"]:
        _check_run(run, 3, 5)
    assert set(rep["compare"]) >= {"rate=50.0", "rate=inf"}
    assert "output_token_throughput" in rep["compare"]["rate=inf"]
    assert "disaggregated / aggregated" in proc.stdout
    assert (tmp_path / "t.png").stat().st_size > 0      # matplotlib is in the test extra


def test_throughput_http_smoke(tmp_path):
    out = tmp_path / "h.json"
    _run(["-m", "bench.throughput", "--launch", "--api", "http", "--mode", "disagg", "--model", "tiny",
          "--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--request-rate", "inf",
          "--concurrency", "2", "--warmup", "1", "--no-plot", "--out", str(out)], timeout=180)
    rep = json.loads(out.read_text())
    assert rep["config"]["api"] == "http"
    _check_run(rep["runs"][0], 3, 4)


def test_throughput_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--frontend", "tcp://127.0.0.1:1",
                           "--launch"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "exactly one target" in proc.stderr


def test_cpu_lists_parse_like_taskset_and_name_bad_input():
    from bench.broker import harness_cpus
    from bench.common import parse_cpus
    assert parse_cpus("1") == {1} and parse_cpus("0,2-3") == {0, 2, 3}
    with pytest.raises(ValueError, match="'x'"):
        parse_cpus("x")
    avail = sorted(os.sched_getaffinity(0))
    assert harness_cpus("none") is None
    assert harness_cpus("last") == ({avail[-1]} if len(avail) > 1 else None)
    with pytest.raises(Exception, match="not available"):
        harness_cpus(str(max(avail) + 1))


def test_progress_bar_counts_agree_and_it_stays_off_when_not_a_terminal(monkeypatch):
    import io

    from bench.common import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress(3, "x").disable      # pytest's stderr is not a terminal
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert progress(3, "x", enabled=False).disable
    with progress(4, "run") as bar:
        assert not bar.disable
        for _ in range(4):
            bar.update(1)
    last = term.getvalue().split("\r")[-1]
    assert "4/4" in last and "100%" in last, last
    with progress(4, "run") as bar:
        bar.update(1)
        bar.refresh()
        now = term.getvalue().split("\r")[-1]
        assert "1/4" in now and "25%" in now, now


def test_sampler_bench_smoke(tmp_path):
    out = tmp_path / "s.json"
    _run(["-m", "bench.sampler", "--batches", "1,4", "--repeats", "1", "--logits", "random",
          "--baseline-rev", "HEAD", "--json", str(out)], timeout=120)
    rep = json.loads(out.read_text())
    assert [r["batch"] for r in rep["results"]] == [1, 4]
    assert all(r["baseline"] > 0 and r["new"] > 0 for r in rep["results"])


def test_engine_attention_bench_smoke():
    proc = _run(["-m", "bench.engine_attention", "--baseline", "HEAD", "--model", "tiny", "--batches", "1,4",
                 "--history", "20", "--prefill", "32", "--rounds", "1"], timeout=120)
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("decode", "prefill"))]
    assert [r[:2] for r in rows] == [["decode", "b=1"], ["decode", "b=4"], ["prefill", "32"]]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)     # step ms: baseline, this tree


def test_multi_turn_chats_resend_their_history_interleaved():
    from bench.throughput import multi_turn, shared_prefix
    specs = multi_turn(7, 3, input_len=5, output_len=4, seed=1)
    assert len(specs) == 7
    chats = 3                                   # ceil(7 / 3): turn 1 of chats 0-2, then turn 2, ...
    for i in range(chats, len(specs)):
        prev, cur = specs[i - chats].token_ids, specs[i].token_ids
        assert cur[:len(prev)] == prev and len(cur) == len(prev) + 4 + 5
    shared = shared_prefix(3, 20, 6, 2, seed=1)
    assert all(s.token_ids[:20] == shared[0].token_ids[:20] and len(s.token_ids) == 26 for s in shared)
    assert len({tuple(s.token_ids[20:]) for s in shared}) == 3


def test_throughput_shared_prefix_compares_prefix_caching_on_and_off(tmp_path):
    out = tmp_path / "t.json"
    proc = _run(["-m", "bench.throughput", "--launch", "--mode", "agg", "--compare-reuse", "--model", "tiny",
                 "--workload", "shared-prefix", "--prefix-len", "64", "--input-len", "8", "--output-len", "4",
                 "--num-prompts", "4", "--concurrency", "1", "--request-rate", "inf", "--warmup", "1",
                 "--no-plot", "--out", str(out)], timeout=240)
    rep = json.loads(out.read_text())
    hits = {r["target"]: r["metrics"]["cache_hit_rate"] for r in rep["runs"]}
    # with caching, every request after the warm-up finds the 64-token prefix (4 blocks of 16)
    assert hits["agg-noreuse"] == 0 and hits["agg"] == pytest.approx(64 / 72)
    assert [q["cached_tokens"] for q in rep["runs"][0]["per_request"]] == [64] * 4
    assert "agg: prefix caching on / off" in proc.stdout and "ttft_ms.p50" in rep["compare_reuse"]["agg"]["rate=inf"]


def test_shared_prefix_with_several_system_prompts_draws_one_per_request():
    from bench.throughput import shared_prefix
    one = shared_prefix(5, 20, 6, 2, seed=4)
    assert one == shared_prefix(5, 20, 6, 2, seed=4, num_prefixes=1)      # the old workload, unchanged
    specs = shared_prefix(40, 20, 6, 2, seed=4, num_prefixes=3)
    heads = {tuple(s.token_ids[:20]) for s in specs}
    assert len(heads) == 3 and all(len(s.token_ids) == 26 for s in specs)


def test_throughput_compares_routers_on_several_context_workers(tmp_path):
    out = tmp_path / "r.json"
    proc = _run(["-m", "bench.throughput", "--launch", "--mode", "disagg", "--model", "tiny",
                 "--compare-routers", "round_robin,kv_cache_aware", "--context-instances", "2",
                 "--workload", "shared-prefix", "--num-prefixes", "2", "--prefix-len", "64", "--input-len", "8",
                 "--output-len", "2", "--num-prompts", "8", "--concurrency", "1", "--request-rate", "inf",
                 "--warmup", "0", "--no-plot", "--out", str(out)], timeout=240)
    rep = json.loads(out.read_text())
    hits = {r["target"]: r["metrics"]["cache_hit_rate"] for r in rep["runs"]}
    assert set(hits) == {"disagg-round_robin", "disagg-kv_cache_aware"}
    # kv_cache_aware sends each prefix where it is cached: only each prefix's first request misses
    assert hits["disagg-kv_cache_aware"] >= hits["disagg-round_robin"]
    assert "disagg-kv_cache_aware / round_robin" in proc.stdout
    assert "ttft_ms.p50" in rep["compare_routers"]["disagg-kv_cache_aware"]["rate=inf"]
