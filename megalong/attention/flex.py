"""flex_attention backend: document masking as a block-sparse BlockMask built from boundaries.

`create_block_mask` with a Python mask_mod evaluates the mask over all S² pairs (at 128K tokens it
tried to allocate 128 GiB, DESIGN §5). The mask here is a staircase — query token i of segment d
sees the key range [lo_i, hi_i] = [cu_k[d], i - cu_q[d+1] + cu_k[d+1]] (bottom-right aligned, so a
query segment may be shorter than its key segment) — and both bounds are non-decreasing in i. So
whether a (128 × 128) tile is empty, full or partial follows from its corner rows alone, and the
tables cost O((Tq/128)·(Tk/128)) with no S² tensor. Partial tiles use a mask_mod that compares
key indices with the two per-query bounds.

On CUDA, flex_attention is compiled (torch.compile, once per process) and run with the kernel options measured
best on an H100 (DESIGN §5: BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3; 384–390 TF/s for
GQA 32/8, 64K of 8K documents, torch 2.11). On CPU, eager flex_attention runs the forward only —
torch 2.13 raises for its CPU backward, so this backend refuses CPU inputs that need gradients.

Verified in this session (CPU, torch 2.13): block tables exactly equal to the dense mask's tile
classification, mask_mod equal to the dense mask, forward equal to the reference (GQA, uneven
documents, queries shorter than keys). Unverified here (no GPU): the compiled CUDA kernel, its
backward, and its speed with these tables — `benchmarks/attention.py` checks all three.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch

from megalong.attention.checks import check_attention_inputs

BLOCK = 128  # BlockMask tile (queries × keys); kernel BLOCK_M/BLOCK_N must divide it
CUDA_KERNEL_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def available(device: torch.device) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu"


def segment_bounds(cu_q: torch.Tensor, cu_k: torch.Tensor, tq: int, padded_len: int):
    """Per query token, the inclusive key range [lo, hi] it may attend (global key indices).

    Rows past `tq` (tile padding) get an empty range (lo > hi).
    """
    device = cu_q.device
    cu_q = cu_q.to(torch.int64)
    cu_k = cu_k.to(torch.int64)
    idx = torch.arange(tq, device=device, dtype=torch.int64)
    doc = torch.searchsorted(cu_q[1:], idx, right=True)  # cu_q[doc] <= i < cu_q[doc + 1]
    lo = torch.full((padded_len,), 1, dtype=torch.int64, device=device)
    hi = torch.full((padded_len,), 0, dtype=torch.int64, device=device)
    lo[:tq] = cu_k[doc]
    hi[:tq] = idx - cu_q[doc + 1] + cu_k[doc + 1]
    return lo, hi


def block_tables(lo: torch.Tensor, hi: torch.Tensor, tq: int, tk: int, block: int = BLOCK):
    """Classifies every (query tile, key tile) as partial or full from the staircase bounds.

    Returns (partial [Mq, Nk] bool, full [Mq, Nk] bool). Relies on lo non-decreasing and hi
    strictly increasing over the real rows, which holds for cumulative segment offsets.
    """
    device = lo.device
    mq, nk = -(-tq // block), -(-tk // block)
    r0 = torch.arange(mq, device=device, dtype=torch.int64) * block
    r1 = torch.clamp(r0 + block, max=tq) - 1
    c0 = torch.arange(nk, device=device, dtype=torch.int64) * block
    c1 = torch.clamp(c0 + block, max=tk) - 1
    lo_r, hi_r = lo[:tq], hi[:tq]
    # First row whose range reaches column c0: every later row does too (hi increasing).
    first = torch.searchsorted(hi_r, c0, right=False)  # [Nk]
    istar = torch.maximum(r0[:, None], first[None, :])  # [Mq, Nk]
    touches = (istar <= r1[:, None]) & (lo_r[istar.clamp(max=tq - 1)] <= c1[None, :])
    # Full: the widest-starting row still starts by c0, the earliest-ending row still ends past c1.
    full = (lo_r[r1][:, None] <= c0[None, :]) & (hi_r[r0][:, None] >= c1[None, :])
    return touches & ~full, full


def _as_kv_blocks(mask: torch.Tensor):
    """[Mq, Nk] bool -> (num [1,1,Mq], indices [1,1,Mq,Nk]) int32, selected tiles first, ascending."""
    num = mask.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], order[None, None]


def _staircase_mask_mod(lo: torch.Tensor, hi: torch.Tensor):
    def document_causal(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx <= hi[q_idx])
    return document_causal


def build_block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, tq: int, tk: int, block: int = BLOCK):
    """The document (bottom-right causal) BlockMask for one packed sequence, shared by all heads."""
    from torch.nn.attention.flex_attention import BlockMask

    mq = -(-tq // block)
    lo, hi = segment_bounds(cu_q, cu_k, tq, mq * block)
    partial, full = block_tables(lo, hi, tq, tk, block)
    kv_num, kv_idx = _as_kv_blocks(partial)
    full_num, full_idx = _as_kv_blocks(full)
    mask_mod = _staircase_mask_mod(lo.to(torch.int32), hi.to(torch.int32))  # kernel indices: int32
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(block, block),
                                    mask_mod=mask_mod, seq_lengths=(tq, tk))


_mask_cache: Optional[tuple] = None  # (weakref cu_q, version, weakref cu_k, version, key, BlockMask)


def _cached_block_mask(cu_q, cu_k, tq, tk, device):
    """Every layer of a step passes the same cu_seqlens tensors: build their BlockMask once."""
    global _mask_cache
    key = (tq, tk, str(device))
    versions = (None if cu_q.is_inference() else cu_q._version,
                None if cu_k.is_inference() else cu_k._version)
    if _mask_cache is not None and None not in versions:
        rq, vq, rk, vk, ckey, mask = _mask_cache
        if rq() is cu_q and rk() is cu_k and (vq, vk) == versions and ckey == key:
            return mask
    mask = build_block_mask(cu_q.to(device), cu_k.to(device), tq, tk)
    if None not in versions:
        _mask_cache = (weakref.ref(cu_q), versions[0], weakref.ref(cu_k), versions[1], key, mask)
    return mask


_compiled = None


def _flex_fn(device: torch.device):
    """Compiled flex_attention on CUDA (compiled once per process); eager elsewhere."""
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        # default dynamic=None: a second shape (CP's key count changes per micro-batch) makes the
        # lengths symbolic instead of compiling once per shape
        _compiled = torch.compile(flex_attention)
    return _compiled


def flex_attention_thd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                       softmax_scale=None):
    check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, backend="flex")
    if q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError(
            "attention backend 'flex': torch's flex_attention has no CPU backward (torch "
            f"{torch.__version__}) — use model.attention_backend=reference on CPU, or run under "
            "torch.no_grad() for inference")
    tq, tk = q.shape[0], k.shape[0]
    mask = _cached_block_mask(cu_seqlens_q, cu_seqlens_k, tq, tk, q.device)
    fn = _flex_fn(q.device)
    options = CUDA_KERNEL_OPTIONS if q.device.type == "cuda" else None
    with warnings.catch_warnings():
        # eager on CPU is deliberate (compiling costs ~30 s per shape on a small CPU)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        # [T, H, D] -> [1, H, T, D] views; flex takes strided inputs with a unit last stride.
        out = fn(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                 v.transpose(0, 1).unsqueeze(0), block_mask=mask, scale=softmax_scale,
                 enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)
    return out.squeeze(0).transpose(0, 1).contiguous()
