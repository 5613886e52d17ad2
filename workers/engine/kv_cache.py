"""The paged KV cache: one preallocated tensor of fixed-size blocks and the allocator that hands
them out. The allocator is plain Python (no torch) and never touches the tensor; the tensor is
never resized after construction, so its memory address is stable for transfer registration."""
from __future__ import annotations

import heapq
from typing import Iterable

import torch

from .config import ModelConfig


class OutOfBlocks(Exception):
    """Not enough free blocks for an allocation; nothing was allocated."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"out of KV blocks: needed {needed}, {free} free")
        self.needed = needed
        self.free = free


class BlockAllocator:
    """Reference-counted block ids 0..num_blocks-1.

    Free ids sit in a min-heap so that allocation returns the lowest free ids: a request's blocks
    then tend to be one contiguous run, and transfers merge contiguous runs into one copy.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: expected at least 1")
        self._num_blocks = num_blocks
        self._refcount = [0] * num_blocks
        self._free = list(range(num_blocks))   # already a valid heap

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1, lowest ids first; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(n, len(self._free))
        ids = [heapq.heappop(self._free) for _ in range(n)]
        for b in ids:
            self._refcount[b] = 1
        return ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share blocks that are already allocated (another holder of the same KV)."""
        block_ids = list(block_ids)
        for b in block_ids:   # check everything first so a bad id changes nothing
            self._check(b)
            if self._refcount[b] == 0:
                raise ValueError(f"incref of free block {b}")
        for b in block_ids:
            self._refcount[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block returns to the pool at zero."""
        block_ids = list(block_ids)
        drops: dict[int, int] = {}
        for b in block_ids:
            self._check(b)
            drops[b] = drops.get(b, 0) + 1
            if drops[b] > self._refcount[b]:
                raise ValueError(f"double free of block {b} (refcount {self._refcount[b]})")
        for b in block_ids:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                heapq.heappush(self._free, b)

    def refcount(self, block_id: int) -> int:
        self._check(block_id)
        return self._refcount[block_id]

    def _check(self, b: int) -> None:
        if not isinstance(b, int) or not 0 <= b < self._num_blocks:
            raise ValueError(f"block id {b!r} out of range [0, {self._num_blocks})")


class KVCache:
    """The block pool ``[num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``.

    Block-major: one block holds a run of ``block_size`` positions for every layer, and is one
    contiguous byte range of ``block_nbytes``; the transfer package moves blocks as byte ranges.
    Position ``p`` of a request lives in block ``block_table[p // block_size]``, slot
    ``p % block_size``.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: expected at least 1")
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.allocator = BlockAllocator(num_blocks)
        self.pool = torch.zeros(num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads,
                                cfg.head_dim, dtype=dtype)
        self.block_nbytes = self.pool[0].numel() * self.pool.element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @classmethod
    def from_budget(cls, cfg: ModelConfig, block_size: int, max_bytes: int,
                    dtype: torch.dtype = torch.float32) -> "KVCache":
        """As many blocks as fit in ``max_bytes``."""
        block_nbytes = cfg.kv_bytes_per_token(dtype) * block_size
        num_blocks = max_bytes // block_nbytes
        if num_blocks < 1:
            raise ValueError(f"KV budget of {max_bytes} bytes holds no block of {block_size} tokens "
                             f"({block_nbytes} bytes each for {cfg.name})")
        return cls(cfg, num_blocks, block_size, dtype)
