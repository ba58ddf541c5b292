"""The one loss (DESIGN §4): L = Σ_t w_t·CE_t / Σ_t w_t over the whole global batch.

Token mode (ProLong) has w = 1 on targets; sequence mode (LongAlign) has w = 1/N_i on the N_i targets
of packed sequence i (computed in megalong.data.batch), so Σ w = M and L = (1/M) Σ_i L_i/N_i for any
split over DP ranks, CP ranks and micro-batches. The normaliser Σ w is known before the step (every
rank can sum the weights of its share of the global batch), so each micro-batch contributes
Σ_local w·CE / W_global and gradients are simply summed — no integer token counts anywhere.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megalong.data.batch import MicroBatch


def global_weight_sum(micro_batches: Sequence[MicroBatch], dp_group=None) -> float:
    """Σ w over this DP rank's (unsharded) micro-batches, all-reduced over the DP group, in float64."""
    local = torch.tensor(sum(float(mb.loss_weights.double().sum()) for mb in micro_batches), dtype=torch.float64)
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(local, group=dp_group)
    return float(local)


def weighted_ce_sum(per_token_ce: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """Σ w·CE in float32 (per_token_ce [b, s] or [b, s, 1])."""
    ce = per_token_ce.reshape(loss_weights.shape).float()
    return (ce * loss_weights.to(ce.device, torch.float32)).sum()


def reference_loss(per_token_ce: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Single-process definition used in tests: Σ w·CE / Σ w over all given micro-batches."""
    num = sum(weighted_ce_sum(c, w) for c, w in zip(per_token_ce, weights))
    den = sum(w.double().sum() for w in weights)
    return num / den.float()
