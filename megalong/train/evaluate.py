"""Validation loss on held-out packed data, also as loss vs position in the sequence and per source.

The same loss as training (DESIGN §4: Σ w·CE / Σ w over the whole eval batch, with the run's
loss mode). Position buckets and per-source losses need per-token CE, which
`megalong.step.forward_backward` only returns as totals; so with one pipeline stage this runs the
model forward itself, with the loss head's `targets()` context exactly as step.py does, and sums
w·CE and w per bucket. With PP > 1 the per-token CE lives on the last stage only and the totals
come from `forward_backward(forward_only=True)` (no buckets).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megalong.attention.context_parallel import local_token_index
from megalong.attention.module import DocumentParams, shard_for_context_parallel
from megalong.model.build import output_head
from megalong.step import forward_backward


def bucket_labels(seq_length: int, buckets: int) -> list[str]:
    width = seq_length // buckets
    return [f"{i * width}-{(i + 1) * width}" for i in range(buckets)]


@torch.no_grad()
def evaluate(chunks: Sequence[torch.nn.Module], loader, plan, buckets: int, num_batches: int,
             source_names: Sequence[str]) -> dict:
    """Loss over `num_batches` eval global batches (always the first ones, so evals compare)."""
    from megatron.core import parallel_state as mpu

    G, m = plan.eval_global_batch_size, plan.micro_batch_size
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    for c in chunks:
        c.eval()
    try:
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            return _totals_only(chunks, loader, G, m, dp, dp_rank, num_batches)
        return _per_token(chunks, loader, G, m, dp, dp_rank, num_batches, buckets, source_names)
    finally:
        for c in chunks:
            c.train()


def _totals_only(chunks, loader, G, m, dp, dp_rank, num_batches) -> dict:
    wce, w, tokens = 0.0, 0.0, 0
    for k in range(num_batches):
        res = forward_backward(chunks, loader.micro_batches(k * G, G, m, dp_rank, dp), forward_only=True)
        wce += res.loss * res.weight_sum
        w += res.weight_sum
        tokens += res.tokens * dp
    return {"loss": wce / w if w > 0 else float("nan"), "weight_sum": w, "tokens": tokens}


def _per_token(chunks, loader, G, m, dp, dp_rank, num_batches, buckets, source_names) -> dict:
    from megatron.core import parallel_state as mpu

    cp, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    cp_group = mpu.get_context_parallel_group() if cp > 1 else None
    model = chunks[0]
    device = next(model.parameters()).device
    head = output_head(model)
    n_src = len(source_names)
    # rows: buckets then sources; columns: Σ w·CE, Σ w (float64 so sums do not depend on order much)
    sums = torch.zeros(buckets + n_src, 2, dtype=torch.float64)
    tokens = 0
    S = None
    for k in range(num_batches):
        ids = loader.micro_batch_ids(k * G, G, m, dp_rank, dp)
        for mb_ids, mb in zip(ids, loader.micro_batches(k * G, G, m, dp_rank, dp)):
            b, S = mb.tokens.shape
            tokens += mb.tokens.numel()
            local = shard_for_context_parallel(mb, cp_rank, cp).to(device)
            params = DocumentParams.for_micro_batch(mb, cp_rank, cp, cp_group, device=device)
            with head.targets(local.labels):
                ce = model(local.tokens, local.position_ids, None, packed_seq_params=params)
            wce = (ce.reshape(local.loss_weights.shape).double() * local.loss_weights.double()).cpu()
            w = local.loss_weights.double().cpu()
            pos = torch.as_tensor(local_token_index(S, cp_rank, cp))
            bucket = pos * buckets // S
            sums[:buckets, 0].index_add_(0, bucket, wce.sum(0))
            sums[:buckets, 1].index_add_(0, bucket, w.sum(0))
            src = torch.as_tensor([d for d, _ in mb_ids])
            sums[buckets:, 0].index_add_(0, src, wce.sum(1))
            sums[buckets:, 1].index_add_(0, src, w.sum(1))
    group = mpu.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:  # NCCL reduces device tensors only
        on_device = sums.to(device)
        dist.all_reduce(on_device, group=group)
        sums = on_device.cpu()
    tokens *= dp
    total_w = float(sums[:buckets, 1].sum())
    ratio = (sums[:, 0] / sums[:, 1]).tolist()
    out = {"loss": float(sums[:buckets, 0].sum()) / total_w if total_w > 0 else float("nan"),
           "weight_sum": total_w, "tokens": tokens,
           "position_losses": {lab: r for lab, r, w in zip(bucket_labels(S, buckets), ratio[:buckets],
                                                            sums[:buckets, 1].tolist()) if w > 0}}
    if n_src > 1:
        out["source_losses"] = {name: r for name, r, w in zip(source_names, ratio[buckets:],
                                                               sums[buckets:, 1].tolist()) if w > 0}
    return out


def source_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for dataset prefixes (their file names, else the whole paths)."""
    names = [p.rstrip("/").split("/")[-1] for p in paths]
    return names if len(set(names)) == len(names) else list(paths)

