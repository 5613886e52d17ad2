"""Loads an HF model directory (config.json, *.safetensors single or sharded, tokenizer.json,
tokenizer_config.json) of the Llama family: Llama, SmolLM, Mistral-style, Qwen2. Reads files
only; never downloads."""
from __future__ import annotations

import json
import os

from .config import ModelConfig
from .model import LlamaModel
from .tokenizer import HFTokenizer

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _config(path: str, hf: dict, generation: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: model_type {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"{path}: rope_scaling {scaling!r} is not supported")
    heads = hf["num_attention_heads"]
    eos = _ids(hf.get("eos_token_id")) + _ids(generation.get("eos_token_id"))
    return ModelConfig(
        name=os.path.basename(os.path.normpath(path)),
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        rope_theta=float(hf.get("rope_theta", 10000.0)), rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
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


def load_hf_dir(path: str) -> tuple[LlamaModel, HFTokenizer]:
    from safetensors.torch import load_file

    cfg = _config(path, _read_json(os.path.join(path, "config.json")),
                  _read_json(os.path.join(path, "generation_config.json")))
    state = {}
    for file in _weight_files(path):
        for name, w in load_file(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            state[name.removeprefix("model.")] = w.float().contiguous()
    try:
        model = LlamaModel.from_state_dict(cfg, state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model, _tokenizer(path, cfg)
