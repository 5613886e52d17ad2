"""Paged decode attention on the CPU that reads each sequence's K/V once, straight from the block
pool (``paged_attention.cpp``): no per-step copy of anyone's history.

torch has no attention over a block table: the copy path (runner.py) gathers each sequence's
blocks into a contiguous tensor per layer and step, then SDPA reads that copy again. This kernel
walks the block table itself, one sequence at a time and all its heads at once (a position's
K row of every KV head is contiguous in a block), with an online softmax per block, in float32
whatever the pool stores (float32, bfloat16 or float16). Each row depends on its own sequence
only, so a row's result is the same in any batch. Measured against the copy path, attention of
all 30 SmolLM2 layers, 1 thread (``python -m bench.engine_attention``, README): 1.4x at batch 1,
1.5-1.6x at batch 16-64 on float32 pools, 2x on bfloat16 ones.

It is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``;
``-O3 -march=native``) into ``$DSRV_KERNEL_CACHE`` (default ``~/.cache/dsrv/kernels``), keyed by
the source, the flags, the compiler and the CPU, and loaded with ctypes. With more than one torch
thread, large steps split their sequences across torch's own OpenMP threads: the kernel's
libgomp.so.1 is the one torch loaded (a second thread pool measured slower than one thread, its
threads and torch's spinning for the same cores). Where it cannot be built (no compiler,
another architecture) the runner keeps the copy path and says so once; ``DSRV_PAGED_KERNEL=0``
turns it off.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BUILD_TIMEOUT_S = 300
# Positions a step attends to in all, above which its sequences are split across torch's
# threads (below it waking them costs more than it saves).
PARALLEL_POSITIONS = 2048

_lock = threading.Lock()
_loaded: list = []        # [] not tried yet; [None] unavailable; [the C function]


def cache_dir() -> Path:
    return Path(os.environ.get("DSRV_KERNEL_CACHE") or "~/.cache/dsrv/kernels").expanduser()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def build(rebuild: bool = False) -> Path:
    """The compiled kernel's path, compiling it first where the cache lacks it (or ``rebuild``).
    Concurrent builders (workers starting together) each write a file of their own and rename it
    into place, so none ever loads a half-written one. Raises RuntimeError saying why it failed."""
    cxx = shlex.split(os.environ.get("CXX", "")) or [shutil.which("c++") or shutil.which("g++") or ""]
    if not cxx[0]:
        raise RuntimeError("no C++ compiler ($CXX, c++ or g++) on PATH")
    try:
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{' '.join(cxx)} --version failed: {e}") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"paged_attention-{key}.so"
    if out.exists() and not rebuild:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob("paged_attention-*.so.*"):    # left by a builder killed mid-way
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cxx)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        os.chmod(tmp, 0o755)      # mkstemp made it 0600: a shared cache serves every user
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cxx)} took over {BUILD_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> Callable:
    fn = ctypes.CDLL(str(path)).dsrv_paged_decode
    p, i = ctypes.c_void_p, ctypes.c_int64
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, p, p, p, p, i, p, i, p, i, i, i, i, i, ctypes.c_float, ctypes.c_int]
    return fn


def kernel() -> Optional[Callable]:
    """The loaded C function, or None (logged once, with the reason) where it is turned off or
    cannot be built."""
    with _lock:
        if not _loaded:
            fn = None
            if os.environ.get("DSRV_PAGED_KERNEL", "1") == "0":
                log.info("paged decode kernel off (DSRV_PAGED_KERNEL=0): decode copies each "
                         "sequence's history per layer")
            else:
                try:
                    try:
                        fn = _load(build())
                    except OSError:       # a cached file this process cannot load: build it anew
                        fn = _load(build(rebuild=True))
                except (RuntimeError, OSError, AttributeError) as e:
                    log.warning("paged decode kernel unavailable (%s): decode copies each "
                                "sequence's history per layer instead", e)
            _loaded.append(fn)
        return _loaded[0]


class Step:
    """One decode step's block tables [B, n] (int64) and lengths, checked once per step (not per
    layer), because the kernel reads raw memory: every block id a pool block of ``num_blocks``,
    every length within its row's blocks of ``block_size``. A ValueError says what is wrong."""

    def __init__(self, tables: torch.Tensor, lengths: list[int], num_blocks: int, block_size: int) -> None:
        if tables.dtype != torch.long or tables.dim() != 2 or tables.shape[0] != len(lengths) or not lengths:
            raise ValueError(f"block tables {tuple(tables.shape)} {tables.dtype}: expected int64 "
                             f"[{len(lengths)}, n] with n > 0")
        if not 0 <= int(tables.min()) <= int(tables.max()) < num_blocks:
            raise ValueError(f"block tables hold ids outside the pool's 0..{num_blocks - 1}")
        if not 0 < min(lengths) <= max(lengths) <= tables.shape[1] * block_size:
            raise ValueError(f"lengths {min(lengths)}..{max(lengths)}: expected 1..{tables.shape[1] * block_size}")
        self.tables = tables.contiguous()
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.threads = torch.get_num_threads() if sum(lengths) >= PARALLEL_POSITIONS else 1


def decode_attention(fn: Callable, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     step: Step) -> torch.Tensor:
    """Attention of one decode step's queries ``q`` [B, heads, head_dim] over a layer's pool
    views ``k_pool``/``v_pool`` [num_blocks, block_size, kv_heads, head_dim] (each block's slice
    contiguous) through ``step``'s tables to its lengths. Returns [B, heads, head_dim] in q's
    dtype. Whatever does not fit what ``step`` checked is a ValueError, never a stray read."""
    b, heads, dim = q.shape
    nb, bs, kv_heads, pool_dim = k_pool.shape
    if (b, nb, bs, dim) != (step.tables.shape[0], step.num_blocks, step.block_size, pool_dim) \
            or heads % kv_heads or v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype \
            or k_pool.dtype not in KINDS:
        raise ValueError(f"queries {tuple(q.shape)}, pools {tuple(k_pool.shape)} {k_pool.dtype} / "
                         f"{tuple(v_pool.shape)} {v_pool.dtype}: do not fit the step's "
                         f"{tuple(step.tables.shape)} tables of a {step.num_blocks}-block pool")
    if k_pool.stride()[1:] != (kv_heads * dim, dim, 1) or v_pool.stride() != k_pool.stride():
        raise ValueError(f"pool views of strides {tuple(k_pool.stride())} / {tuple(v_pool.stride())}: "
                         "each block's [block_size, kv_heads, head_dim] must be contiguous")
    qf = q.float().contiguous()
    out = torch.empty_like(qf)
    if fn(KINDS[k_pool.dtype], out.data_ptr(), qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
          k_pool.stride(0), step.tables.data_ptr(), step.tables.shape[1], step.lengths.data_ptr(), b,
          kv_heads, heads // kv_heads, dim, bs, dim ** -0.5, step.threads):
        raise ValueError(f"paged decode kernel: pool dtype {k_pool.dtype} not supported")
    return out if q.dtype == torch.float32 else out.to(q.dtype)
