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
    step = paged_kernel.Step(tables, lengths, kv.num_blocks, kv.block_size)
    return paged_kernel.decode_attention(kernel(), q, kv.pool[:, layer, 0], kv.pool[:, layer, 1], step)


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


def test_what_the_kernel_would_read_wrongly_is_refused():
    """It reads raw memory: tables outside the pool, lengths past a row's blocks, queries or pools
    that do not fit the step, and pool views of another layout are ValueErrors, never reads."""
    kv, q, tables, lengths = case(torch.float32)
    n, bs = kv.num_blocks, kv.block_size
    step = paged_kernel.Step(tables, lengths, n, bs)
    for bad_id in (n, -1):
        bad = tables.clone()
        bad[2, 0] = bad_id
        with pytest.raises(ValueError, match="outside the pool"):
            paged_kernel.Step(bad, lengths, n, bs)
    with pytest.raises(ValueError, match="lengths"):
        paged_kernel.Step(tables, [*lengths[:-1], tables.shape[1] * bs + 1], n, bs)
    with pytest.raises(ValueError, match="expected int64"):
        paged_kernel.Step(tables.int(), lengths, n, bs)
    k, v = kv.pool[:, 0, 0], kv.pool[:, 0, 1]
    with pytest.raises(ValueError, match="do not fit"):             # one query short of the tables
        paged_kernel.decode_attention(kernel(), q[:-1], k, v, step)
    with pytest.raises(ValueError, match="do not fit"):             # a pool the step was not checked for
        paged_kernel.decode_attention(kernel(), q, k[:-1], v[:-1], step)
    with pytest.raises(ValueError, match="do not fit"):
        paged_kernel.decode_attention(kernel(), q, k, v.to(torch.bfloat16), step)
    nb, _, kvh, dim = k.shape
    other = torch.zeros(nb, kvh, bs, dim).transpose(1, 2)         # the same shape, heads-major blocks
    with pytest.raises(ValueError, match="must be contiguous"):
        paged_kernel.decode_attention(kernel(), q, other, other, step)


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


def test_a_cached_kernel_that_does_not_load_is_built_anew(tmp_path):
    out, _ = probe(tmp_path)
    assert "kernel True" in out
    (built,) = tmp_path.iterdir()
    assert built.stat().st_mode & 0o777 == 0o755       # loadable by every user of a shared cache
    built.write_bytes(b"not a shared object")
    out, err = probe(tmp_path)
    assert "kernel True logits (1, 258)" in out, err
    assert built.read_bytes()[:4] == b"\x7fELF"
