"""Int8 linear layers for the CPU: weights stored as int8 with one scale per output channel,
multiplied by fbgemm's dynamic-quantization kernel (``torch.ops.quantized.linear_dynamic``).

Why this kernel: measured on this project's 2-core AVX2 machines with SmolLM2's shapes, 1 thread
(``python -m bench.engine`` has the whole-model figures):

* fbgemm dynamic int8: the LM head (576 x 49152) takes 3.9 ms at batch 1 against 16.4 ms in fp32,
  and the whole model's matmuls about 2x less than fp32 at batch 1 and 3.5x less at batch 16;
* fbgemm with fp16 weights (``linear_dynamic_fp16``): close at batch 1, 1.7x slower than int8 at
  batch 16;
* ``torch._weight_int8pack_mm`` (weight-only int8): 3-10x slower than fp32 on this CPU;
* ``torch._int_mm`` (int8 x int8): a reference loop on the CPU, 100x slower;
* bf16 / fp16 matmul: 2-8x slower than fp32 on a CPU without AMX / AVX512-BF16.

fbgemm quantizes its input with one scale for the whole tensor, so on its own a row's result
would depend on the other rows of the batch (a request's tokens on who it is batched with), and
one row with a large activation would coarsen every other row. ``Int8Linear`` makes the
quantization per row instead: each row is divided by its largest magnitude, and two extra input
columns holding +1 and -1 (against zero weights) pin the tensor's range to exactly [-1, 1], so
every row is quantized on the same grid whatever the batch holds; the output row is scaled back.
The integer product is exact, so a row's result is bit-identical alone or in any batch.

The LM head is the exception: in int8 it turned SmolLM2's greedy answer to "What is the capital
of France?" from "Paris" into "L'Etoile" and cost 4 % more perplexity, so it keeps fp16 weights
(``Fp16Linear``, fbgemm's fp16-weight kernel: 6 ms at batch 1 against int8's 4 and fp32's 16),
which lose nothing measurable. Its activations stay float32, so its rows are batch-invariant too.
"""
from __future__ import annotations

import functools
import logging
import threading
import warnings

import torch
from torch import nn

from .model import compiling

log = logging.getLogger(__name__)

# Input columns appended to pin the quantization range (fbgemm likes K a multiple of 4).
_PIN = 4


def int8_available() -> bool:
    """Whether this torch build has the fbgemm/x86 int8 kernels ``Int8Linear`` runs on."""
    engines = torch.backends.quantized.supported_engines
    return (hasattr(torch.ops.quantized, "linear_dynamic")
            and any(e in engines for e in ("x86", "fbgemm")))


# Activations use the full 8 bits. Weights use 8 (|q| <= 127) where fbgemm's kernel multiplies
# them exactly, and 7 (|q| <= 63) where it does not: its AVX2 kernel sums pairs of uint8 x int8
# products in int16, where 2 * 255 * 63 fits and 2 * 255 * 127 saturates; its AVX512-VNNI kernel
# accumulates in int32 and never saturates. ``weight_max`` measures which one this CPU runs.
# SmolLM2's int8 perplexity over float32 on the shipped text (``python -m bench.perplexity``):
# 1.5 % with 8-bit weights, 2.9 % with 7-bit ones (and 7-bit activations with 8-bit weights
# measured 4 % worse than 7-bit weights).


@functools.cache
def weight_max() -> int:
    """127 where fbgemm's int8 product of this CPU is exact at full-range 8-bit weights, else 63.
    Measured once per process: inputs at the top of their range times weights of 127 should give
    127 per input; a kernel that saturates its int16 pair sums returns about 1 per input."""
    k = 64
    try:
        packed = _pack(torch.full((2, k), 127, dtype=torch.int8), torch.ones(2))
        pinned = torch.cat([torch.ones(1, k), _PINS], dim=1)
        got = torch.ops.quantized.linear_dynamic(pinned, packed, False)[0, 0].item()
    except (RuntimeError, ValueError) as e:      # an engine without these ops: be safe
        log.warning("int8 kernel probe failed (%s): int8 weights get 7 bits", e)
        return 63
    return 127 if abs(got - 127 * k) <= 0.02 * 127 * k else 63


def _pack(q: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed form of int8 weights ``q`` [N, K] with per-row ``scales`` [N], with
    ``_PIN`` zero columns for the pinned inputs."""
    n = q.shape[0]
    q = torch.cat([q, q.new_zeros(n, _PIN)], dim=1)
    with warnings.catch_warnings():   # quantized tensors are deprecated, the kernel is not
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
            q, scales.double(), torch.zeros(n, dtype=torch.long), 0), None)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel weights: (int8 weight [N, K], float32 scales [N])."""
    w = weight.detach().float()
    top = weight_max()
    scales = (w.abs().amax(dim=1) / top).clamp_min(1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-top, top).to(torch.int8)
    return q, scales


_scratch = threading.local()
_PINS = torch.tensor([[1.0, -1.0] + [0.0] * (_PIN - 2)])


def _pinned_rows(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reused [n, k + _PIN] float32 input buffer whose last columns hold the pins (+1, -1, 0,
    0), and the view of its first k columns, where the caller writes the normalized rows. One
    buffer per width and thread, grown to the most rows seen, with its views per row count kept:
    no per-call allocation, no concatenation (which copied every row once more) and no slicing
    ops. The kernel never keeps its input, so the next call may overwrite it."""
    if not hasattr(_scratch, "views"):
        _scratch.buffers, _scratch.views = {}, {}
    got = _scratch.views.get((n, k))
    if got is None:
        buf = _scratch.buffers.get(k)
        if buf is None or buf.shape[0] < n:
            with torch.inference_mode(False):   # usable in and out of inference mode
                buf = _scratch.buffers[k] = torch.zeros(max(n, 64), k + _PIN)
                buf[:, k], buf[:, k + 1] = 1.0, -1.0
            _scratch.views.clear()      # views of the smaller buffer
        if len(_scratch.views) >= 256:
            _scratch.views.clear()
        got = _scratch.views[n, k] = (buf[:n], buf[:n, :k])
    return got


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W in int8 (per-channel scales, ``weight_max()``) and x quantized
    per row to uint8."""

    def __init__(self, weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 bias: torch.Tensor | None = None) -> None:
        """``weight``: a float matrix [N, K], or one already quantized per row: (int8 values
        [N, K], float32 scales [N]) as ``quantize_rows`` makes them (Q8_0 blocks: q8.py)."""
        super().__init__()
        if not int8_available():
            raise RuntimeError("quantization=int8 needs torch's fbgemm/x86 quantized kernels, "
                               f"which this torch build ({torch.__version__}) lacks; use "
                               "quantization: none")
        q, scales = weight if isinstance(weight, tuple) else quantize_rows(weight)
        if isinstance(weight, tuple) and int(q.abs().max()) > weight_max():
            raise ValueError(f"int8 weights up to {int(q.abs().max())}: this CPU's kernel takes at most "
                             f"{weight_max()} (quant.weight_max); make them with quantize_rows")
        n, k = q.shape
        self._packed = _pack(q, scales)
        self.in_features, self.out_features = k, n
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        self.weight_bytes = n * k + 4 * n
        self.handle = None   # set for torch.compile (compiled.py)

    def kernel(self, pinned: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(pinned, self._packed, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        # abs().amax(), not vector_norm(inf): the same exact maximum, 24x faster at 64 rows.
        peak = rows.abs().amax(1, keepdim=True).clamp_min_(1e-30)
        if compiling():   # the same values; fbgemm's kernel stays opaque
            pins = _PINS.to(rows.device).expand(rows.shape[0], _PIN)
            pinned = torch.cat([rows / peak, pins], dim=1)
            y = torch.ops.dsrv.packed_linear(pinned, self.handle) * peak
        else:
            pinned, head = _pinned_rows(rows.shape[0], self.in_features)
            torch.div(rows, peak, out=head)
            y = self.kernel(pinned).mul_(peak)
        if self.bias is not None:
            y += self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Fp16Linear(nn.Module):
    """``y = x @ W.T`` with W stored in fp16 and x in float32 (fbgemm's ``linear_dynamic_fp16``):
    half the bytes of fp32, no activation quantization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not int8_available():
            raise RuntimeError("fp16 weights need torch's fbgemm kernels, which this torch build "
                               f"({torch.__version__}) lacks; use quantization: none")
        self._packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float(), None if bias is None else bias.detach().float())
        self.out_features, self.in_features = weight.shape
        self.weight_bytes = 2 * weight.numel()
        self.handle = None   # set for torch.compile (compiled.py)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = (torch.ops.dsrv.packed_linear(rows, self.handle) if compiling()
             else self.kernel(rows))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights"
