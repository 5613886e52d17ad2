"""Loads an HF model directory (config.json, *.safetensors single or sharded, tokenizer.json,
tokenizer_config.json) of the Llama family: Llama, SmolLM, Mistral-style, Qwen2. Reads files
only; never downloads."""
from __future__ import annotations

import json
import os

import torch

from . import rope
from .config import ModelConfig
from .model import LlamaModel
from .tokenizer import HFTokenizer

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_CONTEXT = 4096   # max_position_embeddings where config.json does not say


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _rope(file: str, hf: dict, head_dim: int) -> tuple[float, tuple[float, ...]]:
    """theta and the frequency divisors of config.json's RoPE: ``rope_scaling`` (transformers 4)
    or ``rope_parameters`` (transformers 5, which also holds rope_theta)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
        raise ValueError(f"{file}: partial_rotary_factor={partial!r} (partial rotary) is not "
                         "supported; every head dimension must rotate")
    kind = params.get("rope_type", params.get("type")) or "default"

    def need(name):
        if name not in params:
            raise ValueError(f"rope_type {kind!r} has no {name!r}")
        return params[name]

    try:   # the file and key go in front of errors from here
        if kind == "default":
            return theta, ()
        if kind == "linear":
            return theta, rope.linear_divisors(head_dim, float(need("factor")))
        if kind == "llama3":
            return theta, rope.llama3_divisors(
                head_dim, theta, float(need("factor")), float(need("low_freq_factor")),
                float(need("high_freq_factor")), int(need("original_max_position_embeddings")))
    except ValueError as e:
        raise ValueError(f"{file}: {key}: {e}") from None
    raise ValueError(f"{file}: {key}.rope_type {kind!r} is not supported; supported: "
                     f"{', '.join(ROPE_TYPES)}")


def _refuse_unsupported(file: str, hf: dict, kind: str) -> None:
    """What these checkpoints may declare that the model does not compute: refused here, by key
    and value, rather than loaded into something that silently differs."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{file}: hidden_act {act!r} is not supported (the MLP is SwiGLU: silu)")
    for key in ("mlp_bias",) if kind == "qwen2" else ("attention_bias", "mlp_bias"):
        # qwen2's q/k/v biases are modelled; Llama's attention_bias also puts one on o_proj.
        if hf.get(key):
            raise ValueError(f"{file}: {key}={hf[key]!r} is not supported (the model has no "
                             "such biases)")
    context = hf.get("max_position_embeddings", DEFAULT_CONTEXT)
    # Qwen2 declares a window it only uses when use_sliding_window is set, and then only in the
    # layers from max_window_layers on (28 by Qwen2Config's default); Mistral's window (4096 by
    # MistralConfig's default) applies to every layer.
    if kind == "qwen2":
        window = hf.get("sliding_window")
        slides = (hf.get("use_sliding_window")
                  and hf.get("max_window_layers", 28) < hf["num_hidden_layers"])
    else:
        window = hf.get("sliding_window", 4096 if kind == "mistral" else None)
        slides = True
    if slides and window is not None and window < context:
        detail = "use_sliding_window=true, " if kind == "qwen2" else ""
        raise ValueError(f"{file}: {detail}sliding_window={window} (below max_position_embeddings="
                         f"{context}): sliding-window attention is not supported")


def _config(path: str, hf: dict, generation: dict) -> ModelConfig:
    file = os.path.join(path, "config.json")
    kind = hf.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: model_type {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    _refuse_unsupported(file, hf, kind)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, divisors = _rope(file, hf, head_dim)
    eos = _ids(hf.get("eos_token_id")) + _ids(generation.get("eos_token_id"))
    return ModelConfig(
        name=os.path.basename(os.path.normpath(path)),
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, vocab_size=hf["vocab_size"],
        rope_theta=theta, rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=hf.get("max_position_embeddings", DEFAULT_CONTEXT),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2", rope_freq_divisors=divisors,
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos)))


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _tokenizer(path: str, cfg: ModelConfig) -> HFTokenizer:
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise ValueError(f"{path}: no tokenizer.json")
    tok = Tokenizer.from_file(file)
    tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    template = tcfg.get("chat_template")
    if isinstance(template, list):   # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None and cfg.bos_token_id is not None:
        # Not stated: add a BOS where the tokenizer's own post-processor would.
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = bool(probe) and probe[0] == cfg.bos_token_id
    return HFTokenizer(tok, bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids,
                       chat_template=template, add_bos=bool(add_bos))


def _check_tie(path: str, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """The output head as config.json's tie_word_embeddings says (a tied model's lm_head.weight,
    where stored, leaves ``state``), refused where the weights say otherwise."""
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in state:
            raise ValueError(f"{path}: tie_word_embeddings is false in config.json (false when "
                             "absent) but the weights have no lm_head.weight")
        return
    head, embed = state.pop("lm_head.weight", None), state.get("embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ValueError(f"{path}: tie_word_embeddings is true in config.json but lm_head.weight "
                         "differs from embed_tokens.weight")


def read_config(path: str) -> ModelConfig:
    """The model config of an HF directory (config.json and generation_config.json)."""
    return _config(path, _read_json(os.path.join(path, "config.json")),
                   _read_json(os.path.join(path, "generation_config.json")))


def load_hf_dir(path: str) -> tuple[LlamaModel, HFTokenizer]:
    from safetensors.torch import load_file

    cfg = read_config(path)
    state = {}
    for file in _weight_files(path):
        for name, w in load_file(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            state[name.removeprefix("model.")] = w.float().contiguous()
    _check_tie(path, cfg, state)
    try:
        model = LlamaModel.from_state_dict(cfg, state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model, _tokenizer(path, cfg)
