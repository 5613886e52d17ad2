"""bench/serving.py (ours against llama-server over HTTP): its pure parts, the HTTP driver's resend
on a connection the server closed, finding llama-server in the cache, and a run against our own
tiny-model deployments without the peer. Nothing here needs the llama.cpp build."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

from bench import llamacpp
from bench.common import ROOT, child_env
from bench.serving import PEER, parse_args, render, server_command, summarize_rounds, verdict
from bench.throughput import HttpDriver


def _metrics(rps: float, ttft_p50: float, ok: int = 8) -> dict:
    return {"completed": ok, "requests": 8, "request_throughput": rps, "output_token_throughput": 64 * rps,
            "ttft_ms": {"p50": ttft_p50, "p99": 2 * ttft_p50}, "tpot_ms": {"p50": 20.0}}


def test_arguments_default_to_the_issues_workload_and_refuse_bad_values():
    a = parse_args([])
    assert (a.input_len, a.output_len, a.concurrency, a.num_prompts) == (128, 64, 8, 32)
    assert a.layouts == ["agg1", "agg2", "disagg"] and a.quantization == ["int8", "fp16"]
    assert parse_args(["--layouts", "disagg", "--quantization", "none,int8"]).quantization == ["none", "int8"]
    assert parse_args(["--peer-threads", "1,2"]).peer_threads == [1, 2]
    for bad in (["--peer-threads", "0"], ["--peer-threads", "x"], ["--layouts", "agg3"], ["--quantization", "int4"], ["--rounds", "0"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_llama_server_command_has_the_threads_slots_and_room_for_every_slot():
    cmd = server_command("/x/llama-server", "/m.gguf", 8123, threads=2, parallel=8, input_len=128, output_len=64)
    args = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "/x/llama-server" and args["-m"] == "/m.gguf" and args["--port"] == "8123"
    assert (args["-t"], args["-tb"], args["-np"]) == ("2", "2", "8")
    assert int(args["-c"]) // 8 >= 128 + 64      # llama-server splits -c among its slots


def test_medians_over_rounds_and_the_verdict_against_the_peer():
    summary = {f"{PEER} -t1": summarize_rounds([_metrics(0.4, 300.0)]),
               f"{PEER} -t2": summarize_rounds([_metrics(1.0, 900.0), _metrics(1.2, 700.0), _metrics(1.1, 800.0)]),
               "agg2 int8": summarize_rounds([_metrics(1.5, 100.0, ok=7)]),
               "disagg int8": summarize_rounds([_metrics(1.3, 50.0)])}
    assert summary[f"{PEER} -t2"]["request_throughput"] == pytest.approx(1.1)
    assert summary[f"{PEER} -t2"]["ttft_ms.p50"] == pytest.approx(800.0)
    assert summary[f"{PEER} -t2"]["request_throughput_rounds"] == [1.0, 1.2, 1.1]
    assert (summary["agg2 int8"]["completed"], summary["agg2 int8"]["requests"]) == (7, 8)
    v = verdict(summary)
    assert v["best"] == "agg2 int8" and v["peer"] == f"{PEER} -t2" and v["beats_req_s"] and v["lower_ttft"]
    assert v["request_throughput_ratio"] == pytest.approx(1.5 / 1.1)
    assert v["ttft_p50_ratio"] == pytest.approx(100.0 / 800.0)
    slower = dict(summary, **{"agg2 int8": summarize_rounds([_metrics(0.5, 900.0)]),
                              "disagg int8": summarize_rounds([_metrics(0.6, 1000.0)])})
    v = verdict(slower)
    assert v["best"] == "disagg int8" and not v["beats_req_s"] and not v["lower_ttft"]
    assert verdict({"agg1 int8": summary["agg2 int8"]}) is None      # no peer measured
    rep = {"config": {"num_prompts": 8, "input_len": 128, "output_len": 64, "concurrency": 8, "rounds": 3},
           "machine": {"cpus": 2}, "gguf": "m.gguf", "summary": summary, "verdict": verdict(summary)}
    text = render(rep)
    assert "agg2 int8" in text and "7/8" in text and "1.00 1.20 1.10" in text
    assert "1.36x llama-server -t2's req/s (at least as many)" in text and "0.12x (lower)" in text


class _FlakySession:
    """Refuses the first ``fail`` posts as a server that closed the pooled connection would."""

    def __init__(self, fail: int):
        self.fail, self.posts = fail, 0

    async def post(self, url, json):
        self.posts += 1
        if self.posts <= self.fail:
            raise aiohttp.ClientOSError(32, "Can not write request body")
        return "response"


def test_http_driver_resends_on_a_connection_the_server_closed():
    async def go(fail: int):
        driver = HttpDriver("http://127.0.0.1:1", None, 5)
        await driver.session.close()
        driver.session = _FlakySession(fail)
        try:
            return await driver._post({}), driver.session.posts
        except aiohttp.ClientOSError:
            return "raised", driver.session.posts

    assert asyncio.run(go(0)) == ("response", 1)
    assert asyncio.run(go(2)) == ("response", 3)
    assert asyncio.run(go(3)) == ("raised", 3)      # a server that keeps refusing is an error


def test_llama_server_is_found_in_its_own_build_dir_and_never_built_with_build_off(tmp_path):
    got, reason = llamacpp.find_or_build_server(str(tmp_path), build=False)
    assert got is None and "llama-server" in reason and "building is off" in reason
    bin_dir = tmp_path / f"server-{llamacpp.VERSION}" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "llama-server").write_text("#!/bin/sh\n")
    os.chmod(bin_dir / "llama-server", 0o755)
    assert llamacpp.find_or_build_server(str(tmp_path), build=False) == (str(bin_dir / "llama-server"), "")
    assert llamacpp.find_or_build(str(tmp_path), build=False)[0] is None     # the tools' build is apart
    assert "-DLLAMA_BUILD_SERVER=ON" in llamacpp.SERVER_CMAKE_OPTIONS
    assert "-DLLAMA_BUILD_SERVER=OFF" in llamacpp.CMAKE_OPTIONS


def test_serving_bench_against_our_tiny_deployments_without_the_peer(tmp_path):
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, "-m", "bench.serving", "--no-peer", "--model", "tiny",
                           "--layouts", "agg1,disagg", "--quantization", "none", "--num-prompts", "3",
                           "--input-len", "16", "--output-len", "6", "--concurrency", "2", "--warmup", "1",
                           "--no-progress", "--out", str(out)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["summary"]) == {"agg1 none", "disagg none"}
    for s in rep["summary"].values():
        assert (s["completed"], s["requests"]) == (3, 3) and s["request_throughput"] > 0
    for (run,) in rep["rounds"].values():
        assert run["mean_output_tokens"] == 6      # ignore_eos: exactly the asked length
    assert rep["verdict"] is None and rep["peer_skipped"] == "--no-peer"
    assert "llama-server: skipped (--no-peer)" in proc.stdout


async def _closing_server():
    """An OpenAI-ish server that drops a pooled keep-alive connection as llama.cpp's does: the
    second request on a connection meets a close instead of an answer (its idle timeout crossing
    the client's reuse). Returns (url, the runner, per-connection request counts)."""
    from aiohttp import web
    seen: dict = {}
    body = (b'data: {"choices": [{"text": "hi"}]}\n\n'
            b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}\n\n'
            b"data: [DONE]\n\n")

    async def completions(request):
        conn = request.transport
        seen[conn] = seen.get(conn, 0) + 1
        if seen[conn] > 1:
            conn.abort()             # closed under the request: no answer byte
        return web.Response(body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner, seen


def test_http_driver_survives_a_server_that_closes_pooled_connections():
    from bench.throughput import Spec

    async def go():
        url, runner, seen = await _closing_server()
        driver = HttpDriver(url, None, 10)
        try:
            results = [await driver.run(Spec(output_len=1, input_len=2, prompt="hi")) for _ in range(3)]
        finally:
            await driver.close()
            await runner.cleanup()
        return results, sorted(seen.values())

    results, per_connection = asyncio.run(go())
    assert [(r.ok, r.error, r.output_tokens) for r in results] == [(True, "", 1)] * 3
    assert per_connection == [1, 2, 2]     # two pooled reuses were closed under the request, then resent
