"""The tiny test model: a seeded random Llama over the byte tokenizer, no files needed.

Its weights come from one CPU generator in parameter order, so the same seed gives bit-identical
weights in every process: tests compare disaggregated and aggregated output token for token.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .model import LlamaModel
from .tokenizer import ByteTokenizer


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(name="tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                  num_kv_heads=2, head_dim=16, vocab_size=258, rope_theta=10000.0, rms_eps=1e-5,
                  max_position=4096, tie_embeddings=False, qkv_bias=False,
                  bos_token_id=ByteTokenizer.BOS, eos_token_ids=(ByteTokenizer.EOS,))
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def random_model(cfg: ModelConfig, seed: int = 0) -> LlamaModel:
    """A model of ``cfg`` with deterministic random weights scaled to keep activations O(1), so
    that logits are spread out and argmax is not decided by rounding."""
    model = LlamaModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("layernorm.weight") or name == "norm.weight":
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif name == "embed_tokens.weight":
            p.copy_(noise)
        else:   # a linear layer's weight [out, in]
            p.copy_(noise / math.sqrt(p.shape[1]))
    return model.eval().requires_grad_(False)


def tiny_model(seed: int = 0) -> tuple[LlamaModel, ByteTokenizer]:
    return random_model(tiny_config(), seed), ByteTokenizer()
