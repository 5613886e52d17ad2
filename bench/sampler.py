"""Sampler micro-benchmark: the sampler in this tree against the one before the batched rewrite
(read from git at run time, so no copy of it lives here), on one torch thread (``--threads``),
at batch 1, 16 and 64 over SmolLM2's 49,152-entry vocabulary. Times are medians of alternating runs (baseline,
new, baseline, ...) so both see the same machine load. With ``--forward`` it also times one
SmolLM2 decode forward at batch 64 (``workers/engine/runner.py``) for the ratio the issue asks.

Logits: ``smollm2`` (default) takes rows of SmolLM2's own logits over repository text, the
distributions the sampler meets in practice; ``random`` uses N(0, 3^2) logits, whose top-p sets
are far larger (a pessimistic case).

    python -m bench.sampler [--batches 1,16,64] [--repeats 7] [--threads 1] [--forward]
                            [--logits smollm2|random] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.common import ROOT, module_at
from broker.protocol import SamplingParams
from workers.engine import sampler as new_sampler

VOCAB = 49152


def smollm2_logits(rows: int) -> torch.Tensor:
    from workers.engine.loaders import load_model
    from workers.engine.model import causal_attention
    model, tok = load_model("smollm2-135m")
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        ids = tok.encode(f.read())[: 4 * rows]
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       lambda layer, q, k, v: causal_attention(q, k, v))
        return model.logits(hidden[3::4]).float()[:rows].contiguous()


def forward_ms(batch: int, context: int, repeats: int) -> float:
    from workers.engine.kv_cache import KVCache
    from workers.engine.loaders import load_model
    from workers.engine.runner import ModelRunner
    model, _ = load_model("smollm2-135m")
    kv = KVCache(model.cfg, num_blocks=batch * (context // 16 + 2), block_size=16)
    runner = ModelRunner(model, kv)
    tables = [kv.allocator.allocate(kv.blocks_for(context + 1)) for _ in range(batch)]
    return median_ms(lambda: runner.decode([1] * batch, [context] * batch, tables), repeats)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--logits", choices=("smollm2", "random"), default="smollm2")
    ap.add_argument("--baseline-rev", default="6245e5d",
                    help="git revision of the baseline sampler (default: 6245e5d, the one before the batched rewrite)")
    ap.add_argument("--forward", action="store_true", help="also time a batch-64 decode forward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything timed")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rev = args.baseline_rev
    old = module_at(rev, "workers/engine/sampler.py")
    batches = [int(b) for b in args.batches.split(",")]
    biggest = max(batches)
    logits = (smollm2_logits(biggest) if args.logits == "smollm2"
              else torch.randn(biggest, VOCAB, generator=torch.Generator().manual_seed(0)) * 3)
    results = []
    for b in batches:
        x = logits[:b]
        params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=i) for i in range(b)]
        hist, steps = [[] for _ in range(b)], list(range(b))
        timings: dict = {"baseline": [], "new": []}
        for _ in range(args.repeats):      # alternate, so both see the same load
            for name, mod in (("baseline", old), ("new", new_sampler)):
                timings[name].append(median_ms(lambda: mod.sample(x, params, hist, steps), 1))
        row = {"batch": b, **{k: statistics.median(v) for k, v in timings.items()}}
        row["speedup"] = row["baseline"] / row["new"]
        results.append(row)
    report = {"baseline_rev": rev, "logits": args.logits, "temperature": args.temperature,
              "top_p": args.top_p, "vocab": int(logits.shape[1]), "threads": args.threads, "results": results}
    print(f"sampler, vocab {report['vocab']}, {args.logits} logits, temperature {args.temperature}, "
          f"top_p {args.top_p}, {args.threads} thread(s), median of {args.repeats} (baseline {rev[:12]})")
    print(f"{'batch':>6} {'baseline ms':>12} {'new ms':>9} {'speedup':>8}")
    for r in results:
        print(f"{r['batch']:>6} {r['baseline']:>12.2f} {r['new']:>9.2f} {r['speedup']:>7.1f}x")
    if args.forward:
        fwd = forward_ms(64, 128, max(3, args.repeats // 2))
        report["forward_b64_ms"] = fwd
        new64 = next((r["new"] for r in results if r["batch"] == 64), None)
        print(f"decode forward, batch 64, context 128, {args.threads} thread(s): {fwd:.1f} ms"
              + (f"; the new sampler at batch 64 is {100 * new64 / (fwd + new64):.1f} % of the step"
                 if new64 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
