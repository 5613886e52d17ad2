"""The engine on a GPU: model, KV pool and sampling on CUDA in bf16/fp16, and disaggregated
serving between two worker processes moving KV device to device (NIXL VRAM, UCX CUDA). Skipped,
saying why, where CUDA is absent; ``bench/gpu_check.sh`` runs these on a GPU machine."""
import pytest
import torch

from client import Client
from tests.harness import Deployment
from tests.test_pipeline import prompts_for_equality
from tests.test_transfer_gpu import NO_CUDA, _installed
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner
from workers.engine.sampler import sample
from broker.protocol import SamplingParams

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
              pytest.mark.timeout(300)]
IDS = list(range(60, 100))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_runs_on_cuda_and_agrees_with_the_cpu(dtype):
    ref, _ = load_model("tiny")
    model, _ = load_model("tiny", dtype=dtype, device="cuda:0")
    assert model.norm.weight.is_cuda and model.precision.quantization == "none"
    kv = KVCache(model.cfg, 16, 16, getattr(torch, dtype), device="cuda:0")
    runner = ModelRunner(model, kv)
    table = kv.allocator.allocate(4)
    logits = runner.prefill(IDS, table)
    assert logits.is_cuda
    cpu = ModelRunner(ref, KVCache(ref.cfg, 16, 16)).prefill(IDS, [0, 1, 2, 3])
    assert torch.allclose(logits.cpu(), cpu, atol=0.2, rtol=0.05)
    step = runner.decode([int(logits.argmax())], [len(IDS)], [table])
    tokens = sample(step, [SamplingParams(temperature=0.8, top_p=0.9, seed=1)], [[]], [0])
    assert 0 <= tokens[0] < model.cfg.vocab_size


def test_auto_picks_the_gpu_in_bf16_or_fp16():
    model, _ = load_model("tiny", dtype="auto", quantization="auto", device="auto")
    assert model.precision.device == "cuda:0"
    assert model.precision.dtype in ("bfloat16", "float16")


@pytest.mark.parametrize("backend", ["NIXL", "UCX"])
def test_disaggregated_equals_aggregated_on_the_gpu(backend):
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    opts = {"device": "cuda:0", "cache_transceiver_config": {"backend": backend}}
    prompts = prompts_for_equality()[::2]
    runs = []
    for workers in ({"ctx": "context", "gen": "generation"}, {"both": "both"}):
        with Deployment() as d:
            for name, role in workers.items():
                d.add_worker(role, name, options=opts, timeout=240)
            with Client(d.frontend, timeout=120) as c:
                runs.append([c.generate(**kw, max_tokens=8, ignore_eos=True).token_ids for kw in prompts])
            d.wait_idle()
    assert runs[0] == runs[1]
