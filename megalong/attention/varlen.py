"""torch's `varlen_attn` backend (FlashAttention-2 kernels inside torch, CUDA only).

`varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), enable_gqa=...)` is causal
through the window: torch 2.13 sets `is_causal = window_size == (-1, 0)` and hands it to
`aten._flash_attention_forward`, whose causal mask is the FlashAttention-2 one (>= 2.1): aligned
to the bottom-right corner of each segment using that segment's own lengths — exactly the
interface's rule, so queries shorter than keys (context parallelism) need no special case. GQA is
passed through (`enable_gqa`), K/V are never repeated.

Measured before this project (DESIGN §5, H100, torch 2.11, 16 heads × 128, bf16, fwd+bwd):
305–330 TF/s at 64K–512K. Verified in this session (CPU only): import safety and refusals.
Unverified here (no GPU): numerics — read from torch's source, checked against the reference by
`benchmarks/attention.py` (which includes a query-shorter-than-key case) before timing.
"""
from __future__ import annotations

import torch

from megalong.attention.checks import check_attention_inputs, require_cuda_half


def available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.backends.cuda.is_flash_attention_available()


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     softmax_scale=None):
    seg = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, backend="varlen")
    require_cuda_half(q, backend="varlen", kernel="varlen_attn (FlashAttention)")
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(),
                       cu_seqlens_q.to(device=q.device, dtype=torch.int32),
                       cu_seqlens_k.to(device=q.device, dtype=torch.int32),
                       int(max_seqlen_q if max_seqlen_q is not None else seg.max_q),
                       int(max_seqlen_k if max_seqlen_k is not None else seg.max_k),
                       scale=softmax_scale, window_size=(-1, 0),
                       enable_gqa=q.shape[1] != k.shape[1])
