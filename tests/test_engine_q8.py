"""GGUF Q8_0 weights kept int8 for int8 serving (workers/engine/q8.py): the blocks read back the file's
values exactly (through llama.cpp's Q/K row permutation), requantize per row as the float path
does, and the int8 model loaded from them computes what the one loaded through float32 computes.
The perplexity bound on SmolLM2 in Q8_0 is in test_engine_quality.py."""
import numpy as np
import pytest
import torch

from bench.q8_0 import write_q8_0
from tests.test_engine_loaders import forward, write_gguf
from workers.engine import loaders, q8
from workers.engine.gguf_loader import load_gguf
from workers.engine.q8 import Q8Linear
from workers.engine.quant import Int8Linear, quantize_rows
from workers.engine.tiny import random_model, tiny_config


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q8")
    model = random_model(tiny_config(), seed=5)
    return str(write_q8_0(str(write_gguf(tmp / "tiny.gguf", model)), str(tmp / "tiny-q8_0.gguf")))


def test_blocks_hold_the_values_the_float_loader_reads(q8_file):
    floats, _ = load_gguf(q8_file)
    blocks, _ = load_gguf(q8_file, keep_q8=True)
    kept = {n: m for n, m in blocks.named_modules() if isinstance(m, Q8Linear)}
    assert len(kept) == 7 * floats.cfg.num_layers          # every projection of every layer
    for name, module in kept.items():
        assert torch.equal(module.weight, floats.get_submodule(name).weight), name
    assert torch.equal(blocks.embed_tokens.weight, floats.embed_tokens.weight)
    assert torch.equal(forward(blocks), forward(floats))    # as a float model, the same function


def test_requantizing_in_chunks_equals_quantizing_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(1)
    values = torch.from_numpy(rng.integers(-127, 128, (40, 64), dtype=np.int8))
    scales = torch.from_numpy(rng.uniform(1e-3, 1e-2, (40, 2)).astype(np.float32))
    layer = Q8Linear(values, scales)
    layer.scale_(mul_cols=torch.linspace(0.5, 2.0, 64), div_rows=torch.linspace(1.0, 3.0, 40))
    monkeypatch.setattr(q8, "CHUNK_ROWS", 16)
    q, s = layer.int8_rows()
    want_q, want_s = quantize_rows(layer.weight)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)


def test_fusing_needs_equal_column_factors():
    values, scales = torch.ones(4, 32, dtype=torch.int8), torch.ones(4, 1)
    a, b = Q8Linear(values, scales), Q8Linear(values, scales)
    assert Q8Linear.concat([a, b]).out_features == 8
    b.scale_(mul_cols=torch.full((32,), 2.0))
    with pytest.raises(ValueError, match="same column factors"):
        Q8Linear.concat([a, b])


def test_int8_from_blocks_computes_what_int8_through_float32_does(q8_file, monkeypatch):
    direct, _ = loaders.load_model(q8_file, dtype="float32", quantization="int8", device="cpu")
    assert not any(isinstance(m, Q8Linear) for m in direct.modules())
    assert sum(isinstance(m, Int8Linear) for m in direct.modules()) == 4 * direct.cfg.num_layers
    load = loaders._load
    monkeypatch.setattr(loaders, "_load", lambda spec, seed, keep_q8=False: load(spec, seed))
    through_float, _ = loaders.load_model(q8_file, dtype="float32", quantization="int8", device="cpu")
    ours, ref = forward(direct), forward(through_float)
    # the same smoothing and requantization, up to float rounding of the factors' products
    assert (ours - ref).abs().max() <= 0.02 * ref.abs().max(), (ours - ref).abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
