"""Transformer Engine backend: `transformer_engine.pytorch.DotProductAttention` on THD tensors.

TE picks its own kernel (cuDNN fused attention on Hopper, else flash-attn) for qkv_format="thd"
with attn_mask_type="padding_causal_bottom_right" — the interface's mask: causal inside each
segment, aligned to the segment's bottom-right corner (queries shorter than keys allowed). GQA via
num_gqa_groups. Modules hold no weights, so one instance per (heads, kv heads, head dim, scale,
self/cross) is created lazily and cached.

Verified in this session (CPU only): import safety and refusals. Unverified here (no GPU, no TE):
numerics and speed — `benchmarks/attention.py` checks against the reference before timing.
"""
from __future__ import annotations

import importlib.util

import torch

from megalong.attention.checks import check_attention_inputs, require_cuda_half

_modules: dict = {}


def available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    import transformer_engine.pytorch as te  # noqa: F401  (a broken install counts as absent)
    return hasattr(te, "DotProductAttention")


def _module(h_q: int, h_kv: int, d: int, scale, attention_type: str):
    key = (h_q, h_kv, d, scale, attention_type)
    if key not in _modules:
        import transformer_engine.pytorch as te
        _modules[key] = te.DotProductAttention(
            num_attention_heads=h_q, kv_channels=d, num_gqa_groups=h_kv, attention_dropout=0.0,
            qkv_format="thd", attn_mask_type="padding_causal_bottom_right",
            attention_type=attention_type, softmax_scale=scale)
    return _modules[key]


def te_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                 softmax_scale=None):
    seg = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, backend="te")
    require_cuda_half(q, backend="te", kernel="Transformer Engine fused attention")
    tq, h_q, d = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else None
    attn = _module(h_q, k.shape[1], d, scale, "self" if seg.equal else "cross")
    out = attn(q.contiguous(), k.contiguous(), v.contiguous(),
               cu_seqlens_q=cu_seqlens_q.to(device=q.device, dtype=torch.int32),
               cu_seqlens_kv=cu_seqlens_k.to(device=q.device, dtype=torch.int32),
               max_seqlen_q=int(max_seqlen_q if max_seqlen_q is not None else seg.max_q),
               max_seqlen_kv=int(max_seqlen_k if max_seqlen_k is not None else seg.max_k))
    return out.view(tq, h_q, d)  # TE returns [t, h*d] for thd
