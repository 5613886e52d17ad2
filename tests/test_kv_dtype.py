"""The KV cache dtype (``kv_cache_config.dtype``): the option, the runner over a half-precision
pool, and the handoff between workers: same KV dtype, disaggregated output equals aggregated
output token for token; different KV dtypes, the request fails naming both workers and both
dtypes, and nothing leaks."""
import pytest
import torch

from broker.config import ConfigError, parse_disagg_config
from client import Client, RequestFailed
from tests.harness import Deployment
from transfer.base import KvLayout, TransferError
from transfer.config import CacheTransceiverConfig
from transfer.registry import create_sink, create_source
from workers.engine.kv_cache import KVCache
from workers.engine.runner import ModelRunner
from workers.engine.tiny import tiny_model
from workers.options import parse_options

HALF = ["bfloat16", "float16"]
MODEL, _ = tiny_model(seed=0)


# ---------------------------------------------------------------------------------------------
# the option

def test_kv_cache_config_dtype_is_read_and_defaults_to_auto():
    assert parse_options({}).kv_dtype == "auto"
    for name in ("auto", "float32", "bfloat16", "float16"):
        assert parse_options({"kv_cache_config": {"dtype": name}}).kv_dtype == name


@pytest.mark.parametrize("value", ["fp8", "float64", "bf16"])
def test_a_kv_dtype_the_engine_cannot_store_is_refused_naming_file_key_and_value(value):
    with pytest.raises(ConfigError) as err:
        parse_options({"kv_cache_config": {"dtype": value}}, "w.yaml")
    assert str(err.value).startswith(f"w.yaml: kv_cache_config.dtype={value!r}: ")
    assert "bfloat16" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_disagg_config({"generation_servers": {"kv_cache_config": {"dtype": value}}}, "d.yaml")
    assert f"d.yaml: generation_servers.kv_cache_config.dtype={value!r}" in str(err.value)


# ---------------------------------------------------------------------------------------------
# the runner over a half-precision pool

def _runner(dtype):
    return ModelRunner(MODEL, KVCache(MODEL.cfg, 32, 4, dtype))


@pytest.mark.parametrize("name", HALF)
def test_prefill_and_decode_over_a_half_precision_pool_agree(name):
    dtype = getattr(torch, name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (40,), generator=g).tolist()
    table = list(range(12))
    full = _runner(dtype).prefill(ids, table)
    stepped = _runner(dtype)
    stepped.prefill(ids[:-1], table)
    step = stepped.decode([ids[-1]], [len(ids) - 1], [table])[0]
    chunked = _runner(dtype)
    chunked.prefill(ids[:17], table)
    rest = chunked.prefill(ids[17:], table, start_pos=17)
    assert stepped.kv.pool.dtype == dtype
    # a prefill attends to K/V rounded as the pool stores them, so a decode reading the pool
    # sees the same keys: they agree far more closely than either agrees with an fp32 pool
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(rest, full, atol=1e-5, rtol=0)
    fp32 = _runner(torch.float32).prefill(ids, table)
    assert (full - fp32).abs().max() > 1e-4          # the pool really is half precision
    torch.testing.assert_close(full, fp32, atol=0.05, rtol=0)   # and not garbage


# ---------------------------------------------------------------------------------------------
# the handoff

def _pool(layout, num_blocks=8):
    return torch.zeros(num_blocks, layout.num_layers, 2, layout.block_size, layout.num_kv_heads,
                       layout.head_dim, dtype=getattr(torch, layout.dtype))


def test_a_kv_dtype_mismatch_names_both_workers_and_both_dtypes():
    ctx_layout = KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=16)
    gen_layout = KvLayout(**{**ctx_layout.to_dict(), "dtype": "bfloat16"})
    cfg = CacheTransceiverConfig(backend="FAKE")
    source = create_source(cfg, _pool(ctx_layout), ctx_layout, worker_id="ctx-a")
    sink = create_sink(cfg, _pool(gen_layout), gen_layout, worker_id="gen-b")
    try:
        handle = source.register("t", [1, 2], 20)
        assert handle["worker_id"] == "ctx-a"
        with pytest.raises(TransferError) as err:
            sink.start_pull("p", handle, [0, 1])
        assert "KV dtype" in str(err.value)
        assert "context worker float32 (ctx-a)" in str(err.value)
        assert "generation worker bfloat16 (gen-b)" in str(err.value)
        assert sink.num_active == 0 and not sink.pool.any()
    finally:
        source.close()
        sink.close()


def _run(dep, prompts):
    with Client(dep.frontend, timeout=60) as c:
        return [c.generate(**kw, max_tokens=8, ignore_eos=True) for kw in prompts]


PROMPTS = [{"token_ids": [7]}, {"token_ids": [(i * 37) % 256 for i in range(70)]},
           {"prompt": "Hello, world"}]
ZMQ = {"cache_transceiver_config": {"backend": "ZMQ"}}


def _kv(name):
    return {**ZMQ, "kv_cache_config": {"dtype": name}}


def _served_equal(dep, name):
    """Aggregated (``both0``), then disaggregated (``ctx0`` -> ``gen0``, which the broker
    prefers once both are up): the same tokens. The processes start while others work."""
    dep.add_worker("context", "ctx0", options=_kv(name), wait=False)
    dep.add_worker("both", "both0", options=_kv(name))
    aggregated = _run(dep, PROMPTS)
    dep.add_worker("generation", "gen0", options=_kv(name))
    disaggregated = _run(dep, PROMPTS)
    assert all(r.timings["kv_transfer"] > 0 for r in disaggregated)    # it was disaggregated
    assert [r.token_ids for r in disaggregated] == [r.token_ids for r in aggregated]
    dep.wait_idle()


@pytest.mark.timeout(120)
def test_disaggregated_equals_aggregated_in_float16():
    with Deployment() as dep:
        _served_equal(dep, "float16")


@pytest.mark.timeout(120)
def test_bfloat16_serves_exactly_and_a_float32_context_worker_is_refused_naming_both():
    with Deployment() as dep:
        _served_equal(dep, "bfloat16")
        dep.kill("ctx0")
        dep.kill("both0")
        dep.add_worker("context", "ctx1", options=_kv("float32"))
        dep.wait_for(lambda s: len(s["workers"]) == 2, 30, "ctx0 and both0 gone")
        with Client(dep.frontend, timeout=60) as c:
            for _ in range(2):                 # every handoff is refused, not only the first
                with pytest.raises(RequestFailed) as err:
                    c.generate(token_ids=list(range(3, 30)), max_tokens=8, ignore_eos=True)
                assert err.value.code == "KV_TRANSFER_FAILED"
                for words in ("KV dtype", "context worker float32 (ctx1)",
                              "generation worker bfloat16 (gen0)"):
                    assert words in err.value.message, err.value.message
        s = dep.wait_idle()                # no request, lease or block held anywhere
        assert s["counters"]["failed"] == 2
