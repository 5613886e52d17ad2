"""Micro-benchmark of paged attention: this tree's ``ModelRunner`` against the runner of another
git revision (``--baseline``, loaded from git into this tree's ``workers.engine`` package, so both
share the model and the KV pool), alternating the two, medians of several rounds.

Cases: one decode step at batch 1, 16 and 64 with histories of about ``--history`` positions
(lengths spread by +-4 so the padding mask is exercised), and a prefill of ``--prefill`` tokens.
It also reports the largest difference between the two runners' logits, and with ``--profile``
the share of the step spent in attention's own ops (cache write, gather, SDPA), from torch.profiler.
The histories' K/V are random: the time of a step does not depend on the values.

    python -m bench.engine_attention --baseline main --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import ROOT
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner

# Top-level ops of paged attention in both runners (the model's projections are not attention).
ATTENTION_OPS = ("aten::index_put_", "aten::index_select", "aten::scaled_dot_product_attention")


def baseline_runner_class(rev: str) -> type:
    """``ModelRunner`` as ``workers/engine/runner.py`` is at ``rev``, importing this tree's
    ``workers.engine`` siblings (model, kv_cache)."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:workers/engine/runner.py"], cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline {rev!r}: git show failed: {e.stderr.strip()}") from None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("workers.engine._baseline_runner", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ModelRunner


def decode_case(kv: KVCache, batch: int, history: int) -> tuple:
    """Tokens, positions and block tables (allocated lowest ids first, as the worker does) of a
    decode step for ``batch`` sequences with about ``history`` cached positions each."""
    kv.allocator = type(kv.allocator)(kv.num_blocks)
    lengths = [history + (i % 9) - 4 for i in range(batch)]
    tables = [kv.allocator.allocate(kv.blocks_for(n + 1)) for n in lengths]
    return [7] * batch, lengths, tables


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1e3, out


def attention_share(fn, *args) -> float:
    from torch.profiler import profile
    with profile() as prof:
        fn(*args)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.cpu_time_total for e in events if e.key in ATTENTION_OPS) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git revision of the runner to compare with")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--history", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    block_size = 16
    need = max(max(batches) * (args.history + 8), args.prefill) // block_size + max(batches) + 1
    kv = KVCache(model.cfg, need, block_size)
    kv.pool.normal_(0, 1)    # stands in for a prefill of every history
    runners = {"baseline": baseline_runner_class(args.baseline)(model, kv), "this tree": ModelRunner(model, kv)}
    cases = [(f"decode b={b}", "decode", decode_case(kv, b, args.history)) for b in batches]
    kv.allocator = type(kv.allocator)(kv.num_blocks)
    ids = torch.randint(0, model.cfg.vocab_size, (args.prefill,)).tolist()
    cases.append((f"prefill {args.prefill}", "prefill", (ids, kv.allocator.allocate(kv.blocks_for(args.prefill)))))
    print(f"{args.model}, {args.threads} thread(s), medians of {args.rounds} alternating rounds, "
          f"baseline = runner at {args.baseline}")
    print(f"{'case':<14} {'baseline ms':>12} {'this ms':>9} {'speedup':>8} {'max |dlogit|':>13}"
          + ("  attention share base/this" if args.profile else ""))
    for name, method, case_args in cases:
        times = {label: [] for label in runners}
        outs = {}
        for _ in range(args.rounds):
            for label, runner in runners.items():
                ms, outs[label] = timed(getattr(runner, method), *case_args)
                times[label].append(ms)
        base, this = (statistics.median(times[k]) for k in runners)
        diff = (outs["baseline"] - outs["this tree"]).abs().max().item()
        line = f"{name:<14} {base:>12.1f} {this:>9.1f} {base / this:>7.2f}x {diff:>13.1e}"
        if args.profile:
            shares = [attention_share(getattr(r, method), *case_args) for r in runners.values()]
            line += f"  {shares[0]:.0%} / {shares[1]:.0%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
