"""Quality of the CPU weight formats on the embedded default model: perplexity on a slice of the
shipped text (bench/data/perplexity.txt; `python -m bench.perplexity` runs the whole of it) with
int8 weights within 3 % of float32, fp16 weights within 0.5 %."""
import os

import pytest
import torch

from bench.perplexity import perplexity
from workers.engine.loaders import load_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TEXT = os.path.join(os.path.dirname(__file__), "..", "bench", "data", "perplexity.txt")
CTX = 512


@torch.inference_mode()
def test_quantized_perplexity_stays_within_bounds_of_float32():
    torch.set_num_threads(1)
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()[:12_000]          # about 3,000 tokens: 5 chunks of 512
    scores = {}
    for quant in ("none", "int8", "fp16"):
        model, tok = load_model("smollm2-135m", dtype="float32", quantization=quant, device="cpu")
        scores[quant] = perplexity(model, tok, text, CTX)
        del model
    assert 5 < scores["none"] < 50, scores
    assert scores["int8"] <= 1.03 * scores["none"], scores
    assert abs(scores["fp16"] / scores["none"] - 1) <= 0.005, scores


@torch.inference_mode()
def test_int8_from_q8_0_blocks_stays_within_bound_of_float32(tmp_path):
    """SmolLM2 in Q8_0 (bench/q8_0.py writes it from the shipped Q4_1): int8 requantized from the
    blocks (workers/engine/q8.py), never through a float32 model, keeps the 3 % bound."""
    from bench.q8_0 import write_q8_0
    from workers.engine.loaders import smollm2_path

    torch.set_num_threads(1)
    path = write_q8_0(smollm2_path(), str(tmp_path / "smollm2-q8_0.gguf"))
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()[:12_000]
    scores = {}
    for quant in ("none", "int8"):
        model, tok = load_model(path, dtype="float32", quantization=quant, device="cpu")
        scores[quant] = perplexity(model, tok, text, CTX)
        del model
    assert 5 < scores["none"] < 50, scores
    assert scores["int8"] <= 1.03 * scores["none"], scores
