"""Context parallelism without Transformer Engine: zigzag sharding and an all-gather of K/V.

Each CP rank holds chunks r and 2·CP-1-r of every sample (2·CP chunks in all), which balances the
causal work. K/V are all-gathered over the CP group (backward: reduce-scatter), put back into natural
order, and every local query chunk attends to the contiguous key range it needs, document-masked,
through the one attention interface with bottom-right-aligned causal segments.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_token_index(seq_len: int, cp_rank: int, cp_size: int) -> np.ndarray:
    """Positions (within one sample) of the tokens CP rank `cp_rank` holds, in local order."""
    if cp_size == 1:
        return np.arange(seq_len)
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·CP = {2 * cp_size}; "
                         "pad the packed samples to a multiple of 2·CP or change parallel.context_parallel")
    c = seq_len // (2 * cp_size)
    lo, hi = zigzag_chunks(cp_rank, cp_size)
    return np.concatenate([np.arange(lo * c, (lo + 1) * c), np.arange(hi * c, (hi + 1) * c)])


def attention_layout(cu_seqlens: np.ndarray, batch: int, seq_len: int, cp_rank: int, cp_size: int):
    """Segments for this rank's queries against the keys they need.

    Returns (cu_q, cu_k, max_q, max_k, k_index): `k_index` selects, from the natural-order flattened
    [b·S] keys, the concatenated key ranges; q is the rank's local tokens flattened sample-major.
    """
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cp_size == 1:
        lengths = np.diff(cu)
        m = int(lengths.max())
        return cu, cu, m, m, None
    c = seq_len // (2 * cp_size)
    q_lens, k_lens, k_ranges = [], [], []
    for j in range(batch):
        # document boundaries of sample j, relative to the sample
        bounds = cu[(cu >= j * seq_len) & (cu <= (j + 1) * seq_len)] - j * seq_len
        for chunk in zigzag_chunks(cp_rank, cp_size):
            a, e = chunk * c, (chunk + 1) * c
            first = None
            for ds, de in zip(bounds[:-1], bounds[1:]):
                if de <= a or ds >= e:
                    continue
                first = ds if first is None else first
                q_lens.append(min(de, e) - max(ds, a))
                k_lens.append(min(de, e) - ds)
            k_ranges.append(np.arange(j * seq_len + first, j * seq_len + e))
    cu_q = np.concatenate([[0], np.cumsum(q_lens)])
    cu_k = np.concatenate([[0], np.cumsum(k_lens)])
    return cu_q, cu_k, int(max(q_lens)), int(max(k_lens)), np.concatenate(k_ranges)


class _GatherFromContextParallel(torch.autograd.Function):
    """[s_local, b, h, d] zigzag shards → [S, b, h, d] in natural order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, group):
        cp = dist.get_world_size(group)
        ctx.group, ctx.cp = group, cp
        gathered = torch.empty((cp * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=group)
        # gathered block order: rank r contributes chunks (r, 2cp-1-r)
        order = _natural_from_gathered(cp)
        chunks = gathered.view(2 * cp, x.shape[0] // 2, *x.shape[1:])
        return chunks[order].reshape(cp * x.shape[0], *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        s_local = grad.shape[0] // cp
        chunks = grad.reshape(2 * cp, s_local // 2, *grad.shape[1:])
        inverse = torch.argsort(_natural_from_gathered(cp))
        gathered = chunks[inverse].reshape(grad.shape).contiguous()
        out = torch.empty((s_local,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, gathered, group=ctx.group)
        return out, None


def _natural_from_gathered(cp: int) -> torch.Tensor:
    """Index into the gathered blocks for natural chunk order 0..2cp-1."""
    where = {}
    for r in range(cp):
        lo, hi = zigzag_chunks(r, cp)
        where[lo], where[hi] = 2 * r, 2 * r + 1
    return torch.tensor([where[c] for c in range(2 * cp)])


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromContextParallel.apply(x, group)
