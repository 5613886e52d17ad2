"""Micro-benchmark of paged attention: this tree's ``ModelRunner`` against a baseline, alternating
the two, medians of several rounds. The baseline (``--baseline``) is ``copy``, this tree's runner
with its paged decode kernel off (``paged_kernel.py``: each decode step then copies every
sequence's history per layer), or the runner of another git revision, loaded from git into this
tree's ``workers.engine`` package, so both share the model and the KV pool.

Cases: one decode step at batch 1, 16 and 64 with histories of about ``--history`` positions
(lengths spread by +-4 so the padding mask is exercised), and a prefill of ``--prefill`` tokens.
It also reports the time inside the model's ``attend`` callbacks (cache write, gather, attention:
everything the runner does per layer), timed around each call, and the largest difference between
the two runners' logits. The histories' K/V are random: a step's time does not depend on them.

    python -m bench.engine_attention [--baseline copy|REVISION] [--kv-dtype bfloat16] --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import module_at
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner



def decode_case(kv: KVCache, batch: int, history: int) -> tuple:
    """Tokens, positions and block tables (allocated lowest ids first, as the worker does) of a
    decode step for ``batch`` sequences with about ``history`` cached positions each."""
    kv.allocator = type(kv.allocator)(kv.num_blocks)
    lengths = [history + (i % 9) - 4 for i in range(batch)]
    tables = [kv.allocator.allocate(kv.blocks_for(n + 1)) for n in lengths]
    return [7] * batch, lengths, tables


class AttendTimer:
    """Stands in for a runner's model: runs it, adding up the seconds spent in ``attend``."""

    def __init__(self, model) -> None:
        self.model, self.cfg, self.logits = model, model.cfg, model.logits
        self.seconds = 0.0

    def __call__(self, token_ids, positions, attend):
        def timed_attend(*args):
            start = time.perf_counter()
            out = attend(*args)
            self.seconds += time.perf_counter() - start
            return out
        return self.model(token_ids, positions, timed_attend)


def timed(runner, method: str, args) -> tuple[float, float, torch.Tensor]:
    """Milliseconds of the whole call and of its attention, and its output."""
    runner.model.seconds = 0.0
    start = time.perf_counter()
    out = getattr(runner, method)(*args)
    return (time.perf_counter() - start) * 1e3, runner.model.seconds * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_attention", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--baseline", default="copy",
                    help="copy (this runner without its paged decode kernel) or a git revision of the "
                         "runner (6245e5d: before the grouped decode)")
    ap.add_argument("--kv-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the KV pool's dtype")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, a .gguf file or a HF directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batches", default="1,16,64", help="decode batch sizes, comma-separated")
    ap.add_argument("--history", type=int, default=128, help="positions of KV history per sequence in decode")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill case")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    block_size = 16
    need = max(max(batches) * (args.history + 8), args.prefill) // block_size + max(batches) + 1
    kv = KVCache(model.cfg, need, block_size, dtype=getattr(torch, args.kv_dtype))
    kv.pool.normal_(0, 1)    # stands in for a prefill of every history
    baseline = (ModelRunner(model, kv, paged_kernel_on=False) if args.baseline == "copy" else
                module_at(args.baseline, "workers/engine/runner.py").ModelRunner(model, kv))
    runners = {"baseline": baseline, "this tree": ModelRunner(model, kv)}
    for runner in runners.values():
        runner.model = AttendTimer(model)
    cases = [(f"decode b={b}", "decode", decode_case(kv, b, args.history)) for b in batches]
    kv.allocator = type(kv.allocator)(kv.num_blocks)
    ids = torch.randint(0, model.cfg.vocab_size, (args.prefill,)).tolist()
    cases.append((f"prefill {args.prefill}", "prefill", (ids, kv.allocator.allocate(kv.blocks_for(args.prefill)))))
    print(f"{args.model}, {args.threads} thread(s), KV {args.kv_dtype}, medians of {args.rounds} "
          f"alternating rounds, baseline = " + ("the copy path" if args.baseline == "copy" else
                                                f"runner at {args.baseline}"))
    print(f"{'case':<14} {'step ms base':>12} {'this':>7} {'speedup':>8} {'attention ms base':>18} "
          f"{'this':>6} {'share base':>10} {'this':>5} {'max |dlogit|':>13}")
    for name, method, case_args in cases:
        steps, attention, outs = {k: [] for k in runners}, {k: [] for k in runners}, {}
        for _ in range(args.rounds):
            for label, runner in runners.items():
                ms, attend_ms, outs[label] = timed(runner, method, case_args)
                steps[label].append(ms)
                attention[label].append(attend_ms)
        (base, this), (att_base, att_this) = ([statistics.median(d[k]) for k in runners]
                                              for d in (steps, attention))
        diff = (outs["baseline"] - outs["this tree"]).abs().max().item()
        print(f"{name:<14} {base:>12.1f} {this:>7.1f} {base / this:>7.2f}x {att_base:>18.1f} "
              f"{att_this:>6.1f} {att_base / base:>10.0%} {att_this / this:>5.0%} {diff:>13.1e}",
              flush=True)


if __name__ == "__main__":
    main()
