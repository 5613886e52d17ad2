"""GGUF Q8_0 weights kept in int8 from the file to the int8 layers: no float32 copy of the model on
the way.

Q8_0 stores a matrix [N, K] as blocks of 32 int8 values along K, one fp16 scale a block. The int8
layers (``quant.Int8Linear``) want one scale per output row, values in ``quant.weight_max()`` (7 bits
where fbgemm's kernel saturates on 8) and smoothing's per-column factors folded in (smooth.py),
so the blocks cannot go to the kernel as they are; and fbgemm has no per-block scales (a matmul per
block of 32 columns would be 18 small matmuls per layer where there is one now). ``Q8Linear`` holds
the blocks as loaded, 1.06 bytes a weight against float32's 4, with smoothing's column and row
factors kept beside them, and ``int8_rows`` requantizes them per output row ``CHUNK_ROWS`` rows at
a time: only those rows ever exist in float. Until then it is an ordinary linear layer whose
forward dequantizes per call, for smoothing's one calibration forward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .gguf_file import q8_0_split
from .quant import quantize_rows

BLOCK = 32            # values per Q8_0 block
BLOCK_BYTES = 34      # an fp16 scale, then 32 int8 values
CHUNK_ROWS = 256      # rows dequantized at once by int8_rows


def read_blocks(raw: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's bytes [rows, cols / 32 * 34] as (int8 values [rows, cols], float32 block
    scales [rows, cols / 32]), copied out of the file's memory map."""
    scales, values = q8_0_split(np.asarray(raw).reshape(rows, cols // BLOCK, BLOCK_BYTES))
    # the values' slice of each block is never contiguous: this copies them out of the map once
    return torch.from_numpy(np.ascontiguousarray(values).reshape(rows, cols)), torch.from_numpy(scales[:, :, 0])


class Q8Linear(nn.Module):
    """``y = x @ W.T + b`` with W as Q8_0 blocks times pending smoothing factors:
    ``W[i, j] = values[i, j] * scales[i, j // 32] * cols[j] * rows[i]``."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 cols: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        n, k = values.shape
        if values.dtype != torch.int8 or k % BLOCK or tuple(scales.shape) != (n, k // BLOCK):
            raise ValueError(f"Q8_0 weight: expected int8 values [N, K] with K a multiple of {BLOCK} "
                             f"and scales [N, K/{BLOCK}], got {values.dtype} {tuple(values.shape)} and "
                             f"{tuple(scales.shape)}")
        self.out_features, self.in_features = n, k
        self.values, self.scales = values, scales.float()
        self.cols = torch.ones(k) if cols is None else cols
        self.rows = torch.ones(n) if rows is None else rows
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def dequantized(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Rows ``lo:hi`` of W in float32."""
        q = self.values[lo:hi]
        w = q.view(q.shape[0], -1, BLOCK).float().mul_(self.scales[lo:hi, :, None])
        return w.view(q.shape).mul_(self.cols).mul_(self.rows[lo:hi, None])

    @property
    def weight(self) -> torch.Tensor:
        """W in float32, made anew at each read (smoothing reads its column maxima once)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def scale_(self, mul_cols: Optional[torch.Tensor] = None, div_rows: Optional[torch.Tensor] = None) -> None:
        """W's columns times ``mul_cols``, its rows over ``div_rows``: kept as factors, the blocks
        stay as loaded."""
        if mul_cols is not None:
            self.cols = self.cols * mul_cols
        if div_rows is not None:
            self.rows = self.rows / div_rows

    @staticmethod
    def concat(parts: Sequence["Q8Linear"]) -> "Q8Linear":
        """One layer whose output is the parts' outputs one after another (fused projections);
        the parts share their input, so smoothing gave them the same column factors."""
        if not all(isinstance(p, Q8Linear) for p in parts):
            raise ValueError("cannot fuse Q8_0 blocks with other weight formats")
        if not all(torch.equal(p.cols, parts[0].cols) for p in parts):
            raise ValueError("fused Q8_0 projections need the same column factors")
        biases = [p.bias for p in parts]
        return Q8Linear(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]),
                        None if biases[0] is None else torch.cat(biases), parts[0].cols,
                        torch.cat([p.rows for p in parts]))

    def int8_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-row int8 (values [N, K], float32 scales [N]) as ``quant.quantize_rows`` makes
        them, ``CHUNK_ROWS`` rows at a time."""
        parts = [quantize_rows(self.dequantized(lo, lo + CHUNK_ROWS))
                 for lo in range(0, self.out_features, CHUNK_ROWS)]
        return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks"
