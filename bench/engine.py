"""The engine's tokens/s against llama.cpp on the same GGUF, in one run, with the memory-bandwidth
floor beside them.

For each (dtype, quantization) configuration and thread count (``--threads 1,2``):

* decode at batch B (``--batches``): B sequences with ``--history`` cached positions each, one
  ``ModelRunner.decode`` step per token for ``--steps`` steps; tokens/s = B * steps / seconds.
  The cache holds random K/V (a step's time does not depend on it). No sampling, as in llama.cpp.
* prefill of N tokens (``--prefill``): one ``ModelRunner.prefill`` from an empty cache.

llama.cpp runs the same cases on the same GGUF with the same threads (``llama-bench`` for prefill
and batch-1 decode at depth ``--history``; ``llama-batched-bench -pps`` for B > 1), alternating
with ours in every round, one thread count after the other (compiled engines are compiled for
each); medians of ``--rounds`` are reported. The floor: the bytes of weights a
decode step reads (all of them but the embedding rows; the tied LM head reads the whole
embedding) over the bandwidth of a numpy memcpy of a 256 MiB buffer measured in the same run, as
tokens/s at batch B (B * bandwidth / bytes): nothing that reads its weights from memory once per
step decodes faster.

    python -m bench.engine --threads 1,2 [--configs float32:none,float32:int8] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from bench import llamacpp
from bench.common import machine, median, write_json
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import DEFAULT_MODEL, load_model, smollm2_path
from workers.engine import compiled, precision
from workers.engine.precision import weight_bytes
from workers.engine.runner import ModelRunner

BLOCK_SIZE = 16
MEMCPY_BYTES = 256 << 20
DTYPES = tuple(precision.DTYPES)
QUANTIZATIONS = tuple(q for q in precision.QUANTIZATIONS if q != "auto")


# ---------------------------------------------------------------------------------------------
# configurations (shared with bench/perplexity.py)

def parse_configs(text: str) -> list[tuple[str, str]]:
    """``"float32:none,float32:int8"`` to ``[("float32", "none"), ("float32", "int8")]``."""
    out = []
    for item in text.split(","):
        dtype, _, quant = item.strip().partition(":")
        quant = quant or "none"
        if dtype not in DTYPES or quant not in QUANTIZATIONS:
            raise ValueError(f"configuration {item!r}: expected DTYPE:QUANTIZATION with DTYPE in "
                             f"{DTYPES} and QUANTIZATION in {QUANTIZATIONS}")
        out.append((dtype, quant))
    return out


def config_name(config: tuple[str, str]) -> str:
    return f"{config[0]}/{config[1]}"


def load_config(spec: str, config: tuple[str, str], device: str = "cpu"):
    """(model, tokenizer) of ``spec`` in this configuration, prepared as a worker serves it
    (fused projections, quantized or cast), on ``device``."""
    dtype, quantization = config
    return load_model(spec, dtype=dtype, quantization=quantization, device=device)


def try_load(spec: str, config: tuple[str, str], device: str = "cpu"):
    """(model, tokenizer), or None after printing why this configuration is skipped (an int8
    configuration on a torch without fbgemm, int8 with a half dtype, int8 on a GPU)."""
    try:
        return load_config(spec, config, device)
    except (ValueError, RuntimeError) as e:
        print(f"{config_name(config)}: skipped ({type(e).__name__}: {e})", flush=True)
        return None


def gguf_of(spec: str, requested: Optional[str]) -> Optional[str]:
    """The GGUF llama.cpp runs: ``--gguf``, the model itself, or the default model's file."""
    if requested:
        return requested
    if spec.endswith(".gguf"):
        return spec
    return smollm2_path() if spec == DEFAULT_MODEL else None


# ---------------------------------------------------------------------------------------------
# bytes and bandwidth

def gguf_weight_bytes(path: str) -> int:
    """The GGUF's tensor bytes as stored: what llama.cpp reads per decode step."""
    from workers.engine.gguf_file import GGUFFile
    return sum(t.data.nbytes for t in GGUFFile(path).tensors)


def memcpy_gbps(nbytes: int = MEMCPY_BYTES, repeats: int = 5) -> float:
    """GB/s (bytes copied per second) of a numpy memcpy of ``nbytes``: the transfer benchmark's
    baseline, measured the same way."""
    from bench.transfer import memcpy_seconds
    return nbytes / statistics.median(memcpy_seconds(nbytes, repeats)) / 1e9


# ---------------------------------------------------------------------------------------------
# our engine

@dataclass(frozen=True)
class Case:
    kind: str          # "decode" or "prefill"
    size: int          # batch (decode) or prompt tokens (prefill)

    @property
    def name(self) -> str:
        return f"decode b={self.size}" if self.kind == "decode" else f"prefill {self.size}"


class Engine:
    """One configuration's model over a KV pool large enough for every case."""

    def __init__(self, model, cases: list[Case], history: int, steps: int, compile_decode: bool = False,
                 kv: Optional[KVCache] = None) -> None:
        """``kv``: another engine's pool to share (same model and cases)."""
        self.history, self.steps = history, steps
        kv_dtype = model.precision.torch_dtype      # the KV cache's "auto": the compute dtype
        blocks = -(-(history + steps) // BLOCK_SIZE)
        need = max([c.size * blocks for c in cases if c.kind == "decode"] +
                   [-(-c.size // BLOCK_SIZE) for c in cases if c.kind == "prefill"] + [1])
        self.device = model.precision.device
        if kv is None:
            kv = KVCache(model.cfg, need, BLOCK_SIZE, dtype=kv_dtype, device=self.device)
            kv.pool.normal_(0, 1)     # stands in for the prefill of every history
        self.kv = kv
        self.runner = ModelRunner(model, self.kv, compile_decode)
        self.vocab = model.cfg.vocab_size

    def _tables(self, count: int, positions: int) -> list:
        self.kv.allocator = type(self.kv.allocator)(self.kv.num_blocks)
        return [self.kv.allocator.allocate(self.kv.blocks_for(positions)) for _ in range(count)]

    def tokens_per_s(self, case: Case) -> float:
        if case.kind == "prefill":
            (table,) = self._tables(1, case.size)
            ids = torch.randint(0, self.vocab, (case.size,)).tolist()
            start = time.perf_counter()
            self.runner.prefill(ids, table)
            self._sync()
            return case.size / (time.perf_counter() - start)
        tables = self._tables(case.size, self.history + self.steps)
        tokens = torch.randint(0, self.vocab, (case.size,)).tolist()
        start = time.perf_counter()
        for step in range(self.steps):
            self.runner.decode(tokens, [self.history + step] * case.size, tables)
        self._sync()
        return case.size * self.steps / (time.perf_counter() - start)

    def _sync(self) -> None:
        """A GPU runs asynchronously: the clock stops when its work is done."""
        if self.device != "cpu":
            torch.cuda.synchronize(self.device)

    def warm_up(self) -> float:
        """Seconds taken; a compiled engine compiles its two graphs here (batch 1 and any batch),
        as a worker does before it registers (``compiled.warm_up``)."""
        start = time.perf_counter()
        self.tokens_per_s(Case("prefill", min(16, self.kv.num_blocks * BLOCK_SIZE)))
        self._tables(0, 0)      # a fresh allocator: every block free
        compiled.warm_up(self.runner, self.kv.allocator, compiled.default_batch_sizes(2))
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the peer

def peer_round(peer: llamacpp.LlamaCpp, gguf: str, threads: int, cases: list[Case], history: int,
               steps: int) -> dict:
    """``{case: tokens/s}`` of one llama.cpp round at this thread count."""
    out = {}
    prefill = [c.size for c in cases if c.kind == "prefill"]
    if prefill:
        for n, tps in peer.prefill(gguf, threads, prefill).items():
            out[Case("prefill", n)] = tps
    batches = [c.size for c in cases if c.kind == "decode"]
    if 1 in batches:
        out[Case("decode", 1)] = peer.decode(gguf, threads, steps, history)
    if [b for b in batches if b > 1]:
        for b, tps in peer.batched_decode(gguf, threads, [b for b in batches if b > 1], steps, history).items():
            out[Case("decode", b)] = tps
    return out


# ---------------------------------------------------------------------------------------------
# the run

def run(args) -> dict:
    configs = parse_configs(args.configs)
    threads = [int(t) for t in args.threads.split(",")]
    cases = ([Case("decode", int(b)) for b in args.batches.split(",")] +
             [Case("prefill", int(n)) for n in args.prefill.split(",") if n])
    models, weights = {}, {}
    for config in configs:
        loaded = try_load(args.model, config, args.device)
        if loaded is not None:
            models[config_name(config)] = loaded[0]
            weights[config_name(config)] = weight_bytes(loaded[0])
    if not models:
        raise SystemExit(f"no configuration of {args.configs!r} loads")
    names = [name + suffix for name in models
             for suffix, wanted in (("", args.compile != "yes"), ("+compile", args.compile != "no")) if wanted]
    gguf = gguf_of(args.model, args.gguf)
    peer, peer_reason = llamacpp.peer_from_args(args, gguf)
    if gguf is not None:
        weights["gguf"] = gguf_weight_bytes(gguf)
    bandwidth = memcpy_gbps()
    ours = {(t, n, c): [] for t in threads for n in names for c in cases}
    theirs = {(t, c): [] for t in threads for c in cases}
    warm_up_s = {}
    # One thread count at a time, its rounds alternating ours and llama.cpp: inductor fixes the
    # thread count of its compiled loops at compile time, so the compiled engines are compiled
    # anew for each thread count (as a worker compiles with its own num_threads).
    for t in threads:
        torch.set_num_threads(t)
        torch._dynamo.reset()
        engines = {}
        for name in names:
            base = name.removesuffix("+compile")
            compile_decode = base != name       # shares its eager twin's KV pool where there is one
            shared = engines[base].kv if compile_decode and base in engines else None
            engines[name] = Engine(models[base], cases, args.history, args.steps, compile_decode, shared)
            key = f"{name}, {t} thread(s)"
            warm_up_s[key] = engines[name].warm_up()
            print(f"{key}: warmed up in {warm_up_s[key]:.1f} s", file=sys.stderr, flush=True)
        for r in range(args.rounds):
            for name, engine in engines.items():
                for case in cases:
                    ours[t, name, case].append(engine.tokens_per_s(case))
            if peer is not None:
                try:
                    for case, tps in peer_round(peer, gguf, t, cases, args.history, args.steps).items():
                        theirs[t, case].append(tps)
                except llamacpp.LlamaCppError as e:
                    peer, peer_reason = None, str(e)
                    print(f"llama.cpp: skipped ({peer_reason})", flush=True)
            print(f"{t} thread(s): round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        del engines
    rows = []
    for t in threads:
        for case in cases:
            peer_tps = median(theirs[t, case])
            row = {"threads": t, "case": case.name, "kind": case.kind, "size": case.size,
                   "ours": {n: median(ours[t, n, case]) for n in names},
                   "ours_rounds": {n: ours[t, n, case] for n in names},
                   "llama.cpp": peer_tps, "llama.cpp_rounds": theirs[t, case]}
            row["ratio"] = {n: (v / peer_tps if peer_tps else None) for n, v in row["ours"].items()}
            row["bandwidth_bound"] = ({n: case.size * bandwidth * 1e9 / b for n, b in weights.items()}
                                      if case.kind == "decode" else None)
            rows.append(row)
    return {"config": dict(vars(args)), "machine": machine(), "warm_up_s": warm_up_s,
            "memcpy_GBps": bandwidth, "weight_bytes_per_step": weights, "gguf": gguf,
            "llama.cpp": {"version": peer.version if peer else None,
                          "skipped": None if peer else peer_reason},
            "results": rows}


def markdown(report: dict) -> str:
    names = list(report["results"][0]["ours"])
    floors = list(report["weight_bytes_per_step"])
    cfg = report["config"]
    weights = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in report["weight_bytes_per_step"].items())
    peer = report["llama.cpp"]
    lines = [f"{cfg['model']}; decode: {cfg['steps']} steps after {cfg['history']} positions; medians of "
             f"{cfg['rounds']} rounds; memcpy {report['memcpy_GBps']:.1f} GB/s; weights read per step: "
             f"{weights}; llama.cpp " + (f"{peer['version']}" if peer["version"] else f"skipped ({peer['skipped']})"),
             "warm-up (with the compile of +compile engines): " +
             ", ".join(f"{n} {s:.1f} s" for n, s in report["warm_up_s"].items()), ""]
    head = (["threads", "case"] + [f"{n} tok/s" for n in names] + ["llama.cpp tok/s"] +
            [f"{n} / llama.cpp" for n in names] + [f"floor {n}" for n in floors])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)
    for row in report["results"]:
        bound = row["bandwidth_bound"] or {}
        cells = ([str(row["threads"]), row["case"]] + [num(row["ours"][n]) for n in names] +
                 [num(row["llama.cpp"])] + [num(row["ratio"][n], "{:.2f}x") for n in names] +
                 [num(bound.get(n)) for n in floors])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, tiny, a .gguf file or a HF directory")
    ap.add_argument("--gguf", default=None, help="the GGUF llama.cpp runs (default: the model's own file)")
    ap.add_argument("--configs", default="float32:int8",
                    help="DTYPE:QUANTIZATION pairs, comma-separated; ones this tree cannot load are skipped")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (llama.cpp stays on the CPU)")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--batches", default="1,4,16,64", help="decode batch sizes, comma-separated")
    ap.add_argument("--prefill", default="128,512", help="prefill prompt lengths, comma-separated")
    ap.add_argument("--history", type=int, default=128, help="cached positions per sequence before decode")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (ours and llama.cpp alternate); medians reported")
    ap.add_argument("--compile", default="both", choices=("no", "yes", "both"),
                    help="decode through torch.compile (ModelRunner(compile_decode=True), the worker's "
                         "torch_compile_config); both: each configuration eager and compiled (+compile) "
                         "side by side, compiling at its warm-up")
    ap.add_argument("--json", default=None, help="write the report here")
    llamacpp.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        parse_configs(args.configs)
    except ValueError as e:
        ap.error(str(e))
    report = run(args)
    print(markdown(report))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
