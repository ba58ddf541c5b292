"""Megatron parameter layout under TP/PP, in one place: full (TP1/PP1) names and tensors ⇄ shards.

Used by parity tests, checkpoint conversion and resharding. Facts encoded here:
- column-parallel weights (linear_qkv, linear_fc1, output_layer, word_embeddings) split on dim 0,
  row-parallel ones (linear_proj, linear_fc2) on dim 1, norms are replicated;
- linear_qkv rows are grouped per KV head ([q_g…, k_g, v_g] per group), so TP splits whole groups and
  plain concatenation restores the TP1 layout;
- linear_fc1 holds [gate; up]: each TP rank holds [gate_r; up_r], so it is split per half;
- pipeline stages number their layers from 0; global index = pp_rank · layers_per_stage + local.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
COLUMN = ("linear_qkv.weight", "linear_fc1.weight", "output_layer.weight", "word_embeddings.weight")
ROW = ("linear_proj.weight", "linear_fc2.weight")


def partition_dim(name: str) -> int | None:
    if name.endswith(COLUMN):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def tp_shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} is not divisible by TP={tp}")
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def tp_unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def to_global_name(name: str, pp_rank: int, layers_per_stage: int) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    return f"decoder.layers.{pp_rank * layers_per_stage + int(m.group(1))}.{name[m.end():]}"


def to_local_name(name: str, pp_rank: int, layers_per_stage: int) -> str | None:
    """The stage-local name of a global parameter name, or None if it lives on another stage."""
    m = _LAYER.match(name)
    if not m:
        return name
    i = int(m.group(1)) - pp_rank * layers_per_stage
    if not 0 <= i < layers_per_stage:
        return None
    return f"decoder.layers.{i}.{name[m.end():]}"


def unwrap(model):
    """The GPTModel inside DDP/Float16 wrappers: checkpoint keys never depend on wrapping (converted
    and trainer checkpoints must match), as Megatron-LM's unwrap_model does before saving."""
    while hasattr(model, "module"):
        model = model.module
    return model


def gather_full_state(model, what: str = "param", tied: bool = False) -> dict[str, torch.Tensor]:
    """Full TP1/PP1 parameters (or their gradients, `what="grad"`) on every rank (small models)."""
    from megatron.core import parallel_state as mpu

    m = unwrap(model)
    tp, pp = mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    per_stage = m.config.num_layers // pp
    local = {}
    for name, p in m.named_parameters():
        if tied and name == "output_layer.weight" and pp > 1:
            continue  # the embedding copy on the last stage
        t = p
        if what == "grad":
            t = getattr(p, "main_grad", None)
            if t is None:
                t = p.grad if p.grad is not None else torch.zeros_like(p)
        t = t.detach().float().cpu().clone()
        if tp > 1 and partition_dim(name) is not None:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t.contiguous(), group=mpu.get_tensor_model_parallel_group())
            t = tp_unshard(name, shards)
        local[to_global_name(name, pp_rank, per_stage)] = t
    if pp == 1:
        return local
    parts = [None] * pp
    dist.all_gather_object(parts, local, group=mpu.get_pipeline_model_parallel_group())
    full = {}
    for part in parts:
        full.update(part)
    return full


@torch.no_grad()
def load_full_state(model, full: dict[str, torch.Tensor], tied: bool = False) -> None:
    """Copies full TP1/PP1 tensors into this rank's shards; errors name missing or mis-shaped keys."""
    from megatron.core import parallel_state as mpu

    m = unwrap(model)
    tp, pp = mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank()
    per_stage = m.config.num_layers // pp
    for name, p in m.named_parameters():
        key = to_global_name(name, pp_rank, per_stage)
        if tied and key == "output_layer.weight":
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"parameter {key} is missing from the state being loaded")
        shard = tp_shard(key, full[key], tp, tp_rank)
        if tuple(shard.shape) != tuple(p.shape):
            raise ValueError(f"{key}: shard shape {tuple(shard.shape)} does not match the model's "
                             f"{tuple(p.shape)} (TP={tp})")
        p.copy_(shard.to(p.dtype))
