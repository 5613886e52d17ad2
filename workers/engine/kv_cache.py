"""The paged KV cache: one preallocated tensor of fixed-size blocks and the allocator that hands
them out. The allocator (``block_allocator.py``, plain Python) never touches the tensor; the
tensor is never resized after construction, so its memory address is stable for transfer
registration."""
from __future__ import annotations

from typing import Optional

import torch

from .block_allocator import BlockAllocator, OutOfBlocks  # re-exported: the allocator's old home
from .prefix_cache import CachingAllocator
from .config import ModelConfig

__all__ = ["BlockAllocator", "KVCache", "OutOfBlocks", "pool_blocks"]

DEFAULT_MAX_TOKENS = 16384


def pool_blocks(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: str,
                max_tokens: Optional[int], gpu_fraction: Optional[float]) -> int:
    """How many blocks the pool gets. On a GPU with ``gpu_fraction`` (TensorRT-LLM's
    ``free_gpu_memory_fraction``): that fraction of the memory free now, after the model loaded,
    capped by ``max_tokens`` where given; otherwise ``max_tokens`` (default 16384) tokens."""
    if gpu_fraction is not None and str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        blocks = int(free * gpu_fraction) // (cfg.kv_bytes_per_token(dtype) * block_size)
        if max_tokens is not None:
            blocks = min(blocks, max_tokens // block_size)
        if blocks < 1:
            raise ValueError(f"kv_cache_config.free_gpu_memory_fraction={gpu_fraction} of the "
                             f"{free} bytes free on {device} holds no KV block of {block_size} tokens")
        return blocks
    return max(1, (max_tokens or DEFAULT_MAX_TOKENS) // block_size)


class KVCache:
    """The block pool ``[num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``.

    Block-major: one block holds a run of ``block_size`` positions for every layer, and is one
    contiguous byte range of ``block_nbytes``; the transfer package moves blocks as byte ranges.
    Position ``p`` of a request lives in block ``block_table[p // block_size]``, slot
    ``p % block_size``.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 block_reuse: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: expected at least 1")
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        # block_reuse: prompts with a cached prefix skip its prefill (prefix_cache.py)
        self.allocator = (CachingAllocator(num_blocks, block_size) if block_reuse
                          else BlockAllocator(num_blocks))
        self.pool = torch.zeros(num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads,
                                cfg.head_dim, dtype=dtype, device=device)
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
