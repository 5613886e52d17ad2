"""The KV block allocator: reference-counted block ids, lowest free ids first.

Plain Python with no torch import, so the worker's scheduler (``workers/scheduler.py``) and its
unit tests use it without the engine. It never touches the KV tensor (``kv_cache.py`` owns that).
"""
from __future__ import annotations

import heapq
from typing import Iterable


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
                self._released(b)

    def _released(self, b: int) -> None:
        """Block ``b`` has no holder left (the prefix cache keeps hashed ones for reuse)."""
        heapq.heappush(self._free, b)

    def refcount(self, block_id: int) -> int:
        self._check(block_id)
        return self._refcount[block_id]

    def _check(self, b: int) -> None:
        if not isinstance(b, int) or not 0 <= b < self._num_blocks:
            raise ValueError(f"block id {b!r} out of range [0, {self._num_blocks})")
