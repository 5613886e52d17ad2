"""The shape of a Llama-family model: everything the engine needs to know to build the model,
size the KV cache and stop generation. Loaders fill it in; nothing here reads files."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Per-frequency divisors of the base inverse frequencies (workers/engine/rope.py): linear or
    # Llama 3 RoPE scaling, or a GGUF's rope_freqs. Empty: plain RoPE.
    rope_freq_divisors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model {self.name}: head_dim={self.head_dim} must be even for RoPE")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        divisors = tuple(float(d) for d in self.rope_freq_divisors)
        if divisors and len(divisors) != self.head_dim // 2:
            raise ValueError(f"model {self.name}: {len(divisors)} rope_freq_divisors for head_dim="
                             f"{self.head_dim}: expected {self.head_dim // 2}")
        if not all(d > 0 and math.isfinite(d) for d in divisors):
            raise ValueError(f"model {self.name}: rope_freq_divisors {divisors} must be finite "
                             "and positive")
        object.__setattr__(self, "rope_freq_divisors", divisors)

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """K and V, every layer, one token: what a token costs in the cache and on the wire."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
