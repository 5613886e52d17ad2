"""The compiled decode step (workers/engine/compiled.py) and its worker option
``torch_compile_config``: compiled greedy decode equals eager token for token on the tiny model, the
warm-up leaves nothing to compile for any batch up to max_batch_size, and a worker compiles before it
registers and serves what an eager worker serves, aggregated and disaggregated."""
import logging

import pytest
import torch
import torch._dynamo

from client import Client
from tests.harness import Deployment
from tests.test_pipeline import prompts_for_equality
from transfer.config import ConfigError
from workers.engine import compiled
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner
from workers.options import TorchCompile, parse_options

pytestmark = pytest.mark.timeout(300)

PROMPTS = [[256, 72, 105, 33], [256] + list(b"The capital of France"), [256, 7]]


def greedy(runner: ModelRunner, kv: KVCache, steps: int) -> list[list[int]]:
    """Greedy tokens of every prompt of PROMPTS, decoded as one batch after their prefills."""
    tables = [kv.allocator.allocate(kv.blocks_for(len(p) + steps)) for p in PROMPTS]
    out = [[int(runner.prefill(p, t).argmax())] for p, t in zip(PROMPTS, tables)]
    for step in range(steps - 1):
        logits = runner.decode([o[-1] for o in out], [len(p) + step for p in PROMPTS], tables)
        for o, token in zip(out, logits.argmax(-1).tolist()):
            o.append(token)
    for t in tables:
        kv.allocator.free(t)
    return out


def test_compiled_decode_equals_eager_and_warm_up_leaves_nothing_to_compile():
    torch.set_num_threads(1)
    model, _ = load_model("tiny", dtype="float32", quantization="int8", device="cpu")
    kv = KVCache(model.cfg, 64, 16)
    eager = ModelRunner(model, kv)
    runner = ModelRunner(model, kv, compile_decode=True)
    torch._dynamo.reset()
    seconds = compiled.warm_up(runner, kv.allocator, compiled.default_batch_sizes(8))
    assert seconds > 0 and kv.allocator.num_free == 64          # the warm-up's blocks are back
    with torch._dynamo.config.patch(error_on_recompile=True):   # any compile now is an error
        assert greedy(runner, kv, 12) == greedy(eager, kv, 12)  # batch 3
        for b in (1, 5, 8):
            tables = [kv.allocator.allocate(1) for _ in range(b)]
            runner.decode([1] * b, [3] * b, tables)
            for t in tables:
                kv.allocator.free(t)


def test_default_warm_up_sizes_cover_both_graphs():
    assert compiled.default_batch_sizes(64) == (1, 2, 64)
    assert compiled.default_batch_sizes(2) == (1, 2)
    assert compiled.default_batch_sizes(1) == (1,)


def test_torch_compile_config_is_read_as_tensorrt_llm_writes_it(caplog):
    assert parse_options({}).torch_compile is None
    assert parse_options({"torch_compile_config": None}).torch_compile is None
    assert parse_options({"torch_compile_config": {}}).torch_compile == TorchCompile(True, ())
    with caplog.at_level(logging.WARNING):
        opts = parse_options({"max_batch_size": 16, "torch_compile_config": {
            "enable_fullgraph": False, "capture_num_tokens": [16, 1, 4, 4], "enable_inductor": False,
            "enable_piecewise_cuda_graph": True, "max_num_streams": 2}}, "opts.yaml")
    assert opts.torch_compile == TorchCompile(False, (1, 4, 16))
    notices = [r.getMessage() for r in caplog.records]
    for key in ("enable_inductor", "enable_piecewise_cuda_graph", "max_num_streams"):
        assert sum(f"torch_compile_config.{key} is not supported" in m for m in notices) == 1, notices
    assert not any("enable_fullgraph" in m or "capture_num_tokens" in m for m in notices)


@pytest.mark.parametrize("value, expected", [
    ({"capture_num_tokens": [0]}, "torch_compile_config.capture_num_tokens[0]=0"),
    ({"capture_num_tokens": [128]}, "128 is above max_batch_size=64"),
    ({"enable_fullgraph": "yes"}, "torch_compile_config.enable_fullgraph='yes'"),
    ({"fullgraph": True}, "unknown key 'torch_compile_config.fullgraph'"),
])
def test_bad_torch_compile_config_names_the_key(value, expected):
    with pytest.raises(ConfigError, match="opts.yaml: .*" + expected.replace("[", r"\[").replace("]", r"\]")):
        parse_options({"torch_compile_config": value}, "opts.yaml")


@pytest.mark.timeout(600)
def test_compiling_workers_register_after_warm_up_and_serve_as_eager_ones():
    """A generation and a `both` worker with torch_compile_config (compiled before they register)
    give the tokens an eager `both` worker gives, greedy, aggregated and disaggregated; the context
    worker's option is logged as having no effect."""
    compile_opts = {"quantization": "int8", "max_batch_size": 8, "torch_compile_config": {}}
    eager_opts = {"quantization": "int8", "max_batch_size": 8}
    prompts = prompts_for_equality()[::3]
    sampling = dict(max_tokens=8, ignore_eos=True)
    outputs = {}
    for name, workers in {"eager": {"both": ("both", eager_opts)},
                          "compiled": {"both": ("both", compile_opts)},
                          "disagg": {"ctx": ("context", compile_opts), "gen": ("generation", compile_opts)}}.items():
        with Deployment() as d:
            for worker, (role, options) in workers.items():
                d.add_worker(role, worker, options=options, timeout=240)
            with Client(d.frontend, timeout=60) as c:
                outputs[name] = [c.generate(**kw, **sampling).token_ids for kw in prompts]
            d.wait_idle()
            logs = {w: d.tail(w, 200) for w in workers}
        if name != "eager":
            compiling = logs["both" if name == "compiled" else "gen"]
            assert compiling.index("compiled decode step ready") < compiling.index("registering with"), compiling
        if name == "disagg":
            assert "torch_compile_config is not supported here" in logs["ctx"], logs["ctx"]
    assert all(len(ids) == sampling["max_tokens"] for ids in outputs["eager"])
    assert outputs["compiled"] == outputs["eager"]
    assert outputs["disagg"] == outputs["eager"]
