"""The exact reference backend: per-segment SDPA with an explicit bottom-right causal mask.

Runs anywhere (CPU tests, GPU correctness checks at small sizes). It is the definition the fast
kernels are compared against, so it stays simple: one SDPA call per document segment, GQA through
`enable_gqa` so K/V are never repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bottom_right_causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """mask[i, j] = True where query i (of the last lq positions) may see key j of lk keys."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j <= i + (lk - lq)


def reference_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                        softmax_scale=None):
    out = torch.empty_like(q)
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    gqa = q.shape[1] != k.shape[1]
    for i in range(len(cu_q) - 1):
        qa, qb, ka, kb = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if qb == qa:
            continue
        qs = q[qa:qb].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
        ks = k[ka:kb].transpose(0, 1).unsqueeze(0)
        vs = v[ka:kb].transpose(0, 1).unsqueeze(0)
        lq, lk = qb - qa, kb - ka
        if lq == lk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale,
                                               enable_gqa=gqa)
        else:
            mask = bottom_right_causal_mask(lq, lk, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale,
                                               enable_gqa=gqa)
        out[qa:qb] = o.squeeze(0).transpose(0, 1)
    return out
