"""Loads a llama or qwen2 GGUF file: config from its metadata, weights dequantized to fp32 (for
int8 serving, Q8_0 projections stay int8 blocks: q8.py), and the tokenizer rebuilt from its fields.
Reads the file only; never writes or downloads."""
from __future__ import annotations

import os

import numpy as np
import torch

from . import rope
from .config import ModelConfig
from .gguf_file import GGUFFile, dequantize
from .model import LlamaModel
from .q8 import Q8Linear, read_blocks
from .tokenizer import HFTokenizer, tokenizer_from_gguf

SUPPORTED_ARCHS = ("llama", "qwen2")

# GGUF tensor name -> our parameter name ({i} is the layer)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}


ROPE_FREQS = "rope_freqs.weight"   # Llama 3's per-frequency RoPE divisors: read by _config


def _param_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows (made for interleaved RoPE), giving
    back the HF layout in which each head's two halves rotate together."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def _rope_divisors(reader: GGUFFile, arch: str, path: str, head_dim: int) -> tuple[float, ...]:
    """Per-frequency divisors of the inverse frequencies, as llama.cpp computes them: the
    ``rope_freqs`` tensor (Llama 3's scaling, stored by the converter), times the linear factor
    (``rope.scaling.factor``, or the older ``rope.scale_linear``) of a non-YaRN model."""
    fields = reader.fields
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported; "
                         f"supported: none, linear (and Llama 3's {ROPE_FREQS} tensor)")
    attn_factor = fields.get(f"{arch}.rope.scaling.attn_factor")
    if attn_factor not in (None, 1.0):
        raise ValueError(f"{path}: {arch}.rope.scaling.attn_factor={attn_factor!r} is not "
                         "supported (only 1.0)")
    factor = (fields.get(f"{arch}.rope.scaling.factor") or fields.get(f"{arch}.rope.scale_linear")
              or 1.0)
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is None:
        return () if factor == 1.0 else rope.linear_divisors(head_dim, factor)
    divisors = dequantize(freqs).astype(np.float64).ravel()
    if divisors.size != head_dim // 2:
        raise ValueError(f"{path}: {ROPE_FREQS} has {divisors.size} values; head_dim={head_dim} "
                         f"needs {head_dim // 2}")
    return tuple((divisors * factor).tolist())


def _config(reader: GGUFFile, arch: str, path: str) -> ModelConfig:
    def get(key, default=None):
        return reader.fields.get(key, default)

    def arch_key(key, default=None):
        return get(f"{arch}.{key}", default)

    hidden = arch_key("embedding_length")
    heads = arch_key("attention.head_count")
    head_dim = arch_key("attention.key_length", hidden // heads)
    rope_dim = arch_key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary ({arch}.rope.dimension_count={rope_dim}, "
                         f"head_dim={head_dim}) is not supported")
    value_dim = arch_key("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{path}: {arch}.attention.value_length={value_dim} differs from "
                         f"key_length={head_dim}; the model needs them equal")
    context = arch_key("context_length")
    window = arch_key("attention.sliding_window")
    if window and window < context:
        raise ValueError(f"{path}: {arch}.attention.sliding_window={window} (below context_length="
                         f"{context}): sliding-window attention is not supported")
    experts = arch_key("expert_count")
    if experts:
        raise ValueError(f"{path}: {arch}.expert_count={experts}: mixture-of-experts is not "
                         "supported")
    names = {t.name for t in reader.tensors}
    unknown = sorted(n for n in names if _param_name(n) is None and n != ROPE_FREQS)
    if unknown:
        # e.g. output-projection or MLP biases: weights the model has no place for
        raise ValueError(f"{path}: tensors the model has no place for: {', '.join(unknown[:4])}"
                         + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""))
    eos = tuple(i for i in (get("tokenizer.ggml.eos_token_id"), get("tokenizer.ggml.eot_token_id"))
                if i is not None)
    return ModelConfig(
        name=get("general.name") or os.path.basename(path),
        num_layers=arch_key("block_count"), hidden_size=hidden,
        intermediate_size=arch_key("feed_forward_length"), num_heads=heads,
        num_kv_heads=arch_key("attention.head_count_kv", heads), head_dim=head_dim,
        vocab_size=arch_key("vocab_size", len(get("tokenizer.ggml.tokens", []))),
        rope_theta=float(arch_key("rope.freq_base", 10000.0)),
        rms_eps=float(arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=context,
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        rope_freq_divisors=_rope_divisors(reader, arch, path, head_dim),
        bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos)))


def read_config(reader: GGUFFile, path: str) -> tuple[str, ModelConfig]:
    """The file's architecture and model config, refused where the engine cannot run it."""
    arch = reader.fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHS)}")
    return arch, _config(reader, arch, path)


def load_gguf(path: str, keep_q8: bool = False) -> tuple[LlamaModel, HFTokenizer]:
    """``keep_q8``: the layers' Q8_0 projection weights stay int8 blocks (``q8.Q8Linear``) instead
    of becoming float32, for int8 serving; the embedding, the head and the norms are float32."""
    import gguf

    reader = GGUFFile(path)
    arch, cfg = read_config(reader, path)
    state, blocks = {}, {}
    for t in reader.tensors:
        name = _param_name(t.name)
        if name is None:
            continue   # rope_freqs: read by _config into the RoPE divisors, not a weight
        heads = None   # llama.cpp permutes Q/K rows only for the llama architecture; qwen2 is as in HF
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = cfg.num_heads
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = cfg.num_kv_heads
        if keep_q8 and t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and name.startswith("layers."):
            cols, rows = t.shape
            values, scales = read_blocks(t.data, rows, cols)
            if heads is not None:   # a row permutation: each row's blocks move with it
                values, scales = (torch.from_numpy(unpermute_rope_rows(x.numpy(), heads).copy())
                                  for x in (values, scales))
            blocks[name] = (values, scales)
            state[name] = torch.empty(rows, cols, device="meta")    # replaced below
            continue
        w = dequantize(t)
        if heads is not None:
            w = unpermute_rope_rows(w, heads)
        if not (w.flags.writeable and w.flags.c_contiguous):   # F32 tensors view the mmap
            w = np.ascontiguousarray(w).copy()
        state[name] = torch.from_numpy(w)
    try:
        model = LlamaModel.from_state_dict(cfg, state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for name, (values, scales) in blocks.items():
        owner, _, attr = name[: -len(".weight")].rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, attr, Q8Linear(values, scales, getattr(parent, attr).bias))
    return model, tokenizer_from_gguf(reader)
