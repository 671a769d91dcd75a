"""Scaled RoPE frequencies, as transformers computes them (modeling_rope_utils): the one part of a Llama-family
config's rotary embedding that is more than a base θ. The model builds its cos/sin tables from these once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    """Scaled RoPE frequencies, as transformers' `rope_parameters` name them (modeling_rope_utils)."""

    rope_type: str  # "llama3", "linear" or "dynamic"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only (None: the context length)


ROPE_TYPES = ("llama3", "linear", "dynamic")


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling, length: int) -> torch.Tensor:
    """transformers' scaled RoPE frequencies (modeling_rope_utils), for positions below `length`.

    linear: every frequency divided by the factor. llama3: low frequencies (wavelengths beyond
    original/low_freq_factor) divided by the factor, high ones kept, those between interpolated. dynamic (NTK):
    the base grows only for sequences longer than max_position_embeddings, which lmcore never runs (it is the
    context length), so inside the context the frequencies are plain RoPE's.
    """
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "dynamic":
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings or length
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)
