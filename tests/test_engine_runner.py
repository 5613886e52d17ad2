"""The paged runner on the tiny model, against plain causal attention without a cache."""
import pytest
import torch

from workers.engine.kv_cache import KVCache
from workers.engine.model import causal_attention
from workers.engine.runner import ModelRunner
from workers.engine.tiny import tiny_model

MODEL, TOK = tiny_model(seed=0)
ATOL = 1e-4


def reference_logits(ids):
    """Logits at every position of ``ids`` from one cache-free forward."""
    with torch.inference_mode():
        hidden = MODEL(torch.tensor(ids), torch.arange(len(ids)),
                       lambda layer, q, k, v: causal_attention(q, k, v))
        return MODEL.logits(hidden)


KERNEL = {"on": True}


@pytest.fixture(autouse=True, params=["paged kernel", "copy path"])
def decode_path(request):
    """Every test runs with the CPU paged decode kernel (paged_kernel.py) and with the copy path."""
    KERNEL["on"] = request.param == "paged kernel"
    yield
    KERNEL["on"] = True


def runner(num_blocks=32, block_size=4, dtype=torch.float32):
    r = ModelRunner(MODEL, KVCache(MODEL.cfg, num_blocks, block_size, dtype=dtype),
                    paged_kernel_on=KERNEL["on"])
    assert (r._kernel is not None) == KERNEL["on"]
    return r


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def test_prefill_matches_the_cache_free_forward_with_scattered_blocks():
    ids = prompt(13)                           # 13 = 2 * 5 + 3: the last block is partly used
    r = runner(num_blocks=12, block_size=5)
    logits = r.prefill(ids, [7, 2, 9])
    assert logits.shape == (MODEL.cfg.vocab_size,) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(ids)[-1], atol=ATOL, rtol=0)
    # Only the table's blocks were written.
    untouched = [b for b in range(12) if b not in (7, 2, 9)]
    assert not r.kv.pool[untouched].any()
    assert r.kv.pool[[7, 2]].abs().sum(dim=(1, 2, 4, 5)).gt(0).all()   # every slot written
    assert not r.kv.pool[9, :, :, 3:].any()                             # slots past the end


def test_prefill_then_decode_equals_a_longer_prefill():
    ids = prompt(11, seed=1)
    r = runner(block_size=4)
    table = r.kv.allocator.allocate(3)
    r.prefill(ids[:-1], table)
    step = r.decode([ids[-1]], [len(ids) - 1], [table])
    assert step.shape == (1, MODEL.cfg.vocab_size)
    full = runner(block_size=4).prefill(ids, [0, 1, 2])
    torch.testing.assert_close(step[0], full, atol=ATOL, rtol=0)


def test_prefill_after_a_cached_prefix_equals_a_full_prefill():
    ids = prompt(20, seed=2)
    r = runner(block_size=3)
    table = [10, 4, 6, 1, 12, 3, 8]
    r.prefill(ids[:8], table)
    rest = r.prefill(ids[8:], table, start_pos=8)
    torch.testing.assert_close(rest, reference_logits(ids)[-1], atol=ATOL, rtol=0)


def test_batched_decode_equals_single_decodes():
    lengths = [3, 9, 6]
    prompts = [prompt(n, seed=10 + n) for n in lengths]
    tables = [[5, 0], [1, 7, 3], [2, 6, 4]]
    batched, single = runner(block_size=4), runner(block_size=4)
    for ids, table in zip(prompts, tables):
        batched.prefill(ids, table)
        single.prefill(ids, table)
    seqs = [list(ids) for ids in prompts]
    next_tokens, positions = [65, 66, 67], lengths
    for step in range(3):   # a few steps, so later ones read K/V the batch wrote
        out = batched.decode(next_tokens, positions, tables)
        alone = torch.stack([single.decode([t], [p], [tb])[0]
                             for t, p, tb in zip(next_tokens, positions, tables)])
        torch.testing.assert_close(out, alone, atol=ATOL, rtol=0)
        assert out.argmax(-1).tolist() == alone.argmax(-1).tolist()
        for seq, t in zip(seqs, next_tokens):
            seq.append(t)
        next_tokens = out.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    # The last step's logits agree with a cache-free forward over each whole sequence.
    for seq, row in zip(seqs, out):
        torch.testing.assert_close(row, reference_logits(seq)[-1], atol=ATOL, rtol=0)


def test_greedy_generation_matches_the_cache_free_forward():
    ids = prompt(6, seed=3)
    r = runner(block_size=4)
    table = r.kv.allocator.allocate(4)
    logits = r.prefill(ids, table)
    seq = list(ids)
    for _ in range(8):
        seq.append(int(logits.argmax()))
        logits = r.decode([seq[-1]], [len(seq) - 1], [table])[0]
    torch.testing.assert_close(logits, reference_logits(seq)[-1], atol=ATOL, rtol=0)


def test_a_block_table_too_short_is_an_error():
    r = runner(block_size=4)
    with pytest.raises(ValueError, match="cannot hold 9 positions"):
        r.prefill(prompt(9), [0, 1])
    r.prefill(prompt(8), [0, 1])
    with pytest.raises(ValueError, match="cannot hold 9 positions"):
        r.decode([1], [8], [[0, 1]])


def test_a_bf16_cache_stays_close_to_fp32():
    ids = prompt(12, seed=4)
    half = runner(8, 4, dtype=torch.bfloat16)
    assert half.kv.block_nbytes == MODEL.cfg.kv_bytes_per_token(torch.bfloat16) * 4
    half.prefill(ids[:-1], [3, 1, 5])
    out = half.decode([ids[-1]], [11], [[3, 1, 5]])[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_logits(ids)[-1], atol=0.1, rtol=0.05)


def test_prefill_calls_on_layer_after_every_layer():
    model, _ = tiny_model()
    kv = KVCache(model.cfg, 8, 16)
    seen = []
    runner = ModelRunner(model, kv)
    with_hook = runner.prefill(list(range(20)), kv.allocator.allocate(2), on_layer=seen.append)
    assert seen == list(range(model.cfg.num_layers))
    without = runner.prefill(list(range(20)), kv.allocator.allocate(2))
    assert torch.equal(with_hook, without)


def test_decode_groups_fit_the_byte_budget_and_cover_the_batch(monkeypatch):
    import workers.engine.runner as runner_module
    r = runner(block_size=4)
    per_position = 2 * MODEL.cfg.num_kv_heads * MODEL.cfg.head_dim * 4
    monkeypatch.setattr(runner_module, "DECODE_GROUP_BYTES", 10 * per_position)
    # A group costs its size times its longest: (3, 4) is 2*4 = 8 <= 10, adding 2 would be 12.
    assert r._decode_groups([3, 4, 2, 9, 1, 1]) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert r._decode_groups([20]) == [(0, 1)]      # one sequence over the budget still runs


@pytest.mark.parametrize("group_positions", [1, 20, 1 << 30])
def test_batched_decode_in_groups_equals_single_decodes(monkeypatch, group_positions):
    """Every grouping gives the same logits: one sequence a group, (4, 10) then (7,), the whole batch."""
    import workers.engine.runner as runner_module
    KERNEL["on"] = False          # groups are the copy path's
    per_position = 2 * MODEL.cfg.num_kv_heads * MODEL.cfg.head_dim * 4
    monkeypatch.setattr(runner_module, "DECODE_GROUP_BYTES", group_positions * per_position)
    test_batched_decode_equals_single_decodes()
