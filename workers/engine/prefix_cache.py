"""Prefix caching (TensorRT-LLM's ``kv_cache_config.enable_block_reuse``): full KV blocks of a
prompt stay findable by the hash of their tokens, so a later prompt with the same prefix reuses
them and prefills only the rest.

A block's hash chains its token ids to the previous block's hash (blake2b, 128 bits: the same
in every process, so the hashes can be published as KV events), so a block matches only after
the same whole prefix. Matched blocks are shared by reference count; a block whose last holder
lets go stays cached, evictable, until an allocation needs it (least recently used first).
Cached blocks are full and the prompt's own positions never come back to them: nobody writes a
block while another request reads it. Plain Python, no torch, like ``block_allocator.py``.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence

from .block_allocator import BlockAllocator, OutOfBlocks


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """The chained hashes of the first ``num_blocks`` full blocks of ``token_ids``."""
    hashes, parent = [], b""
    for i in range(num_blocks):
        chunk = array("I", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class CachingAllocator(BlockAllocator):
    """A ``BlockAllocator`` whose released full prompt blocks stay reusable until evicted.

    ``num_free`` counts cached blocks nobody holds: they are handed out (evicted) when the free
    list runs dry, so admission sees the same capacity as without caching."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks)
        self.block_size = block_size
        self._block_of: dict[bytes, int] = {}       # hash -> cached block
        self._hash_of: dict[int, bytes] = {}        # cached block -> hash
        self._idle: OrderedDict[int, None] = OrderedDict()   # cached, held by nobody: LRU first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocks(n, self.num_free)
        fresh = min(n, len(self._free))
        ids = super().allocate(fresh)
        for _ in range(n - fresh):                  # then the least recently used cached blocks
            b, _ = self._idle.popitem(last=False)
            del self._block_of[self._hash_of.pop(b)]
            self._refcount[b] = 1
            self.evictions += 1
            ids.append(b)
        return ids

    def _released(self, b: int) -> None:
        if b in self._hash_of:
            self._idle[b] = None                    # most recently used end
        else:
            super()._released(b)

    def lookup(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The cached blocks holding the longest run of full blocks of ``token_ids`` within its
        first ``max_tokens`` tokens. Takes nothing: ``acquire`` does."""
        found = []
        for h in block_hashes(token_ids, self.block_size, max_tokens // self.block_size):
            b = self._block_of.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def idle_among(self, block_ids: Sequence[int]) -> int:
        """How many of these cached blocks nobody holds (taking them shrinks ``num_free``)."""
        return sum(1 for b in block_ids if b in self._idle)

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Hold cached blocks found by ``lookup`` (one more reference each)."""
        for b in block_ids:
            if b not in self._hash_of:
                raise ValueError(f"block {b} is not cached")
        for b in block_ids:
            self._idle.pop(b, None)
            self._refcount[b] += 1

    def store(self, block_ids: Sequence[int], token_ids: Sequence[int]) -> int:
        """Make the full blocks of ``token_ids`` (whose KV is now in ``block_ids``) findable;
        returns how many became cached. A prefix already cached in other blocks keeps those."""
        added = 0
        for b, h in zip(block_ids, block_hashes(token_ids, self.block_size,
                                                len(token_ids) // self.block_size)):
            if h in self._block_of or b in self._hash_of:
                continue
            self._check(b)
            self._block_of[h], self._hash_of[b] = b, h
            added += 1
        return added
