"""Rotary position embedding from explicit position ids (HF Llama's rotate-half layout).

Positions are data, not an implicit 0..S-1: the loader gives each token (on each CP rank) its
position, continuous across a packed sample (ProLong) or reset at every document (Megatron's
reset_position_ids). That one mechanism covers packing, context parallelism and both modes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def inv_frequencies(head_dim: int, base: float, scaling=None) -> torch.Tensor:
    """float64 inverse frequencies; Llama-3.1 scaling when `scaling` (a RopeScaling) is given."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = torch.where(wavelen > low_wl, inv / scaling.factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return torch.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [S, b, 1, D] for position_ids [b, S] (angles in float32 as HF does)."""
    freqs = position_ids.transpose(0, 1).unsqueeze(-1).to(torch.float32) * inv_freq.to(
        device=position_ids.device, dtype=torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, b, h, D] rotated by cos/sin [S, b, 1, D]."""
    return x * cos + _rotate_half(x) * sin


class RotaryEmbedding(torch.nn.Module):
    """Caches the inverse frequencies; `cos_sin(position_ids)` per micro-batch."""

    def __init__(self, head_dim: int, base: float, scaling: Optional[object] = None):
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(head_dim, base, scaling).float(), persistent=False)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(position_ids, self.inv_freq, dtype)
