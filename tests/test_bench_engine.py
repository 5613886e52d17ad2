"""bench/engine.py, bench/perplexity.py and bench/llamacpp.py without llama.cpp: the engine benchmark
in its smallest configuration on the tiny model (``--no-peer``), the perplexity and byte counts
they report, and the parsers of llama.cpp's output on captured samples. Nothing here builds or
runs llama.cpp (a build takes tens of minutes); timings are never asserted."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from bench import llamacpp
from bench.common import ROOT, child_env
from bench.engine import parse_configs
from bench.perplexity import perplexity
from workers.engine.kv_cache import KVCache
from workers.engine.runner import ModelRunner
from workers.engine.tiny import tiny_model
from workers.engine.tokenizer import ByteTokenizer


@pytest.mark.timeout(450)   # it compiles the tiny model's decode step (+compile)
def test_engine_bench_smoke(tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.engine", "--model", "tiny", "--no-peer", "--configs", "float32:none",
         "--threads", "1,2", "--batches", "1,2", "--prefill", "8", "--history", "4", "--steps", "2",
         "--rounds", "1", "--json", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama.cpp: skipped (--no-peer)" in proc.stdout
    # eager and compiled side by side by default (--compile both), each with its warm-up time
    assert "| threads | case | float32/none tok/s | float32/none+compile tok/s | llama.cpp tok/s |" in proc.stdout
    rep = json.loads(out.read_text())
    # the compiled engine is compiled anew at each thread count (inductor fixes it at compile time)
    assert set(rep["warm_up_s"]) == {f"float32/none{c}, {t} thread(s)" for c in ("", "+compile") for t in (1, 2)}
    assert rep["llama.cpp"] == {"version": None, "skipped": "--no-peer"}
    assert rep["memcpy_GBps"] > 0 and rep["weight_bytes_per_step"]["float32/none"] > 0
    assert [(r["threads"], r["case"]) for r in rep["results"]] == \
        [(t, c) for t in (1, 2) for c in ("decode b=1", "decode b=2", "prefill 8")]
    for row in rep["results"]:
        for name in ("float32/none", "float32/none+compile"):
            assert row["ours"][name] > 0 and len(row["ours_rounds"][name]) == 1
        assert row["llama.cpp"] is None and row["ratio"] == {"float32/none": None, "float32/none+compile": None}
    decode1, decode2, prefill = rep["results"][:3]
    assert prefill["bandwidth_bound"] is None
    # the floor of batch B is B times batch 1's: weights are read once per step
    assert decode2["bandwidth_bound"]["float32/none"] == pytest.approx(2 * decode1["bandwidth_bound"]["float32/none"])


def test_configurations_parse_and_name_bad_input():
    assert parse_configs("float32:none, bfloat16:int8,float16") == \
        [("float32", "none"), ("bfloat16", "int8"), ("float16", "none")]
    with pytest.raises(ValueError, match="'float64:none'"):
        parse_configs("float64:none")
    with pytest.raises(ValueError, match="'float32:int4'"):
        parse_configs("float32:int4")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model, tok = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()       # every logit 0: each token has probability 1/258
    assert perplexity(model, tok, "the quick brown fox jumps over the lazy dog", 16) == pytest.approx(258, rel=1e-6)


def test_perplexity_scores_the_second_half_of_each_chunk_as_the_runner_predicts_it():
    model, tok = tiny_model()
    text, ctx = "Perplexity, by hand: 24 bytes.", 12
    ids = tok.encode(text)
    kv = KVCache(model.cfg, 4, 4)
    runner = ModelRunner(model, kv)
    nll, n = 0.0, 0
    for c in range(len(ids) // ctx):          # 2 chunks; the last 6 bytes are dropped
        chunk = ids[c * ctx:(c + 1) * ctx]
        for p in range(ctx // 2, ctx - 1):    # the logits after position p predict chunk[p + 1]
            logits = runner.prefill(chunk[:p + 1], [0, 1, 2, 3])
            nll -= torch.log_softmax(logits.double(), -1)[chunk[p + 1]].item()
            n += 1
    assert n == 10
    assert perplexity(model, tok, text, ctx) == pytest.approx(math.exp(nll / n), rel=1e-4)
    with pytest.raises(ValueError, match="ctx=64: the text has 30 tokens"):
        perplexity(model, tok, text, 64)


def test_bos_replaces_each_chunks_first_token_where_the_tokenizer_adds_one():
    model, tok = tiny_model()

    class WithBos(ByteTokenizer):
        add_bos = True
    text = "abcdefgh" * 2
    assert perplexity(model, WithBos(), text, 8) != pytest.approx(perplexity(model, tok, text, 8))
    # the first byte of each chunk is overwritten, so it cannot matter
    assert perplexity(model, WithBos(), "Xbcdefgh" + "Ybcdefgh", 8) == perplexity(model, WithBos(), text, 8)


# ---------------------------------------------------------------------------------------------
# llama.cpp's output, captured (the build is never needed here)

# llama-bench -o json (11434.0.0, SmolLM2 Q4_1, 1 thread), fields trimmed; a log line before it
LLAMA_BENCH_JSON = """\
load_backend: loaded CPU backend from libggml-cpu.so
[
  {
    "build_commit": "unknown",
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "n_batch": 2048,
    "n_threads": 1,
    "type_k": "f16",
    "flash_attn": -1,
    "n_prompt": 32,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-29T11:58:27Z",
    "avg_ns": 392377135,
    "stddev_ns": 0,
    "avg_ts": 81.554191,
    "stddev_ts": 0.000000,
    "samples_ns": [ 392377135 ],
    "samples_ts": [ 81.5542 ]
  },
  {
    "n_threads": 1,
    "n_prompt": 0,
    "n_gen": 8,
    "n_depth": 32,
    "avg_ts": 56.706017,
    "stddev_ts": 0.000000,
    "samples_ts": [ 56.706 ]
  }
]
"""

# llama-batched-bench --output-format jsonl -npp 32 -ntg 4 -npl 2,4 -pps, and its closing log
BATCHED_BENCH_JSONL = """\
{"n_kv_max": 1024, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 1, "n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 32, "tg": 4, "pl": 2, "n_kv": 72, "t_pp": 0.366418, "speed_pp": 87.331955, "t_tg": 0.141308, "speed_tg": 56.613922, "t": 0.507726, "speed": 78.782646}
{"n_kv_max": 1024, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 1, "n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 32, "tg": 4, "pl": 4, "n_kv": 144, "t_pp": 0.357314, "speed_pp": 89.557083, "t_tg": 0.234990, "speed_tg": 68.088005, "t": 0.592304, "speed": 81.039467}

llama_perf_context_print:        load time =     120.00 ms
"""

PERPLEXITY_OUTPUT = """\
perplexity: tokenizing the input ..
perplexity: calculating perplexity over 15 chunks, n_ctx=512, batch_size=512, n_seq=1
[1]17.1234,[2]18.5000,[3]18.2071,
Final estimate: PPL = 18.2071 +/- 0.45678
"""


def test_llama_bench_output_parses():
    rows = llamacpp.parse_llama_bench(LLAMA_BENCH_JSON)
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"], r["n_threads"]) for r in rows] == [(32, 0, 0, 1), (0, 8, 32, 1)]
    assert rows[0]["tokens_per_s"] == 81.554191 and rows[1]["samples"] == [56.706]
    with pytest.raises(llamacpp.LlamaCppError, match="no JSON array"):
        llamacpp.parse_llama_bench("error: failed to load model\n")


def test_batched_bench_and_perplexity_output_parse():
    assert llamacpp.parse_batched_bench(BATCHED_BENCH_JSONL) == {2: 56.613922, 4: 68.088005}
    assert llamacpp.parse_perplexity(PERPLEXITY_OUTPUT) == 18.2071
    with pytest.raises(llamacpp.LlamaCppError, match="Final estimate"):
        llamacpp.parse_perplexity("[1]17.1234,")
    with pytest.raises(llamacpp.LlamaCppError, match=r"printed no result for \[64\]"):
        llamacpp._complete("llama-batched-bench", llamacpp.parse_batched_bench(BATCHED_BENCH_JSONL), [4, 64])


def test_no_cmake_or_no_build_skips_with_the_reason(tmp_path, monkeypatch):
    tools, reason = llamacpp.find_or_build(str(tmp_path), build=False)
    assert tools is None and "no llama.cpp" in reason and "building is off" in reason
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    assert llamacpp.find_or_build(str(tmp_path)) == (None, "cmake not found on PATH")
    monkeypatch.setenv("DSRV_LLAMACPP_CACHE", str(tmp_path / "elsewhere"))
    assert llamacpp.cache_dir() == str(tmp_path / "elsewhere")
