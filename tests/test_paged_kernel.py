"""The CPU paged decode kernel (workers/engine/paged_kernel.py, paged_attention.cpp): attention read
straight from the block pool equals SDPA over the gathered history, in every pool dtype, with
grouped heads, ragged lengths and scattered blocks; rows do not depend on their batch or on how
threads split it; and where it cannot be built the runner says so and keeps the copy path."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from workers.engine import paged_kernel
from workers.engine.config import ModelConfig
from workers.engine.kv_cache import KVCache
from workers.engine.tiny import tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..")


def kernel():
    fn = paged_kernel.kernel()
    assert fn is not None, "the paged decode kernel did not build (see the log for why)"
    return fn


def case(dtype, heads=9, kv_heads=3, head_dim=64, block_size=16, lengths=(1, 16, 17, 130, 64, 5),
         seed=0):
    """A pool with random K/V in scattered blocks, queries, tables and lengths."""
    cfg: ModelConfig = tiny_config(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                   hidden_size=heads * head_dim)
    need = [-(-n // block_size) for n in lengths]
    kv = KVCache(cfg, sum(need) + 3, block_size, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    kv.pool.copy_(torch.randn(kv.pool.shape, generator=g).to(dtype))
    order = torch.randperm(kv.num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at:at + n])
        at += n
    width = max(need)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    q = torch.randn(len(lengths), heads, head_dim, generator=g)
    return kv, q, padded, list(lengths)


def reference(kv, q, tables, lengths, layer):
    """SDPA over each sequence's gathered history, in float32."""
    k_pool, v_pool = kv.pool[:, layer, 0].float(), kv.pool[:, layer, 1].float()
    kv_heads = k_pool.shape[2]
    out = []
    for i, n in enumerate(lengths):
        keys = k_pool[tables[i]].reshape(-1, kv_heads, k_pool.shape[3])[:n].transpose(0, 1)
        values = v_pool[tables[i]].reshape(-1, kv_heads, v_pool.shape[3])[:n].transpose(0, 1)
        grouped = q[i].reshape(kv_heads, -1, q.shape[2])
        out.append(F.scaled_dot_product_attention(grouped, keys, values).reshape(q.shape[1], -1))
    return torch.stack(out)


def attend(kv, q, tables, lengths, layer):
    return paged_kernel.decode_attention(kernel(), q, kv.pool[:, layer, 0], kv.pool[:, layer, 1],
                                         tables, torch.tensor(lengths, dtype=torch.long), lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [dict(), dict(heads=4, kv_heads=4, head_dim=16, block_size=5),
                                   dict(heads=8, kv_heads=1, head_dim=128, block_size=3)])
def test_kernel_equals_sdpa_over_the_gathered_history(dtype, shape):
    kv, q, tables, lengths = case(dtype, **shape)
    for layer in (0, 1):
        got = attend(kv, q, tables, lengths, layer)
        assert got.shape == q.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, reference(kv, q, tables, lengths, layer), atol=2e-5, rtol=1e-4)


def test_a_row_is_bit_identical_alone_in_any_batch_and_across_thread_splits(monkeypatch):
    kv, q, tables, lengths = case(torch.float32, lengths=(40, 300, 7, 129, 16, 250, 1, 90))
    whole = attend(kv, q, tables, lengths, 1)
    for i in range(len(lengths)):
        alone = attend(kv, q[i:i + 1], tables[i:i + 1], lengths[i:i + 1], 1)
        assert torch.equal(alone[0], whole[i])
    # the same batch split across 2 threads (every step large enough to split)
    monkeypatch.setattr(paged_kernel, "PARALLEL_POSITIONS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(attend(kv, q, tables, lengths, 1), whole)
    finally:
        torch.set_num_threads(threads)


def test_pool_views_of_another_layout_are_refused():
    kv, q, tables, lengths = case(torch.float32)
    with pytest.raises(ValueError, match="must be contiguous"):
        paged_kernel.decode_attention(kernel(), q, kv.pool[:, 0, 0].transpose(1, 2),
                                      kv.pool[:, 0, 1].transpose(1, 2), tables,
                                      torch.tensor(lengths), lengths)


def test_tables_the_kernel_would_read_outside_the_pool_with_are_refused():
    kv, q, tables, lengths = case(torch.float32)
    paged_kernel.check_tables(tables, lengths, kv.num_blocks, kv.block_size)
    bad = tables.clone()
    bad[2, 0] = kv.num_blocks
    with pytest.raises(ValueError, match="outside the pool"):
        paged_kernel.check_tables(bad, lengths, kv.num_blocks, kv.block_size)
    bad[2, 0] = -1
    with pytest.raises(ValueError, match="outside the pool"):
        paged_kernel.check_tables(bad, lengths, kv.num_blocks, kv.block_size)
    with pytest.raises(ValueError, match="lengths"):
        paged_kernel.check_tables(tables, [*lengths[:-1], tables.shape[1] * kv.block_size + 1],
                                  kv.num_blocks, kv.block_size)


PROBE = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from workers.engine import paged_kernel
from workers.engine.kv_cache import KVCache
from workers.engine.runner import ModelRunner
from workers.engine.tiny import tiny_model
model, _ = tiny_model()
r = ModelRunner(model, KVCache(model.cfg, 8, 4))
r.prefill([5, 6, 7], [2, 0])
print("kernel", r._kernel is not None, "logits", tuple(r.decode([8], [3], [[2, 0]]).shape))
"""


def probe(tmp_path, **env):
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DSRV_KERNEL_CACHE": str(tmp_path), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_without_a_compiler_or_when_off_the_runner_says_why_and_keeps_the_copy_path(tmp_path):
    out, err = probe(tmp_path / "a", CXX="/bin/false")
    assert "kernel False logits (1, 258)" in out
    assert "paged decode kernel unavailable (/bin/false failed" in err
    out, err = probe(tmp_path / "b", DSRV_PAGED_KERNEL="0")
    assert "kernel False logits (1, 258)" in out and "DSRV_PAGED_KERNEL=0" in err
    assert not (tmp_path / "b").exists()       # nothing built when off


def test_workers_building_at_once_each_load_a_whole_kernel(tmp_path):
    """Processes starting together on an empty cache each build into a file of their own and
    rename it into place: all load it, and one file is left."""
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DSRV_KERNEL_CACHE": str(tmp_path)})
             for _ in range(3)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [e[-1000:] for _, e in outs]
    assert all("kernel True logits (1, 258)" in o for o, _ in outs)
    assert [f.name for f in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]
    assert next(tmp_path.iterdir()).name.startswith("paged_attention-")
