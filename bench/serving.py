"""Serving against llama.cpp's ``llama-server``, in one run: the same HTTP workload (synthetic text
prompts of ``--input-len`` tokens, ``--output-len`` output tokens, temperature 0, ``ignore_eos``,
``--concurrency`` requests in flight) sent to llama-server on the same GGUF with the same cores,
and to our deployments (aggregated with 1 or 2 ``both`` workers, disaggregated with a context and
a generation worker, each behind the HTTP gateway) at each ``--quantization``.

Every target is started, warmed up, measured and stopped in turn; ``--rounds`` repeats the whole
sequence (targets alternate, since a shared machine is noisy) and the table shows medians over
rounds. The ratio line compares our best deployment (highest median req/s) with llama-server.

The workload, the HTTP driver, the metrics and our deployments are bench/throughput.py's; this
module adds llama-server's process, the loop over targets and the table.

    python -m bench.serving --rounds 2
    python -m bench.serving --no-peer --layouts agg1 --quantization int8 --num-prompts 4
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import urllib.request
from typing import Optional

from bench import llamacpp
from bench.common import RESULTS, children, machine, median, table, write_json
from bench.throughput import Deployment, HttpDriver, measure_target, synthetic

# label -> (mode, 'both' workers); every worker runs 1 torch thread, so each layout uses 2 cores
# at most (agg1 one).
LAYOUTS = {"agg1": ("agg", 1), "agg2": ("agg", 2), "disagg": ("disagg", 1)}
PEER = "llama-server"
SERVER_READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(binary: str, gguf: str, port: int, threads: int, parallel: int,
                   input_len: int, output_len: int) -> list:
    """llama-server on ``gguf`` with ``parallel`` slots (continuous batching), each with room for
    a prompt and its output (text prompts tokenize to about ``input_len`` tokens; slack for more)."""
    per_slot = max(512, 2 * (input_len + output_len))
    return [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
            "-c", str(parallel * per_slot), "--host", "127.0.0.1", "--port", str(port)]


class LlamaServer:
    """llama-server as a child process on a free port, stopped by pid on close."""

    def __init__(self, binary: str, gguf: str, threads: int, a, say):
        self.procs = children(prefix="bench-llama-server-")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.procs.start("llama-server", server_command(binary, gguf, port, threads, a.concurrency,
                                                            a.input_len, a.output_len))
            self._wait_ready(say)
        except BaseException:
            self.procs.close()
            raise

    def _wait_ready(self, say) -> None:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.procs.check_alive(what=f"{self.url}/health")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        say(f"llama-server ready at {self.url}")
                        return
            except OSError:
                pass       # not listening yet, or 503 while the model loads
            time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready at {self.url}/health after {SERVER_READY_TIMEOUT_S} s: "
                           f"{self.procs.tail('llama-server', 5)}")

    def close(self) -> None:
        self.procs.close()


def targets(a, peer: Optional[str]) -> list[dict]:
    out = [{"label": f"{PEER} -t{n}", "kind": "peer", "threads": n} for n in a.peer_threads] if peer else []
    for q in a.quantization:
        for layout in a.layouts:
            out.append({"label": f"{layout} {q}", "kind": "ours", "layout": layout, "quantization": q})
    return out


async def measure_one(a, target: dict, specs, peer: Optional[str], gguf: str, say) -> dict:
    """Start ``target``, warm it up, send the workload once, stop it; its metrics."""
    if target["kind"] == "peer":
        proc = await asyncio.to_thread(LlamaServer, peer, gguf, target["threads"], a, say)
        url = proc.url
    else:
        mode, n = LAYOUTS[target["layout"]]
        opts = {"num_threads": a.worker_threads, "quantization": target["quantization"]}
        proc = await asyncio.to_thread(Deployment, mode, a.model, True, n, opts, a.ready_timeout, say)
        url = proc.url
    try:
        driver = HttpDriver(url, None, a.request_timeout)
        try:
            (run,) = await measure_target(a, driver, target["label"], specs, say)
        finally:
            await driver.close()
    finally:
        proc.close()
    return run["metrics"]


_COLUMNS = [("request_throughput", None), ("output_token_throughput", None), ("ttft_ms", "p50"),
            ("ttft_ms", "p99"), ("tpot_ms", "p50")]


def _value(m: dict, key: str, sub: Optional[str]):
    return m[key][sub] if sub else m[key]


def summarize_rounds(per_round: list[dict]) -> dict:
    """Medians over rounds of the table's columns, and the completed/sent counts summed."""
    out = {f"{k}.{s}" if s else k: median(_value(m, k, s) for m in per_round if _value(m, k, s) is not None)
           for k, s in _COLUMNS}
    # each round's req/s too: a median of few rounds hides a round that a busy machine spoiled
    out["request_throughput_rounds"] = [m["request_throughput"] for m in per_round]
    out["completed"] = sum(m["completed"] for m in per_round)
    out["requests"] = sum(m["requests"] for m in per_round)
    return out


def verdict(summary: dict) -> Optional[dict]:
    """Our best deployment (highest median req/s) against llama-server's best thread count:
    ratios and whether it serves at least as many req/s with a lower TTFT p50. None without both."""
    peers = {t: s for t, s in summary.items() if t.startswith(PEER) and s["request_throughput"]}
    ours = {t: s for t, s in summary.items() if not t.startswith(PEER) and s["request_throughput"]}
    if not peers or not ours:
        return None
    peer_best = max(peers, key=lambda t: peers[t]["request_throughput"])
    peer = peers[peer_best]
    best = max(ours, key=lambda t: ours[t]["request_throughput"])
    b = ours[best]
    return {"best": best, "peer": peer_best,
            "request_throughput_ratio": b["request_throughput"] / peer["request_throughput"],
            "ttft_p50_ratio": (b["ttft_ms.p50"] / peer["ttft_ms.p50"]) if peer["ttft_ms.p50"] else None,
            "beats_req_s": b["request_throughput"] >= peer["request_throughput"],
            "lower_ttft": peer["ttft_ms.p50"] is not None and b["ttft_ms.p50"] < peer["ttft_ms.p50"]}


def render(rep: dict) -> str:
    c = rep["config"]
    rows = [[t, f"{s['completed']}/{s['requests']}", s["request_throughput"], s["output_token_throughput"],
             s["ttft_ms.p50"], s["ttft_ms.p99"], s["tpot_ms.p50"],
             " ".join(f"{x:.2f}" for x in s["request_throughput_rounds"] if x is not None)]
            for t, s in rep["summary"].items()]
    lines = [f"serving over HTTP: {c['num_prompts']} requests of ~{c['input_len']} text tokens in / "
             f"{c['output_len']} out, temperature 0, ignore_eos, concurrency {c['concurrency']}; "
             f"medians of {c['rounds']} round(s); {rep['machine']['cpus']} CPUs; model {rep['gguf']}",
             "", table(["target", "ok", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                                     "req/s by round"], rows)]
    v = rep.get("verdict")
    if v:
        lines += ["", f"best of ours: {v['best']}: {v['request_throughput_ratio']:.2f}x {v['peer']}'s req/s "
                      f"({'at least as many' if v['beats_req_s'] else 'fewer'}), TTFT p50 "
                      f"{v['ttft_p50_ratio']:.2f}x ({'lower' if v['lower_ttft'] else 'not lower'})"]
    elif rep.get("peer_skipped"):
        lines += ["", f"llama-server: skipped ({rep['peer_skipped']})"]
    return "\n".join(lines)


async def bench(a, say) -> dict:
    from workers.engine.loaders import smollm2_path
    gguf = a.gguf or smollm2_path()
    peer, reason = None, "--no-peer"
    if not a.no_peer:
        peer, reason = llamacpp.find_or_build_server(a.llamacpp_cache, jobs=a.build_jobs, build=not a.no_build)
        if peer is None:
            say(f"llama-server: skipped ({reason})")
    specs = synthetic(a.num_prompts, a.input_len, a.output_len, a.seed, text=True)
    plan = targets(a, peer)
    per_target: dict = {t["label"]: [] for t in plan}
    for rnd in range(a.rounds):
        for t in plan:
            say(f"round {rnd + 1}/{a.rounds}: {t['label']}")
            per_target[t["label"]].append(await measure_one(a, t, specs, peer, gguf, say))
    summary = {t: summarize_rounds(ms) for t, ms in per_target.items()}
    config = {k: v for k, v in vars(a).items() if k not in ("request_rate", "slo_ttft_ms", "slo_tpot_ms")}
    return {"benchmark": "serving", "config": config, "machine": machine(), "gguf": os.path.basename(gguf),
            "peer": peer, "peer_skipped": None if peer else reason,
            "peer_command": server_command(peer, gguf, 0, a.peer_threads[0], a.concurrency, a.input_len,
                                           a.output_len) if peer else None,
            "rounds": per_target, "summary": summary, "verdict": verdict(summary)}


def _csv(choices):
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid value(s) {bad or text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def _ints(text: str) -> list:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid thread count(s) {text!r}: expected integers such as 1,2") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="our workers' model (the same GGUF as --gguf)")
    ap.add_argument("--gguf", default=None, help="llama-server's model (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--layouts", type=_csv(list(LAYOUTS)), default=list(LAYOUTS),
                    help=f"our deployments, comma-separated: {', '.join(LAYOUTS)}")
    ap.add_argument("--quantization", type=_csv(["auto", "none", "int8", "fp16"]), default=["int8", "fp16"],
                    help="worker weight precision(s), comma-separated")
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--peer-threads", type=_ints, default=[os.cpu_count() or 2],
                    help="llama-server's -t/-tb, comma-separated to measure several (default: every "
                         "core, as our deployments use; 1 too where other processes share the cores, "
                         "since llama.cpp's threads wait on each other)")
    ap.add_argument("--rounds", type=int, default=1, help="times every target is measured (alternating)")
    ap.add_argument("--num-prompts", type=int, default=32, help="measured requests per target and round")
    ap.add_argument("--input-len", type=int, default=128, help="prompt length, tokens (about, as text)")
    ap.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (and llama-server's -np)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each measurement")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    ap.add_argument("--request-timeout", type=float, default=900, help="seconds per request")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for our workers")
    ap.add_argument("--out", default=os.path.join(RESULTS, "serving.json"), help="JSON results path")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    llamacpp.add_arguments(ap)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    a = ap.parse_args(argv)
    if min(a.peer_threads) < 1:
        ap.error(f"--peer-threads must be >= 1, got {a.peer_threads}")
    for name in ("rounds", "num_prompts", "input_len", "output_len", "concurrency", "worker_threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {a.warmup}")
    # measure_target's fields: every request at once, capped by --concurrency; no SLO here
    a.request_rate, a.slo_ttft_ms, a.slo_tpot_ms = [float("inf")], float("inf"), float("inf")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        rep = asyncio.run(bench(a, say))
    except (RuntimeError, TimeoutError, ValueError, OSError) as e:
        print(f"bench.serving: error: {e}", file=sys.stderr)
        return 1
    write_json(a.out, rep)
    print(render(rep))
    print(f"\nJSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
