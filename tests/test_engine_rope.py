"""RoPE scaling and the loaders' refusals: Llama 3's inverse frequencies against the documented
formula, HF directories and GGUF files written here giving the same scaled logits (the GGUF
through llama.cpp's rope_freqs tensor), and every configuration the engine cannot compute
refused with its key and value."""
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_engine_loaders import forward, write_gguf, write_tokenizer_json
from workers.engine import rope
from workers.engine.loaders import load_model
from workers.engine.tiny import random_model, tiny_config

# Llama 3.1's published values, except a short original context so that the tiny model's
# head_dim=16 frequencies fall in all three regimes (kept, blended, interpolated).
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CFG = tiny_config(max_position=512)
IDS = list(range(40, 100))   # long enough for the interpolated low frequencies to matter


def documented_llama3(head_dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """The formula transformers documents for rope_type "llama3", written out directly: inverse
    frequencies whose wavelength exceeds original / low_freq_factor are divided by factor; those
    between original / high_freq_factor and that are a blend of scaled and unscaled weighted by
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    out = []
    for i in range(head_dim // 2):
        inv = 1.0 / theta ** (2 * i / head_dim)
        wavelength = 2 * math.pi / inv
        scaled = inv / factor if wavelength > original / low_freq_factor else inv
        if original / high_freq_factor <= wavelength <= original / low_freq_factor:
            smooth = ((original / wavelength - low_freq_factor)
                      / (high_freq_factor - low_freq_factor))
            scaled = (1 - smooth) * scaled / factor + smooth * scaled
        out.append(scaled)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim,theta,factor,low,high,original", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),    # Llama 3.1 8B
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),    # Llama 3.2 1B
    (16, 10000.0, 8.0, 1.0, 4.0, 64),        # the tiny model below
])
def test_llama3_inverse_frequencies_follow_the_documented_formula(head_dim, theta, factor, low,
                                                                  high, original):
    divisors = rope.llama3_divisors(head_dim, theta, factor, low, high, original)
    ours = rope.inverse_frequencies(head_dim, theta, divisors)
    assert torch.allclose(ours, documented_llama3(head_dim, theta, factor, low, high, original),
                          rtol=1e-12, atol=0)
    # all three regimes are exercised: kept, interpolated, and blended strictly between
    assert divisors[0] == 1.0 and divisors[-1] == factor
    assert any(1.0 < d < factor for d in divisors)


def test_linear_scaling_is_positions_divided_by_the_factor():
    positions = torch.arange(100, dtype=torch.float64)
    divisors = rope.linear_divisors(16, 4.0)
    scaled = torch.outer(positions, rope.inverse_frequencies(16, 10000.0, divisors))
    plain = torch.outer(positions / 4.0, rope.inverse_frequencies(16, 10000.0))
    assert torch.allclose(scaled, plain, rtol=1e-14, atol=0)


def test_plain_rope_is_untouched_by_empty_divisors():
    assert torch.equal(rope.inverse_frequencies(64, 100000.0, ()),
                       1.0 / 100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))


def write_hf_dir(path, model, **config):
    """An HF directory of ``model`` (untied), with ``config`` overriding config.json's keys."""
    cfg = model.cfg
    hf = {"model_type": "llama", "num_hidden_layers": cfg.num_layers,
          "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
          "max_position_embeddings": cfg.max_position, "bos_token_id": 256, "eos_token_id": 257,
          **config}
    (path / "config.json").write_text(json.dumps(hf))
    state = {("lm_head.weight" if n == "lm_head.weight" else "model." + n): p.clone()
             for n, p in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    write_tokenizer_json(path)
    return path


def llama3_rope_freqs(head_dim, theta):
    """rope_freqs as llama.cpp's converter stores it: the divisor turning each documented base
    inverse frequency into the scaled one, in float32."""
    params = [LLAMA3[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                  "original_max_position_embeddings")]
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / documented_llama3(head_dim, theta, *params)).numpy().astype(np.float32)


def test_llama3_scaling_gives_the_same_logits_through_both_loaders(tmp_path):
    model = random_model(CFG, seed=3)
    (tmp_path / "hf").mkdir()
    from_hf, _ = load_model(str(write_hf_dir(tmp_path / "hf", model, rope_scaling=LLAMA3)))
    freqs = llama3_rope_freqs(CFG.head_dim, CFG.rope_theta)
    from_gguf, _ = load_model(str(write_gguf(tmp_path / "m.gguf", model,
                                             tensors={"rope_freqs.weight": freqs})))

    assert from_gguf.cfg.rope_freq_divisors == tuple(freqs.tolist())   # rope_freqs is used
    hf_logits, gguf_logits = forward(from_hf, IDS), forward(from_gguf, IDS)
    # HF's divisors are float64, the GGUF's float32 as llama.cpp stores them
    assert torch.allclose(hf_logits, gguf_logits, rtol=0, atol=1e-4)
    assert not torch.allclose(hf_logits, forward(model, IDS), rtol=0, atol=1e-2)
    # ...and it is exactly the model built with those divisors
    scaled = random_model(tiny_config(max_position=512, rope_freq_divisors=rope.llama3_divisors(
        CFG.head_dim, CFG.rope_theta, 8.0, 1.0, 4.0, 64)), seed=3)
    assert torch.equal(hf_logits, forward(scaled, IDS))


def test_linear_scaling_gives_the_same_logits_through_both_loaders(tmp_path):
    model = random_model(CFG, seed=4)
    (tmp_path / "hf").mkdir()
    from_hf, _ = load_model(str(write_hf_dir(tmp_path / "hf", model,
                                             rope_scaling={"type": "linear", "factor": 4.0})))
    from_gguf, _ = load_model(str(write_gguf(tmp_path / "m.gguf", model, fields={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})))
    assert from_hf.cfg.rope_freq_divisors == from_gguf.cfg.rope_freq_divisors == (4.0,) * 8
    assert torch.equal(forward(from_hf, IDS), forward(from_gguf, IDS))
    assert not torch.allclose(forward(from_hf, IDS), forward(model, IDS), rtol=0, atol=1e-2)


def test_transformers_5_rope_parameters_carry_theta_and_scaling(tmp_path):
    model = random_model(tiny_config(max_position=512, rope_theta=50000.0), seed=5)
    loaded, _ = load_model(str(write_hf_dir(tmp_path, model, rope_theta=None, rope_parameters={
        "rope_theta": 50000.0, **LLAMA3})))
    assert loaded.cfg.rope_theta == 50000.0
    assert loaded.cfg.rope_freq_divisors == rope.llama3_divisors(16, 50000.0, 8.0, 1.0, 4.0, 64)


@pytest.mark.parametrize("config", [
    {"model_type": "mistral", "sliding_window": None, "max_position_embeddings": 32768},
    {"model_type": "mistral", "sliding_window": 32768, "max_position_embeddings": 32768},
    {"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": False},
    # qwen2 slides only from layer max_window_layers on; the tiny model has 2 layers
    {"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": True,
     "max_window_layers": 2},
    {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
     "partial_rotary_factor": 1.0, "rope_scaling": {"rope_type": "default"}},
])
def test_what_the_engine_computes_is_not_refused(tmp_path, config):
    qwen = config.get("model_type") == "qwen2"
    model = random_model(tiny_config(max_position=512, qkv_bias=qwen), seed=6)
    loaded, _ = load_model(str(write_hf_dir(tmp_path, model, **config)))
    assert torch.equal(forward(loaded, IDS), forward(model, IDS))


@pytest.mark.parametrize("config,message", [
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},
     "sliding_window=4096 .below max_position_embeddings=32768"),
    # MistralConfig's default window, where config.json does not say
    ({"model_type": "mistral", "max_position_embeddings": 32768}, "sliding_window=4096"),
    ({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": True,
      "max_window_layers": 0}, "use_sliding_window=true, sliding_window=256"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope_scaling.rope_type 'longrope'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling: rope_type 'llama3' has no 'low_freq_factor'"),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}},
     "rope_scaling: llama3 RoPE scaling: needs high_freq_factor=1.0 > low_freq_factor=1.0"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"model_type": "qwen2", "mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_hf_configs_the_engine_cannot_compute_are_refused_by_key(tmp_path, config, message):
    model = random_model(CFG, seed=7)
    with pytest.raises(ValueError, match=r"config\.json: .*" + message):
        load_model(str(write_hf_dir(tmp_path, model, **config)))


def test_hf_tie_mismatches_are_refused(tmp_path):
    untied = random_model(CFG, seed=8)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="tie_word_embeddings is true in config.json but "
                                         "lm_head.weight differs from embed_tokens.weight"):
        load_model(str(write_hf_dir(tmp_path / "a", untied, tie_word_embeddings=True)))
    tied = random_model(tiny_config(max_position=512, tie_embeddings=True), seed=8)
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="tie_word_embeddings is false in config.json .false when "
                                         "absent. but the weights have no lm_head.weight"):
        load_model(str(write_hf_dir(tmp_path / "b", tied)))
    # a tied checkpoint that also stores its (equal) lm_head loads
    state_path = tmp_path / "b" / "model.safetensors"
    state = load_file(str(state_path))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(state_path))
    (tmp_path / "b" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "b" / "config.json").read_text()), "tie_word_embeddings": True}))
    loaded, _ = load_model(str(tmp_path / "b"))
    assert loaded.cfg.tie_embeddings and torch.equal(forward(loaded, IDS), forward(tied, IDS))


@pytest.mark.parametrize("fields,tensors,message", [
    ({"llama.attention.sliding_window": 256}, {},
     "llama.attention.sliding_window=256 .below context_length=512"),
    ({"llama.rope.scaling.type": "yarn"}, {}, "llama.rope.scaling.type='yarn'"),
    ({"llama.rope.scaling.type": "longrope"}, {}, "llama.rope.scaling.type='longrope'"),
    ({"llama.rope.scaling.attn_factor": 0.5}, {}, "llama.rope.scaling.attn_factor=0.5"),
    ({"llama.rope.dimension_count": 8}, {}, "llama.rope.dimension_count=8"),
    ({"llama.attention.value_length": 8}, {}, "llama.attention.value_length=8"),
    ({"llama.expert_count": 4}, {}, "llama.expert_count=4"),
    ({}, {"blk.0.attn_output.bias": np.zeros(64)}, "no place for: blk.0.attn_output.bias"),
    ({}, {"blk.1.ffn_down.bias": np.zeros(64)}, "no place for: blk.1.ffn_down.bias"),
    ({}, {"rope_freqs.weight": np.ones(4)}, "rope_freqs.weight has 4 values; head_dim=16 needs 8"),
])
def test_gguf_files_the_engine_cannot_compute_are_refused_by_key(tmp_path, fields, tensors,
                                                                 message):
    path = tmp_path / "m.gguf"
    write_gguf(path, random_model(CFG, seed=9), fields, tensors)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        load_model(str(path))


def test_gguf_sliding_window_as_long_as_the_context_is_full_attention(tmp_path):
    model = random_model(CFG, seed=10)
    path = write_gguf(tmp_path / "m.gguf", model, {"llama.attention.sliding_window": 512})
    assert torch.equal(forward(load_model(str(path))[0], IDS), forward(model, IDS))
