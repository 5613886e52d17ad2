"""The Llama-family decoder (Llama, SmolLM, Qwen2) in plain torch.

Owns the math of one forward pass: embeddings, RMSNorm, rotary position embeddings (HF layout:
the two halves of each head rotate together), grouped-query attention projections, the SwiGLU
MLP and the LM head (tied to the embeddings where the model says so). It never owns the KV
cache: each layer hands its q, k, v to an ``attend`` callback supplied by the caller (the runner
writes the paged cache there and reads it back). Parameter names follow HF checkpoints without
the ``model.`` prefix, so an HF state dict loads with a prefix strip.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import inverse_frequencies

# True while torch.compile traces (compiled.py); torch before 2.3 has no compiler.is_compiling.
compiling = getattr(torch.compiler, "is_compiling", lambda: False)

# attend(layer, q [T, heads, head_dim], k [T, kv_heads, head_dim], v) -> [T, heads * head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (x * rsqrt(mean(x^2) + eps) * weight): decode is op-overhead bound.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to ``max_position``, computed once; ``freq_divisors``
    carry the model's RoPE scaling (``ModelConfig.rope_freq_divisors``)."""

    def __init__(self, head_dim: int, theta: float, max_position: int,
                 freq_divisors: tuple[float, ...] = ()) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, freq_divisors)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        # Not in the state dict: they follow from the config, and checkpoints do not carry them.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        # sin with its first half negated: rotating half the head is then one roll (apply_rope)
        sin = angles.sin().float()
        sin[:, : head_dim // 2].neg_()
        self.register_buffer("sin", sin, persistent=False)

    def check(self, positions: torch.Tensor) -> None:
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the model's "
                             f"max_position {self.cos.shape[0]}")

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not compiling():   # compiled, the caller checks (compiled.py)
            self.check(positions)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1]: rolled, [x2, x1] times
    the half-negated sin table gives it in three ops instead of seven (decode is op-bound)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def _fused(*parts: nn.Linear) -> nn.Linear:
    """One linear layer whose output is the concatenation of ``parts``' outputs."""
    concat = getattr(parts[0], "concat", None)
    if concat is not None:      # weights kept as loaded (Q8_0 blocks, q8.py) fuse themselves
        return concat(parts)
    weight = torch.cat([p.weight for p in parts])
    biases = [p.bias for p in parts]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None,
                      device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=cfg.qkv_bias, device=device)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias, device=device)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias, device=device)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False, device=device)

        self.qkv_proj: nn.Module | None = None     # set by fuse()

    def fuse(self) -> None:
        """One [q; k; v] projection instead of three: one matmul reads the input once (and,
        quantized, quantizes it once). The separate projections are dropped."""
        self.qkv_proj = _fused(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        t, heads, kv_heads, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:   # rotate q and k heads together: one rope, not two
            qkv = self.qkv_proj(x)
            qk = apply_rope(qkv[:, : (heads + kv_heads) * hd].reshape(t, heads + kv_heads, hd), cos, sin)
            q, k = qk.split((heads, kv_heads), dim=1)
            v = qkv[:, (heads + kv_heads) * hd:].reshape(t, kv_heads, hd)
        else:
            q = apply_rope(self.q_proj(x).reshape(t, heads, hd), cos, sin)
            k = apply_rope(self.k_proj(x).reshape(t, kv_heads, hd), cos, sin)
            v = self.v_proj(x).reshape(t, kv_heads, hd)
        return self.o_proj(attend(layer, q, k, v))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, device=device)
        self.gate_up_proj: nn.Module | None = None   # set by fuse()

    def fuse(self) -> None:
        """One [gate; up] projection instead of two (see ``Attention.fuse``)."""
        self.gate_up_proj = _fused(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device)
        self.self_attn = Attention(cfg, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device)
        self.mlp = MLP(cfg, device)

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        x = x + self.self_attn(layer, self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None) -> None:
        """``device="meta"`` builds the structure only, for loaders that assign real weights."""
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, device)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                                 bias=False, device=device)
        # Always real: computed from the config, never loaded.
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position,
                                      cfg.rope_freq_divisors)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> "LlamaModel":
        """The model with exactly these weights (names as in ``state_dict()``), built without
        random initialization, which takes seconds and is thrown away."""
        model = cls(cfg, device="meta")
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"weights do not match model {cfg.name} ({cfg.num_layers} layers): "
                             f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        return model.eval().requires_grad_(False)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        """Final hidden states [T, hidden] for T tokens at ``positions`` (any mix of sequences:
        ``attend`` knows which token belongs to which)."""
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(token_ids)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, cos, sin, attend)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:   # tied: the embedding matrix is the head
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention over one sequence held in memory: the reference the paged runner
    must agree with, and enough to run the model without a cache."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(0, 1).reshape(q.shape[0], -1)
