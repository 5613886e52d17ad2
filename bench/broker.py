"""The broker alone: full disaggregated requests per second with null workers, against a direct
DEALER-ROUTER round trip measured in the same run.

One request through the broker is the whole disaggregated path: ``Submit`` -> ``Accepted`` ->
``Prefill`` to a null context worker -> ``ContextDone`` -> first ``Tokens`` to the client ->
``Decode`` to a null generation worker -> ``KvPulled`` -> ``Tokens`` ... -> ``Finished`` -> ``Final``
(the last token rides in ``Finished`` and ``Final``).
Messages for one peer travel in batches (``broker.protocol.encode_many``) where the broker, the
workers or the direct server have several ready at once; clients' ``Submit``s go one by one.

The baselines use the same load generator and the same messages with no broker in between: a ROUTER that answers each ``Submit`` with one ``Final`` (``direct-rt``, the
plain round trip) and one that answers with the very messages the broker would send this client
(``direct-seq``: ``Accepted``, ``Tokens`` per token but the last, ``Final`` with the last, same sizes, batched per client
and per drain of its socket as the broker batches).

Processes: the broker (``broker.cli start``), one process holding the null context and generation
workers (``bench.null_worker``), the direct servers, and ``--processes`` load generators, each a
closed loop of raw ZeroMQ DEALER sockets and ``broker.protocol`` frames (not the client library,
whose per-request cost would be measured instead of the broker's). The load generators and null
workers are confined to the last CPU (``--harness-cpus``), so the harness does not take CPU time
from what is measured; the broker and the direct servers may run on any CPU. The table reports
each process's CPU use so the reader can see who was the limit.

    python -m bench.broker                     # defaults: 5 runs, table + bench/results/broker.json
    python -m bench.broker --runs 1 --duration 1 --out /tmp/b.json    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

import msgpack
import zmq

from broker import protocol as p
from bench.common import (RESULTS, children, cpu_seconds, machine, median, parse_cpus, quiet_gc, recv_frames,
                          send_frames, start_broker, summarize, table, write_json)
from broker.auth import CurveClient, keygen
from broker.launch import Children, read_line, ready_words, wait_for_workers

_TOKENS, _FINAL, _ERROR, _ACCEPTED, _BATCH = p.Tokens.CMD, p.Final.CMD, p.Error.CMD, p.Accepted.CMD, p.BATCH


def submit_template(prompt_tokens: int, output_tokens: int) -> dict:
    """The body of one benchmark ``Submit`` (its request id is replaced per request)."""
    ids = [3 + i % 250 for i in range(prompt_tokens)]
    msg = p.Submit("x", token_ids=ids, sampling={"max_tokens": output_tokens, "ignore_eos": True},
                   timeout_ms=60_000)
    return msg.body()


def broker_messages_per_request(output_tokens: int) -> int:
    """Messages the broker receives and sends for one full disaggregated request."""
    n = output_tokens
    if n == 1:      # Submit, ContextDone (that ends it); Accepted, Prefill, Final (with the token)
        return 2 + 3
    received = 1 + 1 + 1 + (n - 2) + 1      # Submit, ContextDone, KvPulled, Tokens, Finished (+ last)
    sent = 1 + 1 + 1 + 1 + (n - 2) + 1      # Accepted, Prefill, Tokens, Decode, Tokens, Final (+ last)
    return received + sent


# ---------------------------------------------------------------------------------------------
# direct server: a ROUTER with no broker behind it

def direct_replies(mode: str, prompt_tokens: int, output_tokens: int) -> list:
    """Reply bodies (request id to be filled in) a direct server sends for each Submit: the same
    messages, of the same sizes, that the broker sends a client for one request."""
    final = p.Final("x", p.Finish.LENGTH, {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens},
                    {"queue": 1.5e-5, "prefill": 0.0, "kv_transfer": 0.0, "ttft": 3.1e-4, "total": 6.2e-4})
    if mode == "rt":
        return [final]
    n = output_tokens
    last = p.Final(final.request_id, final.finish_reason, final.usage, final.timings, n - 1,
                   [42 if n == 1 else 43], "x" if n == 1 else "y")     # the last token rides in it
    return [p.Accepted("x"), *(p.Tokens("x", i, [42 if i == 0 else 43], "x" if i == 0 else "y")
                               for i in range(n - 1)), last]


def run_direct(mode: str, prompt_tokens: int, output_tokens: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 1_000_000)
    s.setsockopt(zmq.RCVHWM, 1_000_000)
    s.bind("tcp://127.0.0.1:*")
    replies = [(msg.CMD, msg.body()) for msg in direct_replies(mode, prompt_tokens, output_tokens)]
    quiet_gc()
    print(f"direct ready frontend={s.getsockopt_string(zmq.LAST_ENDPOINT)} pid={os.getpid()}", flush=True)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    batch_head, final_head, skip = p.header(p.BATCH), p.header(p.Final.CMD), p.HEADER_LEN
    parent = os.getppid()
    while os.getppid() == parent:   # stopped by SIGTERM from the parent, or when it is gone
        if not s.poll(1000):
            continue
        if mode == "rt":            # the plain round trip: one reply message per request
            while (frames := recv_frames(s)) is not None:
                tmpl = replies[0][1]
                tmpl["request_id"] = unpackb(memoryview(frames[1])[skip:])["request_id"]
                send_frames(s, [frames[0], final_head + packb(tmpl, use_bin_type=True)])
            continue
        # the same messages the broker sends, batched per client and per drain as the broker does
        out: dict = {}
        while (frames := recv_frames(s)) is not None:
            rid = unpackb(memoryview(frames[1])[skip:])["request_id"]
            items = out.setdefault(frames[0], [])
            for cmd, tmpl in replies:
                items.append((cmd, dict(tmpl, request_id=rid)))
        for ident, items in out.items():
            send_frames(s, [ident, batch_head + packb(items, use_bin_type=True)])


# ---------------------------------------------------------------------------------------------
# load generator: a closed loop over raw DEALER sockets

def load(address: str, conns: int, concurrency: int, t0: float, warmup: float, duration: float,
         prompt_tokens: int, output_tokens: int, drain_s: float = 10.0, curve=None) -> dict:
    """Keep ``concurrency`` requests in flight (split over ``conns`` sockets) from monotonic time
    ``t0`` for ``warmup + duration`` seconds; count the requests that end in the measured window.
    ``curve``: a ``broker.auth.CurveClient`` for a broker with CURVE."""
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()
    for _ in range(conns):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1_000_000)
        s.setsockopt(zmq.RCVHWM, 1_000_000)
        if curve is not None:
            curve.apply(s)
        s.connect(address)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    head, skip = p.header(p.Submit.CMD), p.HEADER_LEN
    body = submit_template(prompt_tokens, output_tokens)
    packb, unpackb, now_f = msgpack.packb, msgpack.unpackb, time.monotonic
    per_conn = [concurrency // conns + (1 if i < concurrency % conns else 0) for i in range(conns)]
    inflight = [0] * conns
    sent: dict = {}          # request id -> (conn, submit time)
    first: dict = {}         # request id -> first token time
    lat, ttft = [], []
    done = errors = 0
    prefix, counter = f"{os.getpid():x}-", 0
    warm_end, t_end = t0 + warmup, t0 + warmup + duration
    quiet_gc()
    while now_f() < t0:
        time.sleep(min(0.01, max(0.0, t0 - now_f())))
    cpu0, cpu_w = time.process_time(), None

    def submit(i: int) -> None:
        nonlocal counter
        counter += 1
        rid = prefix + str(counter)
        body["request_id"] = rid
        sent[rid] = (i, now_f())
        inflight[i] += 1
        send_frames(socks[i], [head + packb(body, use_bin_type=True)])

    def receive(sock, i: int, measure: bool) -> None:
        nonlocal done, errors
        for _ in range(10_000):
            frames = recv_frames(sock)
            if frames is None:
                return
            t = now_f()
            msg = frames[0]
            cmd = msg[skip - 1]
            if cmd == _BATCH:
                items = unpackb(memoryview(msg)[skip:])
            elif cmd == _ACCEPTED:
                continue
            else:
                items = ((cmd, unpackb(memoryview(msg)[skip:])),)
            for cmd, b in items:
                if cmd == _TOKENS:
                    if b["index"] == 0:
                        first[b["request_id"]] = t
                elif cmd == _FINAL or cmd == _ERROR:
                    rid = b["request_id"]
                    conn, ts = sent.pop(rid, (None, None))
                    tf = first.pop(rid, None)
                    if conn is None:
                        continue
                    inflight[conn] -= 1
                    if cmd == _ERROR:
                        errors += 1
                    elif measure and warm_end <= t < t_end:
                        done += 1
                        lat.append(t - ts)
                        if tf is not None:
                            ttft.append(tf - ts)

    index = {s: i for i, s in enumerate(socks)}
    while (now := now_f()) < t_end:
        if cpu_w is None and now >= warm_end:
            cpu_w = time.process_time()
        for i in range(conns):
            while inflight[i] < per_conn[i]:
                submit(i)
        for sock, _ in poller.poll(max(1, min(100, int((t_end - now) * 1000)))):
            receive(sock, index[sock], True)
    cpu1 = time.process_time()
    drain_end = now_f() + drain_s
    while sent and now_f() < drain_end:   # let every request finish, so the broker ends empty
        for sock, _ in poller.poll(100):
            receive(sock, index[sock], False)
    for s in socks:
        s.close(0)
    ctx.term()
    return {"completed": done, "errors": errors, "unfinished": len(sent),
            "cpu_s": cpu1 - (cpu_w if cpu_w is not None else cpu0),
            "latency_s": [round(x, 7) for x in lat], "ttft_s": [round(x, 7) for x in ttft]}


def loadgen_main(cpus: Optional[set] = None) -> int:
    """A load generator process: one JSON command per stdin line, one JSON result per line."""
    if cpus:
        os.sched_setaffinity(0, cpus)    # before any ZeroMQ thread starts: they inherit it
    print("loadgen ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        curve = CurveClient.load(*cmd["curve"]) if cmd.get("curve") else None
        res = load(cmd["address"], cmd["conns"], cmd["concurrency"], cmd["t0"], cmd["warmup"],
                   cmd["duration"], cmd["prompt_tokens"], cmd["output_tokens"], curve=curve)
        print(json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# the benchmark

class Bench:
    def __init__(self, args, procs: Children):
        self.args, self.procs = args, procs
        self.loadgens: list[subprocess.Popen] = []
        self.targets: dict[str, str] = {}     # name -> frontend address
        self.pids: dict[str, int] = {}        # name -> server process pid (CPU accounting)
        self.curve: Optional[list] = None     # the load generators' key pair and the broker's key

    def setup(self) -> None:
        a = self.args
        b = start_broker(self.procs)
        self.targets["broker"], self.pids["broker"] = b["frontend"], b["pid"]
        cpus = ",".join(map(str, sorted(a.harness_cpus))) if a.harness_cpus else ""
        nw = self.procs.start("null-workers", [sys.executable, "-m", "bench.null_worker",
                                               "--broker", b["backend"], "--role", "context",
                                               "--role", "generation", "--max-seconds", "3600",
                                               *(["--cpus", cpus] if cpus else [])])
        self.pids["null-workers"] = nw.pid
        wait_for_workers(b["frontend"], {"context": 1, "generation": 1}, 30, self.procs)
        if a.curve:
            self._start_curve_broker(cpus)
        for mode in ("rt", "seq"):
            name = f"direct-{mode}"
            proc = self.procs.start(name, [sys.executable, "-m", "bench.broker", "_direct", mode,
                                           str(a.prompt_tokens), str(a.output_tokens)],
                                    stdout=subprocess.PIPE)
            words = ready_words(read_line(proc, 30, "ready line"))
            self.targets[name], self.pids[name] = words["frontend"], proc.pid
        for i in range(a.processes):
            proc = self.procs.start(f"loadgen-{i}", [sys.executable, "-m", "bench.broker", "_load", *([cpus] if cpus else [])],
                                    stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            read_line(proc, 30, "ready line")
            self.loadgens.append(proc)

    def _start_curve_broker(self, cpus: str) -> None:
        """The same broker and null workers with CURVE on both sockets (target broker-curve)."""
        d = os.path.join(self.procs.tmp.name, "keys")
        pairs = {n: keygen(os.path.join(d, n), n)[1] for n in ("broker", "clients", "workers")}
        b = start_broker(self.procs, extra=["--curve-key", pairs["broker"], "--client-keys",
                                            os.path.join(d, "clients"), "--worker-keys", os.path.join(d, "workers")])
        self.targets["broker-curve"], self.pids["broker-curve"] = b["frontend"], b["pid"]
        server = pairs["broker"][:-len("_secret")]
        nw = self.procs.start("null-workers-curve", [
            sys.executable, "-m", "bench.null_worker", "--broker", b["backend"], "--role", "context",
            "--role", "generation", "--max-seconds", "3600", "--curve-key", pairs["workers"],
            "--curve-server-key", server, *(["--cpus", cpus] if cpus else [])])
        self.pids["null-workers-curve"] = nw.pid
        self.curve = [pairs["clients"], server]
        wait_for_workers(b["frontend"], {"context": 1, "generation": 1}, 30, self.procs,
                         curve=CurveClient.load(*self.curve))

    def measure(self, target: str, processes: int, concurrency: int, duration: float) -> dict:
        """One closed-loop measurement of one target with ``processes`` load generators."""
        a = self.args
        gens = self.loadgens[:processes]
        t0 = time.monotonic() + 0.3
        per_proc = [concurrency // processes + (1 if i < concurrency % processes else 0)
                    for i in range(processes)]
        for g, c in zip(gens, per_proc):
            g.stdin.write(json.dumps({"op": "run", "address": self.targets[target],
                                      "conns": min(a.conns, c), "concurrency": c, "t0": t0,
                                      "warmup": a.warmup, "duration": duration,
                                      "prompt_tokens": a.prompt_tokens,
                                      "output_tokens": a.output_tokens,
                                      "curve": self.curve if target == "broker-curve" else None}) + "\n")
            g.stdin.flush()
        time.sleep(max(0.0, t0 + a.warmup - time.monotonic()))
        pid = self.pids[target]
        workers = {"broker": "null-workers", "broker-curve": "null-workers-curve"}.get(target)
        helpers = [pid] + ([self.pids[workers]] if workers else [])
        cpu0 = [cpu_seconds(x) for x in helpers]
        time.sleep(max(0.0, t0 + a.warmup + duration - time.monotonic()))
        cpu1 = [cpu_seconds(x) for x in helpers]
        results = [json.loads(read_line(g, duration + a.warmup + 30, "result")) for g in gens]
        lat = [x for r in results for x in r["latency_s"]]
        ttft = [x for r in results for x in r["ttft_s"]]
        done = sum(r["completed"] for r in results)
        out = {
            "target": target, "processes": processes, "concurrency": concurrency,
            "duration_s": duration, "completed": done,
            "errors": sum(r["errors"] for r in results),
            "unfinished": sum(r["unfinished"] for r in results),
            "requests_per_s": done / duration,
            "latency_ms": summarize(lat, 1000), "ttft_ms": summarize(ttft, 1000),
            "server_cpu_pct": 100 * (cpu1[0] - cpu0[0]) / duration,
            "server_cpu_us_per_request": 1e6 * (cpu1[0] - cpu0[0]) / done if done else None,
            "loadgen_cpu_pct": 100 * sum(r["cpu_s"] for r in results) / duration,
        }
        if workers:
            out["null_workers_cpu_pct"] = 100 * (cpu1[1] - cpu0[1]) / duration
        return out

    def close(self) -> None:
        for g in self.loadgens:
            try:
                g.stdin.write(json.dumps({"op": "quit"}) + "\n")
                g.stdin.flush()
            except (OSError, ValueError):
                pass


TARGETS = ("direct-rt", "direct-seq", "broker")     # and broker-curve with --curve


def summarize_runs(runs: list[dict]) -> dict:
    """Median of each headline number over repeated runs of one target."""
    def med(key, sub=None):
        return median(r[key][sub] if sub else r[key] for r in runs)
    rps = [r["requests_per_s"] for r in runs]
    return {"requests_per_s": med("requests_per_s"), "requests_per_s_min": min(rps),
            "requests_per_s_max": max(rps), "latency_p50_ms": med("latency_ms", "p50"),
            "latency_p99_ms": med("latency_ms", "p99"), "ttft_p50_ms": med("ttft_ms", "p50"),
            "server_cpu_pct": med("server_cpu_pct"), "loadgen_cpu_pct": med("loadgen_cpu_pct"),
            "server_cpu_us_per_request": med("server_cpu_us_per_request"),
            "null_workers_cpu_pct": med("null_workers_cpu_pct") if "null_workers_cpu_pct" in runs[0] else None,
            "errors": sum(r["errors"] for r in runs), "unfinished": sum(r["unfinished"] for r in runs),
            "runs": len(runs)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.broker",
                                 description="Broker throughput and added latency with null workers, "
                                             "against a direct DEALER-ROUTER round trip in the same run.")
    ap.add_argument("--processes", type=int, default=2, help="load generator processes (default: 2)")
    ap.add_argument("--conns", type=int, default=4,
                    help="DEALER connections per load generator process (default: 4)")
    ap.add_argument("--concurrency", type=int, default=256,
                    help="requests kept in flight, over all load generators (default: 256)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="token ids per prompt (default: 32)")
    ap.add_argument("--output-tokens", type=int, default=2,
                    help="output tokens per request: the first from the context worker, the rest "
                         "from the generation worker, one Tokens message each (default: 2)")
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default: 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run (default: 0.5)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each target; medians are reported (default: 5)")
    ap.add_argument("--latency-duration", type=float, default=2.0,
                    help="seconds of one-at-a-time requests for the added latency (default: 2)")
    ap.add_argument("--target-rps", type=float, default=5000.0,
                    help="requests per second the broker should sustain (default: 5000)")
    ap.add_argument("--harness-cpus", type=harness_cpus, default="last", metavar="LIST",
                    help="CPUs the load generators and null workers are confined to, so that they "
                         "take no CPU time from the broker or the direct servers (which may run on "
                         "any CPU): a list such as 1 or 2-3, 'last' (the last CPU, the default on a "
                         "machine with two or more) or 'none'")
    ap.add_argument("--curve", action="store_true",
                    help="also measure a broker with CURVE on both sockets (target broker-curve: "
                         "its clients and null workers authenticate and encrypt)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "broker.json"),
                    help="JSON results path (default: bench/results/broker.json)")
    return ap


def harness_cpus(text: str) -> Optional[set]:
    """--harness-cpus: None (no confinement) or a set of CPUs this process may use."""
    avail = sorted(os.sched_getaffinity(0))
    if text == "none" or (text == "last" and len(avail) < 2):
        return None
    cpus = {avail[-1]} if text == "last" else parse_cpus(text)
    if not cpus <= set(avail):
        raise argparse.ArgumentTypeError(f"--harness-cpus {text}: CPUs {sorted(cpus - set(avail))} "
                                         f"are not available (this process may use {avail})")
    return cpus


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        return loadgen_main(parse_cpus(argv[1]) if len(argv) > 1 else None)
    if argv[:1] == ["_direct"]:
        run_direct(argv[1], int(argv[2]), int(argv[3]))
        return 0
    args = build_parser().parse_args(argv)
    for name in ("processes", "conns", "concurrency", "prompt_tokens", "output_tokens", "runs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.concurrency < args.processes:
        raise SystemExit(f"--concurrency {args.concurrency} must be >= --processes {args.processes}")
    args.targets = TARGETS + (("broker-curve",) if args.curve else ())
    runs: dict = {t: [] for t in args.targets}
    latency: dict = {}
    with children(prefix="bench-broker-") as procs:
        bench = Bench(args, procs)
        try:
            bench.setup()
            total = args.runs * len(args.targets) + len(args.targets)
            step = 0
            for r in range(args.runs):
                # interleaved, in alternating order, so the machine's noise (and whatever the
                # target run before leaves behind) falls on every target alike
                for t in (args.targets if r % 2 == 0 else args.targets[::-1]):
                    step += 1
                    res = bench.measure(t, args.processes, args.concurrency, args.duration)
                    runs[t].append(res)
                    print(f"[{step}/{total}] run {r + 1} {t}: {res['requests_per_s']:,.0f} req/s, "
                          f"p50 {res['latency_ms']['p50'] or 0:.2f} ms, server CPU "
                          f"{res['server_cpu_pct']:.0f}%, errors {res['errors']}", file=sys.stderr)
            for t in args.targets:
                step += 1
                latency[t] = bench.measure(t, 1, 1, args.latency_duration)
                print(f"[{step}/{total}] one at a time {t}: p50 {latency[t]['latency_ms']['p50'] or 0:.3f} ms",
                      file=sys.stderr)
        finally:
            bench.close()
    report = build_report(args, runs, latency)
    write_json(args.out, report)
    print(render(report))
    print(f"\nJSON: {args.out}")
    return 0


def build_report(args, runs: dict, latency: dict) -> dict:
    summary = {t: summarize_runs(runs[t]) for t in runs}
    b, seq, rt = summary["broker"], summary["direct-seq"], summary["direct-rt"]
    lb, lseq, lrt = (latency[t]["latency_ms"]["p50"] for t in ("broker", "direct-seq", "direct-rt"))
    ratio = lambda x, y: (x / y) if x and y else None
    return {
        "benchmark": "broker",
        "config": {"processes": args.processes, "conns_per_process": args.conns,
                   "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                   "output_tokens": args.output_tokens, "duration_s": args.duration,
                   "warmup_s": args.warmup, "runs": args.runs,
                   "broker_messages_per_request": broker_messages_per_request(args.output_tokens),
                   "process_count": {"broker": 1, "null_workers": 1, "direct_servers": 2,
                                     "load_generators": args.processes},
                   "harness_cpus": sorted(args.harness_cpus) if args.harness_cpus else None},
        "machine": machine(),
        "summary": summary,
        "one_at_a_time": {t: {"latency_ms": latency[t]["latency_ms"], "ttft_ms": latency[t]["ttft_ms"],
                              "requests_per_s": latency[t]["requests_per_s"]} for t in runs},
        "headline": {
            "broker_requests_per_s": b["requests_per_s"],
            "direct_rt_round_trips_per_s": rt["requests_per_s"],
            "direct_seq_requests_per_s": seq["requests_per_s"],
            "broker_vs_direct_rt": ratio(b["requests_per_s"], rt["requests_per_s"]),
            "broker_vs_direct_seq": ratio(b["requests_per_s"], seq["requests_per_s"]),
            "broker_messages_per_s": (b["requests_per_s"] or 0) * broker_messages_per_request(args.output_tokens),
            # CPU seconds the broker process spent per request (its ZeroMQ I/O thread included),
            # and what one whole core would sustain at that cost: an extrapolation, not a measurement
            "broker_cpu_us_per_request": b["server_cpu_us_per_request"],
            "broker_projected_requests_per_s_one_core": (1e6 / b["server_cpu_us_per_request"])
            if b["server_cpu_us_per_request"] else None,
            "added_latency_p50_ms_vs_direct_seq": (lb - lseq) if lb is not None and lseq is not None else None,
            "added_latency_p50_ms_vs_direct_rt": (lb - lrt) if lb is not None and lrt is not None else None,
            "target_requests_per_s": args.target_rps,
            "meets_target": bool(b["requests_per_s"] and b["requests_per_s"] >= args.target_rps),
            **(curve_headline(b, summary["broker-curve"], latency) if "broker-curve" in summary else {}),
        },
        "runs": {t: [{k: v for k, v in r.items()} for r in runs[t]] for t in runs},
    }


def curve_headline(plain: dict, curve: dict, latency: dict) -> dict:
    """What CURVE costs the broker: its request rate and CPU per request against the plain one."""
    lp, lc = (latency[t]["latency_ms"]["p50"] for t in ("broker", "broker-curve"))
    cp, cc = plain["server_cpu_us_per_request"], curve["server_cpu_us_per_request"]
    return {"curve_requests_per_s": curve["requests_per_s"],
            "curve_vs_plain": (curve["requests_per_s"] / plain["requests_per_s"])
            if curve["requests_per_s"] and plain["requests_per_s"] else None,
            "curve_cpu_us_per_request_added": (cc - cp) if cc is not None and cp is not None else None,
            "curve_added_latency_p50_ms": (lc - lp) if lc is not None and lp is not None else None}


def render(report: dict) -> str:
    c, s, h, one = report["config"], report["summary"], report["headline"], report["one_at_a_time"]
    rows = []
    for t in s:
        x = s[t]
        rows.append([t, x["requests_per_s"], f"{x['requests_per_s_min']:,.0f}-{x['requests_per_s_max']:,.0f}",
                     x["latency_p50_ms"], x["latency_p99_ms"], one[t]["latency_ms"]["p50"],
                     x["server_cpu_pct"], x["server_cpu_us_per_request"], x["null_workers_cpu_pct"],
                     x["loadgen_cpu_pct"], x["errors"]])
    head = (f"broker benchmark: {c['processes']} load generator processes x {c['conns_per_process']} "
            f"connections, {c['concurrency']} requests in flight, {c['prompt_tokens']} prompt tokens, "
            f"{c['output_tokens']} output tokens ({c['broker_messages_per_request']} broker messages per "
            f"request), median of {c['runs']} runs of {c['duration_s']:g} s; {report['machine']['cpus']} CPUs: "
            + (f"load generators and null workers on CPU {','.join(map(str, c['harness_cpus']))}, the "
               "broker and direct servers on any" if c.get("harness_cpus") else "shared by all processes"))
    t = table(["target", "req/s", "range", "p50 ms", "p99 ms", "p50 ms @1", "server CPU%",
               "server CPU us/req", "null wkr CPU%", "loadgen CPU%", "errors"], rows)
    def f(key: str, spec: str, scale: float = 1) -> str:    # a ratio is None where its base measured 0
        return "n/a" if h[key] is None else format(h[key] * scale, spec)

    tail = (f"broker: {f('broker_requests_per_s', ',.0f')} full disaggregated req/s "
            f"({f('broker_messages_per_s', ',.0f')} broker messages/s) = "
            f"{f('broker_vs_direct_rt', '.2f')}x the direct round trip, "
            f"{f('broker_vs_direct_seq', '.2f')}x the direct same-messages exchange; "
            f"added latency at one request in flight: "
            f"{f('added_latency_p50_ms_vs_direct_seq', '.0f', 1000)} us (p50, vs direct-seq); "
            f"target {h['target_requests_per_s']:,.0f} req/s: {'met' if h['meets_target'] else 'NOT met'}.\n"
            f"broker CPU per request {f('broker_cpu_us_per_request', '.0f')} us (process total, I/O thread "
            f"included): one whole core would sustain about "
            f"{f('broker_projected_requests_per_s_one_core', ',.0f')} req/s (extrapolated)")
    if "curve_vs_plain" in h:
        tail += (f"\nCURVE on both broker sockets: {f('curve_requests_per_s', ',.0f')} req/s = "
                 f"{f('curve_vs_plain', '.2f')}x without, {f('curve_cpu_us_per_request_added', '+.0f')} us "
                 f"broker CPU per request, {f('curve_added_latency_p50_ms', '+.0f', 1000)} us p50 at one "
                 "request in flight")
    return f"{head}\n\n{t}\n\n{tail}"


if __name__ == "__main__":
    sys.exit(main())
