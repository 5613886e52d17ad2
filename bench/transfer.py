"""KV transfer micro-benchmark: every available backend between two processes, against memcpy.

Moves 1, 16 and 256 MiB buffers and a realistic KV handoff (SmolLM2-135M: 30 layers, 3 KV heads,
head dim 64; a 2048-token prompt in 16-token blocks: 46,080 bytes/token and ~94 MB in fp32, half
that in bf16/fp16, one case per ``--kv-dtype``) from a context-side source in a child process (``transfer.loopback``; under ``mpiexec.gforker -n 1`` for MPI)
into a sink in this process. Each case runs one warm-up pull (connection setup, registration)
and then ``--repeats`` timed pulls, from ``start_pull`` to the result (control round trips
included), polled without sleeping. The baseline is a numpy memcpy of the same size between
two preallocated, touched buffers, measured in the same run right after each case's pulls (the
ratio uses that one; ``memcpy`` in the JSON is measured once up front). Prints a table and
writes JSON.

    python -m bench.transfer [--quick] [--backends ZMQ,SHM,...] [--kv-dtype float32,bfloat16]
                             [--out bench/results/transfer.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")      # one host: loopback (children inherit it)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np                                   # noqa: E402
import torch                                         # noqa: E402

from transfer.base import BackendUnavailable, KvLayout  # noqa: E402
from transfer.config import CacheTransceiverConfig   # noqa: E402
from transfer.loopback import LoopbackSource, fill_pool  # noqa: E402
from transfer.registry import create_sink, resolve_backend  # noqa: E402

MIB = 1 << 20
BACKENDS = ("ZMQ", "SHM", "NIXL", "UCX", "MPI")
# 1 MiB blocks: 8 layers x 2 x 16 tokens x 8 heads x 128 x fp32
FLAT = KvLayout(num_layers=8, num_kv_heads=8, head_dim=128, dtype="float32", block_size=16)
KV_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}   # kv_cache_config.dtype


def smollm2(dtype: str) -> KvLayout:
    return KvLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype, block_size=16)
TARGETS = {"SHM": 0.8, "NIXL": 0.45, "MPI": 0.45, "UCX": 0.25, "ZMQ": 0.1}


def cases(quick: bool, kv_dtypes: tuple = ("float32",)) -> list:
    """(name, layout, number of blocks, tokens). The MiB cases move bytes, whatever they hold;
    the KV handoff comes once per KV dtype: a half-precision KV cache moves half the bytes."""
    out = [("1 MiB", FLAT, 1, 16), ("16 MiB", FLAT, 16, 256)]
    if not quick:
        out.append(("256 MiB", FLAT, 256, 4096))
    out += [(f"KV 2048 {KV_DTYPES[d]}", smollm2(d), 128, 2048) for d in kv_dtypes]
    return out


def memcpy_seconds(nbytes: int, repeats: int, device: str = "cpu") -> list:
    """A plain copy of ``nbytes`` on the device the pools are on (numpy memcpy on the CPU, a
    device-to-device copy on a GPU)."""
    if device != "cpu":
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
        dst = torch.ones_like(src)
        out = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t)
        return out[1:]
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, np.uint8)                      # touched: no page faults timed
    np.copyto(dst, src)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        out.append(time.perf_counter() - t)
    return out


def pull_seconds(backend: str, source: LoopbackSource, layout: KvLayout, blocks: int,
                 tokens: int, repeats: int, tag: str, device: str = "cpu") -> tuple:
    cfg = CacheTransceiverConfig(backend=backend, max_tokens_in_buffer=max(tokens, 4096),
                                 kv_transfer_timeout_ms=120_000)
    pool = torch.ones(blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads,
                      layout.head_dim, dtype=getattr(torch, layout.dtype), device=device)
    sink = create_sink(cfg, pool, layout)
    times = []
    try:
        for r in range(repeats + 1):                     # the first one warms up
            tid = f"{tag}-{r}"
            handle = source.register(tid, list(range(blocks)), tokens)
            t = time.perf_counter()
            sink.start_pull(tid, handle, list(range(blocks)))
            results = []
            while not results:
                results = sink.poll()
            elapsed = time.perf_counter() - t
            source.call(op="release", tid=tid)
            if not results[0].ok:
                raise results[0].error
            if r:
                times.append(elapsed)
        want = fill_pool(layout, blocks, 1).view(torch.uint8)
        exact = torch.equal(pool.view(torch.uint8).cpu(), want)
    finally:
        sink.close()
    return times, exact


def summary(nbytes: int, seconds: list) -> dict:
    rates = [nbytes / s / 1e9 for s in seconds]
    med = statistics.median(rates)
    return {"median_GBps": round(med, 3), "median_ms": round(statistics.median(seconds) * 1e3, 3),
            "min_GBps": round(min(rates), 3),
            "max_GBps": round(max(rates), 3),
            "spread": round((max(rates) - min(rates)) / med, 3) if med else None}


def run(backends: list, quick: bool, repeats: int, kv_dtypes: tuple = ("float32",),
        device: str = "cpu") -> dict:
    torch.set_num_threads(1)
    plan = cases(quick, kv_dtypes)
    memcpy = {name: summary(blocks * lay.block_nbytes,
                            memcpy_seconds(blocks * lay.block_nbytes, repeats, device))
              for name, lay, blocks, _ in plan}
    rows = []
    for backend in backends:
        try:
            resolve_backend(backend)
        except BackendUnavailable as exc:
            rows.append({"backend": backend, "skipped": str(exc)})
            continue
        sources = {}
        try:
            for lay in {lay for _, lay, _, _ in plan}:       # all children boot in parallel
                blocks = max(b for _, l2, b, _ in plan if l2 == lay)
                sources[lay] = LoopbackSource(lay, blocks, 1, {"backend": backend},
                                              timeout=120, wait=False, device=device)
            for name, lay, blocks, tokens in plan:
                nbytes = blocks * lay.block_nbytes
                seconds, exact = pull_seconds(backend, sources[lay], lay, blocks, tokens,
                                              repeats, name.replace(" ", "_"), device)
                # the baseline right beside the pulls: a shared 2-core machine drifts
                beside = summary(nbytes, memcpy_seconds(nbytes, repeats, device))
                row = {"backend": backend, "case": name, "kv_dtype": lay.dtype, "bytes": nbytes,
                       "exact": exact,
                       "repeats": repeats, **summary(nbytes, seconds),
                       "memcpy_GBps": beside["median_GBps"]}
                row["ratio_to_memcpy"] = round(row["median_GBps"] / beside["median_GBps"], 3)
                rows.append(row)
                print(f"  {backend:5} {name:12} {row['median_GBps']:6.2f} GB/s", file=sys.stderr)
        finally:
            for src in sources.values():
                src.kill()
    return {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "quick": quick, "repeats": repeats, "device": device, "kv_dtypes": list(kv_dtypes), "memcpy": memcpy,
            "results": rows,
            "targets_at_256MiB": TARGETS}


def table(report: dict) -> str:
    lines = [f"{'backend':8} {'case':12} {'median GB/s':>11} {'spread':>7} {'memcpy GB/s':>11} "
             f"{'ratio':>6} {'exact':>5} {'median ms':>9}"]
    for row in report["results"]:
        if "skipped" in row:
            lines.append(f"{row['backend']:8} skipped: {row['skipped']}")
            continue
        mem = row["memcpy_GBps"]
        lines.append(f"{row['backend']:8} {row['case']:12} {row['median_GBps']:11.2f} "
                     f"{row['spread']:7.2f} {mem:11.2f} {row['ratio_to_memcpy']:6.2f} "
                     f"{str(row['exact']):>5} {row['median_ms']:9.2f}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated backends (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed pulls per case (default: 7, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: no 256 MiB case, 2 repetitions")
    parser.add_argument("--kv-dtype", default="float32,bfloat16",
                        help="comma-separated KV dtypes of the KV handoff case, of "
                             f"{', '.join(KV_DTYPES)} (default: %(default)s)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N",
                        help="where both KV pools live (GPU: NIXL VRAM and UCX CUDA only; the "
                             "baseline is then a device-to-device copy) (default: %(default)s)")
    parser.add_argument("--out", default="bench/results/transfer.json",
                        help="where to write the JSON report (default: %(default)s)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    wanted = [b.strip().upper() for b in args.backends.split(",") if b.strip()]
    # canonical order: MPICH's UCX, once loaded, breaks loading UCXX's libucx afterwards
    wanted.sort(key=lambda b: BACKENDS.index(b) if b in BACKENDS else len(BACKENDS))
    kv_dtypes = tuple(d.strip() for d in args.kv_dtype.split(",") if d.strip())
    bad = [d for d in kv_dtypes if d not in KV_DTYPES]
    if bad or not kv_dtypes:
        parser.error(f"--kv-dtype {args.kv_dtype!r}: expected some of {', '.join(KV_DTYPES)}")
    device = "cuda:0" if args.device == "cuda" else args.device
    if device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if device != "cpu":     # the other backends move host memory only
        wanted = [b for b in wanted if b in ("NIXL", "UCX")]
    report = run(wanted, args.quick, repeats, kv_dtypes, device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(table(report))
    print(f"wrote {args.out}")
    bad = [r for r in report["results"] if r.get("exact") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
