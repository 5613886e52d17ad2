"""Where and in what number format the model runs: the worker options ``dtype`` and
``quantization`` and the ``--device``, resolved from ``auto`` and applied to a loaded model.

Loaders always build the model in float32 on the CPU; ``prepare`` then fuses its projections,
quantizes or casts it, and moves it. The defaults follow measurement on this project's machines
(``python -m bench.engine``, ``python -m bench.perplexity``):

* on the CPU, float32 compute with int8 weights (fbgemm, smoothed, per-row scales: quant.py)
  where fbgemm multiplies 8-bit weights exactly (AVX512-VNNI and later): 1.3x (batch 1) to 1.4x
  (batch 16-64) faster than fp16 weights, perplexity +1.5 % over float32, and SmolLM2's greedy
  answers unchanged on the test prompts. On CPUs whose kernel saturates (AVX2) int8 needs 7-bit
  weights, which cost 2.9 % perplexity and flip near-ties (SmolLM2's greedy answer to "What is
  the capital of France?", where float32's two best first tokens are 0.08 logits apart, becomes
  "L'Etoile, la Cite"), so there the default is fp16 weights: lossless (+0.02 %) and 2x (batch 1)
  to 1.1x (batch 64) faster than float32 weights. bf16/fp16 compute is tens of times slower than
  fp32 on CPUs without AMX.
* on a GPU, bfloat16 (float16 where the GPU lacks bf16) and no fbgemm formats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import LlamaModel
from .q8 import Q8Linear
from .quant import Fp16Linear, Int8Linear, int8_available, weight_max
from .smooth import CALIBRATION_TEXT, CALIBRATION_TOKENS, smooth
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
QUANTIZATIONS = ("auto", "none", "int8", "fp16")


@dataclass(frozen=True)
class Precision:
    dtype: str = "float32"          # compute dtype of activations and unquantized weights
    quantization: str = "none"      # "none", "int8" or "fp16" (weights of every linear layer)
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f" {self.quantization} weights"
        if self.quantization == "int8":     # 8-bit or 7-bit: a mixed cluster may hold both
            quant += f" ({8 if weight_max() == 127 else 7}-bit)"
        return f"{self.dtype}{quant} on {self.device}"


def resolve_device(device: str = "auto") -> str:
    """``auto`` is the first GPU when CUDA is present, else the CPU; ``cuda:N`` is checked."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here (torch "
                             f"{torch.__version__}); use device cpu")
        index = 0 if device == "cuda" else device.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: expected cuda:N with N below "
                             f"{torch.cuda.device_count()} (the GPUs present)")
        return f"cuda:{int(index)}"
    raise ValueError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")


def resolve(dtype: str = "auto", quantization: str = "auto", device: str = "auto") -> Precision:
    """The concrete precision for these settings, or a ValueError naming the setting."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
    if quantization == "auto":
        quantization = ("none" if on_gpu or dtype != "float32" or not int8_available()
                        else "int8" if weight_max() == 127 else "fp16")
    if quantization in ("int8", "fp16"):
        q = quantization
        if on_gpu:
            raise ValueError(f"quantization={q} runs on the CPU only (fbgemm kernels); on "
                             f"{device} use quantization: none with dtype bfloat16 or float16")
        if dtype != "float32":
            raise ValueError(f"quantization={q} computes in float32; dtype={dtype!r} with {q} "
                             "is not supported (use dtype: float32 or quantization: none)")
        if not int8_available():
            raise ValueError(f"quantization={q}: this torch build ({torch.__version__}) has no "
                             "fbgemm/x86 quantized kernels; use quantization: none")
    return Precision(dtype, quantization, device)


@torch.inference_mode()
def prepare(model: LlamaModel, precision: Precision, tokenizer: Tokenizer) -> LlamaModel:
    """``model`` (float32, CPU, as loaded) fused, quantized or cast, and moved; in place. The
    tokenizer encodes the text int8 smoothing is calibrated on."""
    if precision.quantization == "int8":
        ids = tokenizer.encode(CALIBRATION_TEXT)[:CALIBRATION_TOKENS]
        smooth(model, ids)
    for layer in model.layers:
        layer.self_attn.fuse()
        layer.mlp.fuse()
    if precision.quantization in ("int8", "fp16"):
        packed = _int8 if precision.quantization == "int8" else _fp16
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = packed(attn.qkv_proj)
            attn.o_proj = packed(attn.o_proj)
            mlp.gate_up_proj = packed(mlp.gate_up_proj)
            mlp.down_proj = packed(mlp.down_proj)
        # The head keeps fp16 weights (quant.py says why); a tied head gets its own copy, the
        # embedding lookup stays float32 (it reads one row per token).
        head = model.lm_head if model.lm_head is not None else model.embed_tokens
        model.lm_head = Fp16Linear(head.weight)
    model.to(device=precision.device, dtype=precision.torch_dtype)
    model.precision = precision
    return model


def _int8(linear: torch.nn.Module) -> Int8Linear:
    if isinstance(linear, Q8Linear):    # requantized from its blocks, never a float matrix
        return Int8Linear(linear.int8_rows(), linear.bias)
    return Int8Linear(linear.weight, linear.bias)


def _fp16(linear: torch.nn.Linear) -> Fp16Linear:
    return Fp16Linear(linear.weight, linear.bias)


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of weights one decode step reads (every matrix once; the embedding one row)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (Int8Linear, Fp16Linear)):
            total += module.weight_bytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    if model.lm_head is None:
        w = model.embed_tokens.weight
        total += w.numel() * w.element_size()
    return total
