"""Activation smoothing before int8 quantization (the SmoothQuant method): moves the scale of
outlier activation channels into the weights, so quantizing each activation row to 8 bits loses
less, without changing the float model's function.

A few input channels of a transformer's linear layers carry activations tens of times larger
than the rest; quantizing a row on a grid set by its largest value then leaves the others a few
levels. For input channel j of a linear layer, ``s_j = amax(|x_j|)^alpha / amax(|W[:, j]|)^(1 -
alpha)``: the activation is divided by ``s_j`` and the weight column multiplied by it. The
division is folded into whatever produces the activation, so it costs nothing at run time:

* q/k/v and gate/up inputs: the preceding RMSNorm's weight;
* down_proj input (``silu(gate) * up``): the rows of up_proj;
* o_proj input (attention output): the rows of v_proj (attention is linear in V), with one factor
  per KV channel shared by the query heads of its group.

The activation maxima come from one float32 forward over a short built-in calibration text
(``CALIBRATION_TEXT``). The LM head is not smoothed: measured, it lost quality.
"""
from __future__ import annotations

import torch

from .model import LlamaModel, causal_attention

# Measured on SmolLM2-135M: 0.5 to 0.7 gave int8 perplexity within 3-4 % of float32 where no
# smoothing gave 5 %; 0.85 was worse than none.
ALPHA = 0.5
CALIBRATION_TOKENS = 256

# Our own text, a mix of registers (prose, dialogue, instructions, code, numbers), so that the
# maxima are not those of one kind of text.
CALIBRATION_TEXT = """\
The river had been rising since Tuesday, and by the time the ferry stopped running the whole
village knew the bridge would not hold. Anna packed the photographs first, then the bread.
"Are we leaving tonight?" her brother asked. "Only if the water reaches the mill," she said.

How to repot a plant: water it the day before, loosen the roots gently, choose a pot two
centimetres wider than the old one, and keep it out of direct sun for a week.

def mean(values):
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)

In 2023 the city's population was 1,284,500, up 2.7% from 2019; average rent rose from 940 to
1,180 euros a month. Q: What is 17 times 23? A: 391. The committee meets on the first Monday of
each month at 10:30. Photosynthesis converts light, water and carbon dioxide into glucose and
oxygen; the reaction takes place in the chloroplasts of plant cells.
"""


@torch.inference_mode()
def activation_peaks(model: LlamaModel, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| entering each linear layer over one forward
    of ``token_ids`` (the unfused float model)."""
    peaks: dict[str, torch.Tensor] = {}

    def watch(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x
        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        for name, module in ((f"{i}.qkv", layer.self_attn.q_proj), (f"{i}.o", layer.self_attn.o_proj),
                             (f"{i}.gate_up", layer.mlp.gate_proj), (f"{i}.down", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(watch(name)))
    try:
        ids = torch.tensor(token_ids, dtype=torch.long)
        model(ids, torch.arange(len(ids)), lambda layer, q, k, v: causal_attention(q, k, v))
    finally:
        for h in handles:
            h.remove()
    return peaks


def _factors(act: torch.Tensor, *weights: torch.Tensor, alpha: float) -> torch.Tensor:
    w = torch.stack([x.abs().amax(0) for x in weights]).amax(0).clamp_min(1e-5)
    return act.clamp_min(1e-5).pow(alpha) / w.pow(1 - alpha)


@torch.inference_mode()
def smooth(model: LlamaModel, token_ids: list[int], alpha: float = ALPHA) -> None:
    """Rescale ``model`` (unfused, float32) in place; its float outputs stay the same up to
    rounding."""
    peaks = activation_peaks(model, token_ids)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        s = _factors(peaks[f"{i}.qkv"], *qkv, alpha=alpha)
        layer.input_layernorm.weight.div_(s)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            _scale(proj, mul_cols=s)
        s = _factors(peaks[f"{i}.gate_up"], mlp.gate_proj.weight, mlp.up_proj.weight, alpha=alpha)
        layer.post_attention_layernorm.weight.div_(s)
        _scale(mlp.gate_proj, mul_cols=s)
        _scale(mlp.up_proj, mul_cols=s)
        s = _factors(peaks[f"{i}.down"], mlp.down_proj.weight, alpha=alpha)
        _scale(mlp.up_proj, div_rows=s)
        _scale(mlp.down_proj, mul_cols=s)
        # o_proj input channel (head h, d) comes from V channel (kv head of h, d): one factor
        # per KV channel, the largest its query heads want.
        group = attn.num_heads // attn.num_kv_heads
        s = _factors(peaks[f"{i}.o"], attn.o_proj.weight, alpha=alpha)
        s = s.view(attn.num_kv_heads, group, attn.head_dim).amax(1)
        _scale(attn.v_proj, div_rows=s.reshape(-1))
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.div_(s.reshape(-1))
        _scale(attn.o_proj, mul_cols=s.unsqueeze(1).expand(-1, group, -1).reshape(-1))


def _scale(linear, mul_cols=None, div_rows=None) -> None:
    """``linear``'s weight columns times ``mul_cols``, its rows over ``div_rows``; Q8_0 blocks
    (q8.py) keep the factors beside them."""
    if hasattr(linear, "scale_"):
        linear.scale_(mul_cols, div_rows)
        return
    if mul_cols is not None:
        linear.weight.mul_(mul_cols)
    if div_rows is not None:
        linear.weight.div_(div_rows[:, None])
