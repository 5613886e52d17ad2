"""RoPE's inverse frequencies and the scalings that stretch them past a model's training context.

Every scaling the engine computes is a per-frequency divisor of the base inverse frequencies
``theta ** (-2i / head_dim)``: linear position interpolation (positions / factor turns by the
same angles as every frequency / factor), Llama 3's scaling (high frequencies kept, low ones
divided by the factor, a smooth blend between), and a GGUF's ``rope_freqs`` tensor, which is
those divisors as llama.cpp's converter stores them. Pure arithmetic on numbers the loaders hand
in: never reads files and knows no file's key names.
"""
from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float,
                        divisors: tuple[float, ...] = ()) -> torch.Tensor:
    """float64 [head_dim // 2]: the rotation speed of each pair of dimensions, in radians per
    position, each divided by its divisor where ``divisors`` are given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not divisors:
        return inv_freq   # untouched: unscaled models keep their bit-exact tables
    # view(), not broadcasting: a wrong count fails here (ModelConfig names it first)
    return inv_freq / torch.tensor(divisors, dtype=torch.float64).view(head_dim // 2)


def linear_divisors(head_dim: int, factor: float) -> tuple[float, ...]:
    """Linear scaling (position interpolation): positions / factor, as a divisor of every
    frequency."""
    if not factor > 0:
        raise ValueError(f"linear RoPE scaling: factor={factor} must be positive")
    return (float(factor),) * (head_dim // 2)


def llama3_divisors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> tuple[float, ...]:
    """Llama 3.1's scaling as divisors. A frequency whose wavelength (2 pi / inv_freq, in
    positions) is shorter than original_max_position / high_freq_factor already turned many
    times within the training context and is kept; one longer than
    original_max_position / low_freq_factor never completed a turn there and is interpolated
    (divided by ``factor``); in between, the inverse frequency blends the two linearly in
    original_max_position / wavelength."""
    if not factor > 0:
        raise ValueError(f"llama3 RoPE scaling: factor={factor} must be positive")
    if not high_freq_factor > low_freq_factor > 0:
        raise ValueError(f"llama3 RoPE scaling: needs high_freq_factor={high_freq_factor} > "
                         f"low_freq_factor={low_freq_factor} > 0")
    if not original_max_position > 0:
        raise ValueError(f"llama3 RoPE scaling: original_max_position_embeddings="
                         f"{original_max_position} must be positive")
    kept_below = original_max_position / high_freq_factor       # wavelengths shorter: kept
    interpolated_above = original_max_position / low_freq_factor  # longer: divided by factor
    out = []
    for inv_freq in inverse_frequencies(head_dim, theta).tolist():
        wavelength = 2 * math.pi / inv_freq
        if wavelength < kept_below:
            out.append(1.0)
        elif wavelength > interpolated_above:
            out.append(float(factor))
        else:
            # weight of the kept frequency: 1 at kept_below, 0 at interpolated_above
            kept = ((original_max_position / wavelength - low_freq_factor)
                    / (high_freq_factor - low_freq_factor))
            out.append(1.0 / (kept + (1.0 - kept) / factor))
    return tuple(out)
