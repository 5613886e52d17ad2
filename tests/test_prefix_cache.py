"""Prefix caching (kv_cache_config.enable_block_reuse): the allocator's bookkeeping, the
scheduler's reuse of cached blocks, and exactness end to end: outputs with and without reuse,
and disaggregated versus aggregated, equal token for token over prompts sharing prefixes."""
from __future__ import annotations

import itertools
import random

import pytest

from broker import protocol as p
from client import Client
from tests.harness import Deployment
from tests.test_scheduler import BLOCK, Rig, generate
from workers.engine.block_allocator import OutOfBlocks
from workers.engine.prefix_cache import CachingAllocator, block_hashes

BS = 16


# ---------------------------------------------------------------------------------------------
# the allocator

def test_hashes_chain_so_a_block_matches_only_after_the_same_prefix():
    a = list(range(48))
    b = [99] + a[1:]                        # first block differs, the next two are the same tokens
    ha, hb = block_hashes(a, BS, 3), block_hashes(b, BS, 3)
    assert len(set(ha)) == 3 and all(x != y for x, y in zip(ha, hb))
    assert block_hashes(a[:40], BS, 2) == ha[:2]


def test_lookup_acquire_release_keeps_blocks_cached_until_evicted_lru_first():
    al = CachingAllocator(4, BS)
    x, y = list(range(32)), list(range(100, 132))
    bx = al.allocate(2)
    assert al.store(bx, x + [7]) == 2 and al.num_cached == 2
    al.free(bx)
    assert al.num_free == 4                       # cached but held by nobody: still capacity
    assert al.lookup(x + [1, 2], 33) == bx and al.lookup(x, 31) == bx[:1]   # within max_tokens
    assert al.lookup([5] + x[1:], 33) == []       # first block differs: nothing after it matches
    by = al.allocate(2)                           # the two never-used blocks, no eviction
    al.store(by, y)
    al.free(by)
    al.acquire(al.lookup(x, 32))                  # x is now the most recently used
    al.free(bx)
    got = al.allocate(3)                          # 0 free: evicts y's blocks first, then x's
    # a prompt's blocks are let go last first, so its tail is evicted before its head
    assert got == [by[1], by[0], bx[1]] and al.evictions == 3 and al.lookup(y, 32) == []
    assert al.lookup(x, 32) == [bx[0]]           # x's head block is still cached
    with pytest.raises(OutOfBlocks):
        al.allocate(2)
    al.free(got)
    assert al.num_free == 4


def test_a_prefix_cached_twice_keeps_the_first_copy_and_frees_the_second():
    al = CachingAllocator(4, BS)
    ids = list(range(16))
    first, second = al.allocate(1), al.allocate(1)
    assert al.store(first, ids) == 1 and al.store(second, ids) == 0
    al.free(second)
    al.free(first)
    assert al.lookup(ids + [1], 17) == first and al.num_cached == 1 and al.num_free == 4


# ---------------------------------------------------------------------------------------------
# the scheduler

def _cached_rig(*rids, blocks=64):
    r = Rig(alloc=CachingAllocator(blocks, BLOCK))
    assert r.sched.reuse
    for rid in rids:
        r.script[rid] = itertools.cycle(b"xyz")
    return r


def test_a_repeated_prompt_prefills_only_past_its_cached_full_blocks():
    r = _cached_rig("a", "b", "c")
    bs = BLOCK
    text = "abcdefghijklmnopqrstuvwxyz" * 2               # 52 tokens in the rig's byte tokenizer
    r.send(generate("a", text, max_tokens=2))
    r.run_until_idle()
    r.take(p.Finished)
    r.send(generate("b", text, max_tokens=2), generate("c", text[:2 * bs], max_tokens=2))
    b, c = r.sched.seqs["b"], r.sched.seqs["c"]
    assert list(r.sched.admit()) == []
    full = (len(b.prompt_ids) - 1) // bs * bs
    assert (b.num_cached, b.cached_tokens) == (full, full)
    # a prompt of exactly two blocks reuses one: its last token must be computed for its logits
    assert c.cached_tokens == bs and b.blocks[:1] == c.blocks[:1]
    assert r.alloc.refcount(b.blocks[0]) == 2
    r.run_until_idle()
    assert ("prefill", "b", full, len(b.prompt_ids)) in r.steps      # only the rest was computed
    fins = {m.request_id: m for m in r.take(p.Finished)}
    assert fins["b"].cached_tokens == full and fins["c"].cached_tokens == bs
    r.assert_clean()


def test_cancel_and_drop_all_with_shared_blocks_in_use_leave_nothing_held():
    r = _cached_rig("a", "b", "c")
    text = "x" * 40
    r.send(generate("a", text, max_tokens=2))
    r.run_until_idle()
    r.take(p.Finished)
    r.send(generate("b", text, max_tokens=50, ignore_eos=True), generate("c", text, max_tokens=50, ignore_eos=True))
    r.step()
    shared = r.sched.seqs["b"].blocks[0]
    assert r.alloc.refcount(shared) == 2 and shared in r.sched.seqs["c"].blocks
    r.send(p.CancelWork("b", 1))
    assert r.alloc.refcount(shared) == 1
    r.sched.drop_all()                      # what a reconnect (the broker lost us) does
    r.assert_clean()
    assert all(r.alloc.refcount(b) == 0 for b in range(r.alloc.num_blocks))


# ---------------------------------------------------------------------------------------------
# end to end, tiny model

def _shared_prefix_prompts():
    """Prompts sharing prefixes: mid-block ends, one a prefix of another, block-aligned ends,
    and a prompt whose later blocks equal another's but whose first differs."""
    rng = random.Random(7)
    base = [rng.randrange(256) for _ in range(90)]
    other = [rng.randrange(256) for _ in range(20)]
    return [base, base[:37], base[:32], base[:33], base + other, base[:50] + other, base,
            [base[0] ^ 1] + base[1:], base[:16], base[:17], other + base]


def _run(dep, prompts, **sampling):
    with Client(dep.frontend, timeout=60) as c:
        results = [c.generate(token_ids=ids, **sampling) for ids in prompts]
    return [r.token_ids for r in results], [r.usage["cached_tokens"] for r in results]


@pytest.mark.timeout(240)
def test_outputs_with_and_without_reuse_and_disagg_versus_agg_are_equal():
    prompts = _shared_prefix_prompts()
    with Deployment() as plain, Deployment() as agg, Deployment() as disagg:
        plain.add_worker("both", "plain", options={"kv_cache_config": {"enable_block_reuse": False}})
        agg.add_worker("both", "agg")
        disagg.add_worker("context", "ctx")
        disagg.add_worker("generation", "gen")
        for sampling in ({"max_tokens": 12, "ignore_eos": True},
                         {"max_tokens": 12, "ignore_eos": True, "temperature": 0.9, "seed": 5}):
            want, none_cached = _run(plain, prompts, **sampling)
            got_agg, cached_agg = _run(agg, prompts, **sampling)
            got_disagg, cached_disagg = _run(disagg, prompts, **sampling)
            assert got_agg == want and got_disagg == want
            assert set(none_cached) == {0} and cached_agg == cached_disagg
        # second pass: every prompt was seen, so each reuses all its full blocks but the last token's
        assert cached_agg == [(len(ids) - 1) // BS * BS for ids in prompts]
        for dep in (plain, agg, disagg):
            dep.wait_idle()
        s = disagg.stats()["counters"]
        assert s["prefill_cached_tokens"] >= sum(cached_disagg) > 0
        assert s["prefill_prompt_tokens"] == 2 * sum(len(ids) for ids in prompts)
