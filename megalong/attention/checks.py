"""The one input check every attention backend runs before touching a kernel.

A fused kernel handed a wrong `cu_seqlens` or a too-small `max_seqlen` reads out of bounds or
silently attends across documents; so every bad input is turned here into a `ValueError` that
names the value and the fix. Shape and dtype checks cost nothing; the value checks on
`cu_seqlens` need one host copy, which is done once per `cu_seqlens` tensor (every layer of a
step passes the same tensors) and cached through a weak reference.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Segments:
    """What the value checks learned about the document segments (host integers)."""
    num: int  # number of segments (len(cu_seqlens) - 1)
    max_q: int  # actual longest query segment
    max_k: int  # actual longest key segment
    equal: bool  # every query segment as long as its key segment (no bottom-right shift)


def _fail(backend: str, what: str, fix: str) -> ValueError:
    return ValueError(f"attention backend {backend!r}: {what} — {fix}")


def _check_shapes(q, k, v, cu_q, cu_k, backend: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise _fail(backend, f"{name} is a {type(t).__name__}, not a tensor",
                        "pass torch tensors in THD layout [tokens, heads, head_dim]")
        if t.dim() != 3:
            raise _fail(backend, f"{name} has shape {tuple(t.shape)} ({t.dim()} dims)",
                        "pass THD tensors [tokens, heads, head_dim]; flatten batch and sequence first")
        if not t.is_floating_point():
            raise _fail(backend, f"{name} has dtype {t.dtype}", "pass floating-point q/k/v")
    if not (q.dtype == k.dtype == v.dtype):
        raise _fail(backend, f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})",
                    "cast q, k and v to one dtype (bf16 on GPU)")
    if not (q.device == k.device == v.device):
        raise _fail(backend, f"q/k/v live on different devices ({q.device}, {k.device}, {v.device})",
                    "move q, k and v to one device")
    if k.shape != v.shape:
        raise _fail(backend, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape",
                    "k and v must both be [Tk, Hkv, D]")
    if q.shape[2] != k.shape[2]:
        raise _fail(backend, f"head_dim of q ({q.shape[2]}) != head_dim of k ({k.shape[2]})",
                    "q and k/v must share the head dimension")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise _fail(backend, f"query heads {hq} are not a multiple of key/value heads {hkv}",
                    "GQA needs Hq % Hkv == 0 (e.g. 32 query heads over 8 KV heads)")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in _INDEX_DTYPES:
            desc = (f"{tuple(cu.shape)} {cu.dtype}" if isinstance(cu, torch.Tensor)
                    else type(cu).__name__)
            raise _fail(backend, f"{name} is {desc}",
                        "pass a 1-D int32 (or int64) tensor [num_segments + 1] of cumulative lengths")
        if cu.numel() < 2:
            raise _fail(backend, f"{name} has {cu.numel()} entries",
                        "cu_seqlens needs at least [0, T] (one segment)")
    if cu_q.numel() != cu_k.numel():
        raise _fail(backend, f"cu_seqlens_q has {cu_q.numel() - 1} segments but cu_seqlens_k has "
                    f"{cu_k.numel() - 1}", "query and key segments must pair up one to one")


def _check_values(cu_q: torch.Tensor, cu_k: torch.Tensor, tq: int, tk: int,
                  backend: str) -> Segments:
    both = torch.stack([cu_q.to(torch.int64), cu_k.to(torch.int64)]).cpu()
    for row, name, total, what in ((0, "cu_seqlens_q", tq, "q.shape[0]"),
                                   (1, "cu_seqlens_k", tk, "k.shape[0]")):
        cu = both[row]
        if int(cu[0]) != 0:
            raise _fail(backend, f"{name} starts at {int(cu[0])}", "cu_seqlens must start at 0")
        steps = cu[1:] - cu[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            raise _fail(backend, f"{name} decreases at index {i + 1} ({int(cu[i])} -> {int(cu[i + 1])})",
                        "cu_seqlens must be non-decreasing cumulative segment lengths")
        if int(cu[-1]) != total:
            raise _fail(backend, f"{name} ends at {int(cu[-1])} but {what} is {total}",
                        f"the last entry of {name} must equal the number of tokens")
    len_q = both[0, 1:] - both[0, :-1]
    len_k = both[1, 1:] - both[1, :-1]
    longer = len_q > len_k
    if bool(longer.any()):
        i = int(torch.nonzero(longer)[0])
        raise _fail(backend, f"segment {i} has {int(len_q[i])} queries but only {int(len_k[i])} keys",
                    "each query segment must be at most as long as its key segment "
                    "(bottom-right causal: queries are the last Lq of Lk positions)")
    return Segments(num=int(len_q.numel()), max_q=int(len_q.max()), max_k=int(len_k.max()),
                    equal=bool(torch.equal(len_q, len_k)))


_last: Optional[tuple] = None  # (weakref cu_q, version, weakref cu_k, version, Tq, Tk, Segments)


def _versioned(t: torch.Tensor):
    return None if t.is_inference() else t._version


def _cached_values(cu_q, cu_k, tq, tk, backend) -> Segments:
    global _last
    vq, vk = _versioned(cu_q), _versioned(cu_k)
    if _last is not None and vq is not None and vk is not None:
        rq, version_q, rk, version_k, ltq, ltk, seg = _last
        if (rq() is cu_q and rk() is cu_k and version_q == vq and version_k == vk
                and (ltq, ltk) == (tq, tk)):
            return seg
    seg = _check_values(cu_q, cu_k, tq, tk, backend)
    if vq is not None and vk is not None:
        _last = (weakref.ref(cu_q), vq, weakref.ref(cu_k), vk, tq, tk, seg)
    return seg


def check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           softmax_scale=None, *, backend: str) -> Segments:
    """Validates the attention interface's arguments; returns the segment summary.

    Raises ValueError naming the bad value and the fix. `max_seqlen_*` may be None (then the
    actual maximum is used) but never smaller than the longest segment: kernels size their grid
    from it and would skip rows otherwise.
    """
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, backend)
    if softmax_scale is not None and not (float(softmax_scale) > 0.0):
        raise _fail(backend, f"softmax_scale is {softmax_scale}",
                    "pass a positive scale (or None for 1/sqrt(head_dim))")
    seg = _cached_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], backend)
    for name, given, actual in (("max_seqlen_q", max_seqlen_q, seg.max_q),
                                ("max_seqlen_k", max_seqlen_k, seg.max_k)):
        if given is not None and int(given) < actual:
            raise _fail(backend, f"{name}={int(given)} but the longest segment has {actual} tokens",
                        f"pass {name} >= {actual} (or None to derive it)")
    return seg


def require_cuda_half(q: torch.Tensor, *, backend: str, kernel: str) -> None:
    """The GPU kernels' common precondition: CUDA inputs in bf16/fp16 (CPU runs use the reference)."""
    if q.device.type != "cuda":
        raise _fail(backend, f"inputs are on {q.device} — {kernel} runs on CUDA only",
                    "use model.attention_backend=reference (or auto) on CPU")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise _fail(backend, f"dtype {q.dtype} — {kernel} takes bf16 or fp16",
                    "cast q/k/v (or use attention backend flex)")
