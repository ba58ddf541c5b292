"""One optimizer step's forward and backward over this rank's micro-batches, through megatron-core's
pipeline schedules, with megalong's exact global-batch loss (see megalong/loss.py).

Every rank (all TP/PP/CP ranks of a DP replica) receives the same full micro-batches; context
parallel sharding happens here, so the loader never needs to know about CP.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from megalong.attention.module import DocumentParams, shard_for_context_parallel
from megalong.data.batch import MicroBatch
from megalong.loss import global_weight_sum, weighted_ce_sum
from megalong.model.build import output_head


@dataclass
class StepResult:
    loss: float  # Σ w·CE / Σ w over the global batch (same value on every rank)
    weight_sum: float  # Σ w over the global batch
    tokens: int  # tokens processed by this DP replica (all micro-batches, unsharded)
    extra: dict = field(default_factory=dict)


def forward_backward(model_chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch],
                     forward_only: bool = False) -> StepResult:
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cp_size, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    cp_group = mpu.get_context_parallel_group() if cp_size > 1 else None
    dp_group = mpu.get_data_parallel_group()
    device = next(model_chunks[0].parameters()).device
    W = global_weight_sum(micro_batches, dp_group)
    denom = W if W > 0 else 1.0

    def forward_step(data_iterator, model):
        full = next(data_iterator)
        local = shard_for_context_parallel(full, cp_rank, cp_size).to(device)
        params = DocumentParams.for_micro_batch(full, cp_rank, cp_size, cp_group, device=device)
        head = output_head(model)
        ctx = head.targets(local.labels) if head is not None else contextlib.nullcontext()
        with ctx:
            output = model(local.tokens, local.position_ids, None, packed_seq_params=params)

        def loss_func(per_token_ce):
            wsum = weighted_ce_sum(per_token_ce, local.loss_weights)
            # Third element is what the schedule collects for reporting; the int 0 token count keeps
            # megatron from rescaling (finalize_grads_without_token_scaling ignores it anyway).
            return wsum / denom, torch.zeros([], dtype=torch.int), {"wce": wsum.detach()}

        return output, loss_func

    b, S = micro_batches[0].tokens.shape
    fb = get_forward_backward_func()
    collected = fb(forward_step_func=forward_step, data_iterator=iter(micro_batches), model=list(model_chunks),
                   num_microbatches=len(micro_batches), seq_length=S, micro_batch_size=b,  # megatron divides by CP
                   forward_only=forward_only)
    wce = torch.zeros([], dtype=torch.float64)
    if mpu.is_pipeline_last_stage():
        for item in collected:
            wce += item["wce"].double().cpu()
    # Σ over CP shards and DP replicas, then share the last stage's value with every PP stage.
    dp_cp = mpu.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(dp_cp) > 1:
        dist.all_reduce(wce, group=dp_cp)
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp > 1:
        dist.broadcast(wce, src=mpu.get_pipeline_model_parallel_last_rank(),
                       group=mpu.get_pipeline_model_parallel_group())
    tokens = sum(mb.tokens.numel() for mb in micro_batches)
    return StepResult(loss=float(wce) / denom, weight_sum=W, tokens=tokens)


def setup_model_for_training(model_chunks, use_distributed_optimizer: bool = True):
    """Wraps chunks in megatron DDP (summing gradients; the loss is already normalised)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megalong.runtime.compat import call_with_supported, dataclass_supported, finalize_grads_without_token_scaling

    ddp_cfg = dataclass_supported(DistributedDataParallelConfig, grad_reduce_in_fp32=True,
                                  overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
                                  average_in_collective=False, check_for_nan_in_grad=False)
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(call_with_supported(DistributedDataParallel, config=chunk.config, ddp_config=ddp_cfg,
                                           module=chunk, disable_bucketing=(i > 0)))
    for w in wrapped:
        w.config.finalize_model_grads_func = finalize_grads_without_token_scaling()
        w.config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped
