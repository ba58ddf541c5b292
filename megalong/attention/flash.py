"""flash-attn backend: `flash_attn.flash_attn_varlen_func(..., causal=True)` (CUDA only).

Since flash-attn 2.1 the causal mask is aligned to the bottom-right corner of each segment, which
is the interface's rule (queries shorter than keys work as context parallelism needs); older
versions are refused. GQA is native (K/V heads divide Q heads; nothing is repeated).

Verified in this session (CPU only): import safety and refusals. Unverified here (no GPU, no
flash-attn wheel): numerics and speed — `benchmarks/attention.py` checks against the reference.
"""
from __future__ import annotations

import importlib.util

import torch

from megalong.attention.checks import check_attention_inputs, require_cuda_half

MIN_VERSION = (2, 1)


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("flash_attn") is None:
        return False
    import flash_attn
    return _version(getattr(flash_attn, "__version__", "0")) >= MIN_VERSION


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                    softmax_scale=None):
    seg = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, backend="flash_attn")
    require_cuda_half(q, backend="flash_attn", kernel="flash-attn")
    import flash_attn
    if _version(getattr(flash_attn, "__version__", "0")) < MIN_VERSION:
        raise ValueError(f"attention backend 'flash_attn': flash-attn {flash_attn.__version__} aligns "
                         "its causal mask top-left — install flash-attn >= 2.1")
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q.contiguous(), k.contiguous(), v.contiguous(),
                                  cu_seqlens_q.to(device=q.device, dtype=torch.int32),
                                  cu_seqlens_k.to(device=q.device, dtype=torch.int32),
                                  int(max_seqlen_q if max_seqlen_q is not None else seg.max_q),
                                  int(max_seqlen_k if max_seqlen_k is not None else seg.max_k),
                                  dropout_p=0.0, softmax_scale=softmax_scale, causal=True)
