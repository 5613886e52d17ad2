"""A fast reader of GGUF files: metadata as plain Python values, tensors as memory-mapped bytes.

Why not ``gguf.GGUFReader``: it builds a numpy view per metadata item, which takes several
seconds for a 49k-token vocabulary; this parser reads the same header in a fraction of a second.
Dequantization still goes through the ``gguf`` package. Reads only; never writes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]     # GGUF order: ne0 (the fastest-moving dimension) first
    tensor_type: int           # a gguf.GGMLQuantizationType value
    data: np.ndarray           # raw bytes [rows, bytes per row] as gguf.quants.dequantize wants


class GGUFFile:
    """``fields``: metadata key -> value (str, int, float, bool, or list); ``tensors``: in file
    order."""

    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        self._buf = np.memmap(path, dtype=np.uint8, mode="r")
        raw = memoryview(self._buf)
        if bytes(raw[:4]) != _MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(raw[:4])!r})")
        self._raw, self._pos = raw, 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_fields = self._scalar(10), self._scalar(10)
        self.fields: dict = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._scalar(10) for _ in range(self._scalar(4)))
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = []
        for name, dims, ttype, offset in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * type_size
            data = self._buf[start + offset: start + offset + rows * row_bytes].reshape(rows, row_bytes)
            self.tensors.append(GGUFTensor(name, dims, ttype, data))
        del self._raw

    def _scalar(self, vtype: int):
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self._raw, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar(10)
        s = bytes(self._raw[self._pos: self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, n = self._scalar(4), self._scalar(10)
            if item_type in _SCALARS and item_type != 7:   # numeric arrays in one read
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                values = np.frombuffer(self._raw, dtype=np.dtype(fmt), count=n, offset=self._pos)
                self._pos += n * size
                return values.tolist()
            return [self._value(item_type) for _ in range(n)]
        return self._scalar(vtype)


def q8_0_split(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks [..., 34] (an fp16 scale, then 32 int8 values) as (float32 scales [..., 1],
    int8 values [..., 32], a view)."""
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    return d, blocks[..., 2:].view(np.int8)


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    d, q = q8_0_split(raw.reshape(-1, 34))
    return d * q.astype(np.float32)


def _dequantize_q4(raw: np.ndarray, with_min: bool) -> np.ndarray:
    head = 4 if with_min else 2
    blocks = raw.reshape(-1, head + 16)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, head:]
    # Element j of a block is the low nibble of byte j, element 16 + j its high nibble.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    if with_min:
        return d * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return d * (q - 8.0)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """fp32 values in torch order (the GGUF shape reversed). Vectorized paths for the types of
    the default model (Q4_0, Q4_1, Q8_0, F16, F32); the gguf package for every other type."""
    import gguf

    t = gguf.GGMLQuantizationType
    raw = tensor.data
    kind = tensor.tensor_type
    if kind == t.F32:
        out = raw.view(np.float32)
    elif kind == t.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif kind == t.Q8_0:
        out = _dequantize_q8_0(raw)
    elif kind == t.Q4_1:
        out = _dequantize_q4(raw, with_min=True)
    elif kind == t.Q4_0:
        out = _dequantize_q4(raw, with_min=False)
    else:
        out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind))
    return np.asarray(out, dtype=np.float32).reshape(tuple(reversed(tensor.shape)))
