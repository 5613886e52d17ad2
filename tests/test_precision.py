"""Weights and dtypes: the int8 linear layer, smoothing, fusion, and how dtype / quantization /
device settings resolve (workers/engine/quant.py, smooth.py, precision.py)."""
import os
import subprocess
import sys

import pytest
import torch

from broker.config import ConfigError
from workers.engine.kv_cache import KVCache, pool_blocks
from workers.engine.loaders import load_model
from workers.engine.model import causal_attention
from workers.engine.precision import Precision, prepare, resolve, weight_bytes
from workers.engine.quant import Int8Linear, quantize_rows, weight_max
from workers.engine.runner import ModelRunner
from workers.engine.smooth import smooth
from workers.engine.tiny import tiny_model
from workers.options import parse_options

IDS = list(range(60, 100))


def logits(model, ids=IDS):
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       lambda layer, q, k, v: causal_attention(q, k, v))
        return model.logits(hidden)


def test_int8_linear_is_close_to_the_float_product():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) / 8
    b = torch.randn(96, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    x[0, 3] = 40.0                       # an outlier in one row must not coarsen the others
    want = torch.nn.functional.linear(x, w, b)
    got = Int8Linear(w, b)(x)
    err = (got - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() < 0.05, err
    q, scales = quantize_rows(w)
    assert q.abs().max() == weight_max() and (q.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6


def test_int8_linear_rows_do_not_depend_on_their_batch():
    gen = torch.Generator().manual_seed(1)
    lin = Int8Linear(torch.randn(200, 64, generator=gen))
    x = torch.randn(33, 64, generator=gen) * torch.logspace(-2, 2, 33).unsqueeze(1)
    together = lin(x)
    for i in (0, 7, 32):
        assert torch.equal(lin(x[i:i + 1])[0], together[i])
        assert torch.equal(lin(x[i:i + 3])[0], together[i])


def test_smoothing_keeps_the_float_model_and_fusion_changes_nothing():
    model, tok = tiny_model(3)
    before = logits(model)
    smooth(model, IDS)
    assert torch.allclose(logits(model), before, atol=1e-4, rtol=1e-4)
    fused = prepare(model, Precision("float32", "none", "cpu"), tok)
    assert fused.layers[0].self_attn.qkv_proj is not None and not hasattr(fused.layers[0].mlp, "up_proj")
    assert torch.allclose(logits(fused), before, atol=1e-4, rtol=1e-4)


def test_int8_model_stays_close_and_reads_fewer_bytes():
    ref, _ = load_model("tiny")
    q, _ = load_model("tiny", quantization="int8")
    assert q.precision == Precision("float32", "int8", "cpu")
    assert weight_bytes(q) < 0.35 * weight_bytes(ref)   # int8 layers, an fp16 head
    a, b = logits(ref), logits(q)
    assert ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.1
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.85   # random weights: close logits


@pytest.mark.parametrize("dtype,kv", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_model_runs_paged(dtype, kv):
    ref, _ = load_model("tiny")
    model, _ = load_model("tiny", dtype=dtype, quantization="none", device="cpu")
    assert model.norm.weight.dtype == kv
    cache = KVCache(model.cfg, 16, 16, kv)
    runner = ModelRunner(model, cache)
    table = cache.allocator.allocate(4)
    full = runner.prefill(IDS, table)
    assert full.dtype == torch.float32
    assert torch.allclose(full, logits(ref)[-1], atol=0.15, rtol=0.05)
    step = runner.decode([int(full.argmax())], [len(IDS)], [table])
    assert step.shape == (1, model.cfg.vocab_size) and torch.isfinite(step).all()


# In a fresh process, under fbgemm's instruction set ISA ("" for its own choice): the weight
# range its probe picks, what auto resolves to, and the relative error of a worst-case int8 row
# (every input at the top of its range, every weight at the top of the picked range).
PROBE = """
import torch
from workers.engine.precision import resolve
from workers.engine.quant import Int8Linear, weight_max
w = torch.ones(8, 256)
w[1::2] = -1.0
x = torch.ones(3, 256)
want = torch.nn.functional.linear(x, w)
err = ((Int8Linear(w)(x) - want).abs().max() / want.abs().max()).item()
print(weight_max(), resolve().quantization, err)
"""


def probe(isa: str) -> tuple[int, str, float]:
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": isa, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert out.returncode == 0, out.stderr
    top, quant, err = out.stdout.split()
    return int(top), quant, float(err)


def test_weight_range_follows_the_kernel_and_auto_picks_int8_only_where_it_is_exact():
    """fbgemm's AVX2 kernel saturates int16 sums of 8-bit products: there weights get 7 bits and
    auto picks fp16 weights; where its kernel is exact (VNNI) they get 8 bits and auto picks int8.
    Either way a worst-case row comes out right (a saturated one is off by about half)."""
    top, quant, err = probe("AVX2")
    assert (top, quant) == (63, "fp16") and err < 0.02, (top, quant, err)
    top, quant, err = probe("")
    assert (top, quant) in ((63, "fp16"), (127, "int8")) and err < 0.02, (top, quant, err)


def test_auto_resolves_to_float32_compute_with_fbgemm_weights_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: auto picks the GPU there")
    assert resolve() == Precision("float32", "int8" if weight_max() == 127 else "fp16", "cpu")
    assert resolve(quantization="int8") == Precision("float32", "int8", "cpu")
    assert resolve("bfloat16") == Precision("bfloat16", "none", "cpu")
    assert resolve(quantization="none") == Precision("float32", "none", "cpu")


@pytest.mark.parametrize("kwargs,words", [
    (dict(dtype="fp8"), ["dtype='fp8'", "float32"]),
    (dict(quantization="int4"), ["quantization='int4'", "int8", "fp16"]),
    (dict(dtype="bfloat16", quantization="int8"), ["int8", "dtype='bfloat16'"]),
    (dict(device="tpu"), ["device='tpu'", "cuda:N"]),
])
def test_bad_settings_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError) as e:
        resolve(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_cuda_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve(device="cuda:0")


def test_worker_options_carry_dtype_quantization_device(tmp_path):
    opts = parse_options({"dtype": "bfloat16", "quantization": "none", "device": "cpu"}, "w.yaml")
    assert (opts.dtype, opts.quantization, opts.device) == ("bfloat16", "none", "cpu")
    assert parse_options({}).quantization == "auto"
    with pytest.raises(ConfigError, match=r"w.yaml.*quantization"):
        parse_options({"quantization": "int4"}, "w.yaml")


def test_free_gpu_memory_fraction_sizes_the_pool_only_on_a_gpu():
    opts = parse_options({"kv_cache_config": {"free_gpu_memory_fraction": 0.5, "max_tokens": 512}})
    assert (opts.kv_gpu_fraction, opts.kv_max_tokens) == (0.5, 512)
    cfg = tiny_model()[0].cfg
    assert pool_blocks(cfg, 16, torch.float32, "cpu", 512, 0.5) == 32        # the CPU: max_tokens
    assert pool_blocks(cfg, 16, torch.float32, "cpu", None, None) == 16384 // 16
    with pytest.raises(ConfigError, match=r"free_gpu_memory_fraction"):
        parse_options({"kv_cache_config": {"free_gpu_memory_fraction": 1.5}}, "w.yaml")
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        blocks = pool_blocks(cfg, 16, torch.bfloat16, "cuda:0", None, 0.01)
        assert 0 < blocks * 16 * cfg.kv_bytes_per_token(torch.bfloat16) <= 0.01 * free


def test_compiled_decode_matches_eager_and_keeps_rows_batch_invariant():
    """``compile_decode``: torch.compile with fbgemm's kernels and paged attention as opaque ops.
    Its logits agree with eager decode to rounding, and a row's logits do not depend on its batch
    (the int8 kernels' guarantee survives compilation)."""
    model, _ = load_model("tiny", quantization="int8")
    kv = KVCache(model.cfg, 32, 4)
    eager, compiled = ModelRunner(model, kv), ModelRunner(model, kv, compile_decode=True)
    tables = [kv.allocator.allocate(4) for _ in range(3)]
    for i, table in enumerate(tables):
        eager.prefill(IDS[i: i + 10], table)
    tokens, positions = [5, 6, 7], [10, 10, 10]
    want = eager.decode(tokens, positions, tables)
    together = compiled.decode(tokens, positions, tables)
    torch.testing.assert_close(together, want, atol=1e-4, rtol=1e-4)
    assert (together.argmax(-1) == want.argmax(-1)).all()
    alone = compiled.decode(tokens[1:2], positions[1:2], tables[1:2])
    pair = compiled.decode(tokens[:2], positions[:2], tables[:2])
    assert torch.equal(alone[0], together[1]) and torch.equal(pair, together[:2])
