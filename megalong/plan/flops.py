"""The one FLOP and MFU counter (DESIGN §9), shared by the planner and the trainer's logs.

Per token, forward + backward, counting only the useful causal work inside documents:

    flops_per_token = 6·N_matmul + 6·n_layers·n_heads·d_head·L_eff,   L_eff = Σ L_i² / Σ L_i

over the documents of the batch (a full-causal sequence of length S has L_eff = S). Recomputation
is not counted (model FLOPs, not hardware FLOPs), so MFU here is "causal-counted model FLOPs
utilisation" — publish it under that name.

Trainer API: `flops_per_token(model, l_eff)`, `l_eff(doc_lengths)` (or `l_eff_from_cu_seqlens`),
and `mfu(model, l_eff, tokens_per_s_per_gpu, peak_tflops)`. `model` is a ModelShape, a model name
or megalong's ModelConfig.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from megalong.plan.shapes import as_shape


def _as_array(values: Any) -> np.ndarray:
    """numpy view of a list, generator, numpy array or (CPU/GPU) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    elif not isinstance(values, np.ndarray):
        values = list(values)
    return np.asarray(values).reshape(-1)


def attention_flops_per_token(model: Any, l_eff: float) -> float:
    """6·n_layers·n_heads·d_head·L_eff: QKᵀ and PV, causal (half of the square), forward + 2× backward."""
    s = as_shape(model)
    return 6.0 * s.n_layers * s.n_heads * s.d_head * float(l_eff)


def matmul_flops_per_token(model: Any) -> float:
    """6·N_matmul: every weight multiply-adds once per token forward, twice backward."""
    return 6.0 * as_shape(model).matmul_params


def flops_per_token(model: Any, l_eff: float) -> float:
    """Useful training FLOPs per token (forward + backward) for documents of effective length l_eff."""
    return matmul_flops_per_token(model) + attention_flops_per_token(model, l_eff)


def l_eff(doc_lengths: Iterable[int]) -> float:
    """Σ L² / Σ L over documents: the length a token's document has on average, weighted by tokens."""
    lengths = _as_array(doc_lengths).astype(np.float64)
    if lengths.size == 0 or lengths.sum() <= 0:
        raise ValueError("l_eff needs at least one document of positive length")
    if (lengths < 0).any():
        raise ValueError(f"document lengths must be ≥ 0, got {lengths.min():.0f}")
    return float((lengths ** 2).sum() / lengths.sum())


def l_eff_from_cu_seqlens(cu_seqlens: Any) -> float:
    """L_eff of one micro-batch from its cumulative document boundaries (torch or numpy, [n+1])."""
    return l_eff(np.diff(_as_array(cu_seqlens).astype(np.int64)))


def packed_l_eff(doc_lengths: Iterable[int], seq_len: int) -> float:
    """L_eff after packing into sequences of `seq_len`: a document longer than the sequence is cut
    into seq_len-token pieces (plus a remainder), so no piece attends further than seq_len."""
    lengths = _as_array(doc_lengths).astype(np.int64)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    full, rest = np.divmod(lengths, seq_len)
    sum_sq = float((full.astype(np.float64) * seq_len ** 2).sum() + (rest.astype(np.float64) ** 2).sum())
    total = float(lengths.sum())
    if total <= 0:
        raise ValueError("packed_l_eff needs at least one document of positive length")
    return sum_sq / total


def mfu(model: Any, l_eff: float, tokens_per_s_per_gpu: float, peak_tflops: float) -> float:
    """Causal-counted MFU: useful FLOP/s per GPU over the GPU's dense bf16 peak (e.g. 989 for H100)."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
    return flops_per_token(model, l_eff) * tokens_per_s_per_gpu / (peak_tflops * 1e12)
