"""The block allocator (pure) and the KV pool's layout."""
import pytest
import torch

from workers.engine.config import ModelConfig
from workers.engine.kv_cache import BlockAllocator, KVCache, OutOfBlocks
from workers.engine.tiny import tiny_config

SMOLLM2 = ModelConfig(name="smollm2", num_layers=30, hidden_size=576, intermediate_size=1536,
                      num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
                      rope_theta=100000.0, rms_eps=1e-5, max_position=8192, tie_embeddings=True,
                      qkv_bias=False, bos_token_id=1, eos_token_ids=(2,))


def test_allocate_prefers_lowest_ids_and_reuses_freed_ones():
    a = BlockAllocator(8)
    assert a.allocate(3) == [0, 1, 2]
    b = a.allocate(2)
    assert b == [3, 4]
    a.free([1, 0])
    assert a.allocate(3) == [0, 1, 5]
    assert (a.num_used, a.num_free, a.num_blocks) == (6, 2, 8)


def test_allocation_is_all_or_nothing_and_message_says_needed_and_free():
    a = BlockAllocator(4)
    a.allocate(3)
    with pytest.raises(OutOfBlocks) as e:
        a.allocate(2)
    assert "needed 2" in str(e.value) and "1 free" in str(e.value)
    assert (e.value.needed, e.value.free) == (2, 1)
    assert a.num_free == 1   # nothing was taken
    assert a.allocate(1) == [3]


def test_refcounts_keep_shared_blocks_until_the_last_free():
    a = BlockAllocator(4)
    ids = a.allocate(2)
    a.incref(ids)
    assert a.refcount(ids[0]) == 2
    a.free(ids)
    assert a.num_free == 2 and a.refcount(ids[0]) == 1
    a.free(ids)
    assert a.num_free == 4 and a.refcount(ids[0]) == 0


def test_double_free_raises_and_changes_nothing():
    a = BlockAllocator(4)
    ids = a.allocate(2)
    a.free([ids[0]])
    with pytest.raises(ValueError, match="double free of block 0"):
        a.free([ids[1], ids[0]])
    assert a.refcount(ids[1]) == 1   # the valid part of the bad call did not happen
    with pytest.raises(ValueError, match="double free"):
        a.free([ids[1], ids[1]])
    with pytest.raises(ValueError, match="out of range"):
        a.free([9])
    with pytest.raises(ValueError, match="free block"):
        a.incref([ids[0]])


def test_kv_bytes_per_token_of_smollm2():
    assert SMOLLM2.kv_bytes_per_token() == 46_080
    assert SMOLLM2.kv_bytes_per_token(torch.bfloat16) == 23_040


def test_pool_is_block_major_and_each_block_is_one_contiguous_range():
    cfg = tiny_config()
    kv = KVCache(cfg, num_blocks=5, block_size=4)
    assert kv.pool.shape == (5, cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim)
    assert kv.pool.is_contiguous()
    assert kv.block_nbytes == cfg.kv_bytes_per_token() * 4
    base = kv.pool.data_ptr()
    for b in range(5):
        assert kv.pool[b].is_contiguous()
        assert kv.pool[b].data_ptr() == base + b * kv.block_nbytes
    assert [kv.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_from_budget_fits_the_budget():
    cfg = tiny_config()
    per_block = cfg.kv_bytes_per_token() * 16
    kv = KVCache.from_budget(cfg, 16, 10 * per_block + per_block - 1)
    assert kv.num_blocks == 10 and kv.allocator.num_blocks == 10
    assert kv.pool.numel() * kv.pool.element_size() <= 11 * per_block
    with pytest.raises(ValueError, match="holds no block"):
        KVCache.from_budget(cfg, 16, per_block - 1)
