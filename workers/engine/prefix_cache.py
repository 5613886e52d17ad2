"""Prefix caching (TensorRT-LLM's ``kv_cache_config.enable_block_reuse``): full KV blocks of a
prompt stay findable by the hash of their tokens, so a later prompt with the same prefix reuses
them and prefills only the rest.

A block's hash chains its token ids to the previous block's hash (blake2b, 128 bits, defined
in ``broker/kv_keys.py``: the same in every process, and the keys the broker routes on), so a
block matches only after the same whole prefix. Matched blocks are shared by reference count; a
block whose last holder lets go stays cached, evictable, until an allocation needs it (least
recently used first; a prompt's blocks are let go last block first, so its tail is evicted
before its head, which later prompts share more often). Cached blocks are full and the prompt's
own positions never come back to them: nobody writes a block while another request reads it.

KV events: every key that becomes findable or stops being so (a block stored, a block evicted)
is recorded until ``take_events``, which the worker sends to the broker (``protocol.KvEvents``).
A text prompt's text keys (``broker/kv_keys.py``) are tied to the block their text ends in
(``tie``) and published and withdrawn with it. Plain Python, no torch, like ``block_allocator.py``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from broker.kv_keys import block_hashes  # noqa: F401  (re-exported: the cache's block hashes)

from .block_allocator import BlockAllocator, OutOfBlocks


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
        self._tied: dict[int, list] = {}            # cached block -> the text keys tied to it
        self._text: set = set()                     # every tied text key
        self._events: dict[bytes, bool] = {}        # key -> findable now, since take_events
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
            h = self._hash_of.pop(b)
            del self._block_of[h]
            self._events[h] = False
            for key in self._tied.pop(b, ()):
                self._text.discard(key)
                self._events[key] = False
            self._refcount[b] = 1
            self.evictions += 1
            ids.append(b)
        return ids

    def free(self, block_ids: Iterable[int]) -> None:
        # last block first: the tail of a prompt is evicted before its head (module docstring)
        super().free(list(block_ids)[::-1])

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
            self._events[h] = True
            added += 1
        return added

    def tie(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> None:
        """Publish text keys, each with the cached block its text ends in (``kv_keys.text_ties``);
        a key already tied stays with its block."""
        for key, b in zip(keys, block_ids):
            if key in self._text or b not in self._hash_of:
                continue
            self._text.add(key)
            self._tied.setdefault(b, []).append(key)
            self._events[key] = True

    def take_events(self) -> tuple[list, list]:
        """(keys now findable, keys no longer findable) since the last call."""
        ev, self._events = self._events, {}
        return [k for k, v in ev.items() if v], [k for k, v in ev.items() if not v]

    def keys(self) -> list:
        """Every key findable now (a full resync for a broker that forgot this worker)."""
        self._events = {}
        return [*self._block_of, *self._text]
