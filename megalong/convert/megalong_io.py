"""The megalong side of conversion: HF tensors into a model's shards, a checkpoint read tensor by
tensor, and full-vocabulary logits of a model under any TP/PP layout.

Reading a checkpoint does not build a model or join a process group: megatron-core's
dist_checkpointing stores torch DCP files in which each layer's tensor is one chunk of a global
tensor stacked over layers ([L, ...]); `CheckpointTensors` asks DCP for one layer's slice at a time.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megalong.convert.hf_llama import (EMBEDDING, FINAL_NORM, OUTPUT, ConversionError, megatron_names,
                                       megatron_shape, split_layer_name, to_megatron)
from megalong.model.config import ModelConfig


class HFStateForModel(Mapping):
    """Full (TP1/PP1) megatron tensors computed lazily from HF weights, one per lookup, so that
    `layout.load_full_state` can shard them into a model without a full copy in memory."""

    def __init__(self, read: Callable[[str], torch.Tensor], cfg: ModelConfig, on_tensor=None):
        self.read, self.cfg, self.on_tensor = read, cfg, on_tensor
        self.names = megatron_names(cfg)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        t = to_megatron(name, self.read, self.cfg)
        if self.on_tensor is not None:
            self.on_tensor(name)
        return t

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_hf_into_model(model, read: Callable[[str], torch.Tensor], cfg: ModelConfig, on_tensor=None) -> None:
    """Copies HF weights into this rank's shards of `model` (TP split and PP offsets: layout.py)."""
    from megalong.model.layout import load_full_state

    load_full_state(model, HFStateForModel(read, cfg, on_tensor), tied=cfg.tie_embeddings)


# ------------------------------------------------------------------------------ checkpoint reading
# megatron-core's dist-checkpoint key of each layer parameter (layers stacked on a leading axis). The
# local layer spec stores the norms under the names of TE's fused norm+linear modules.
DIST_LAYER_KEYS = {
    "input_layernorm.weight": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight": "decoder.layers.self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight": "decoder.layers.self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight": "decoder.layers.mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "decoder.layers.mlp.linear_fc2.weight",
}


def dist_key(name: str) -> tuple[str, Optional[int]]:
    """(DCP key, layer index or None) of a full megatron parameter name."""
    layer, rest = split_layer_name(name)
    return (name, None) if layer is None else (DIST_LAYER_KEYS[rest], layer)


def _slice_planner(offsets: dict[str, tuple[int, ...]]):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Loads state_dict[key] from the region of the stored global tensor starting at offsets[key]."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self):
            items = []
            for key, dest in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[key]), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return SlicePlanner()


class CheckpointTensors:
    """Full megatron tensors of a megalong checkpoint, read layer by layer from its DCP files."""

    def __init__(self, path: Path, cfg: ModelConfig):
        from torch.distributed.checkpoint import FileSystemReader

        self.path, self.cfg = Path(path), cfg
        try:
            self.meta = FileSystemReader(str(self.path)).read_metadata().state_dict_metadata
        except Exception as e:
            raise ConversionError(f"{self.path}: cannot read the dist-checkpoint metadata ({e})") from None
        for name in megatron_names(cfg):
            key, layer = dist_key(name)
            want = megatron_shape(name, cfg) if layer is None else (cfg.num_layers,) + megatron_shape(name, cfg)
            md = self.meta.get(key)
            if md is None or not hasattr(md, "size"):
                raise ConversionError(f"{self.path}: tensor {key} (for {name}) is missing; not a checkpoint of "
                                      "this megalong.json model (or written by an incompatible megatron-core)")
            if tuple(md.size) != tuple(want):
                raise ConversionError(f"{self.path}: tensor {key} has shape {list(md.size)}, but megalong.json's "
                                      f"model implies {list(want)}")

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[dist_key(name)[0]].properties.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full tensors `names` (at most one per DCP key) in one DCP read."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        state, offsets, back = {}, {}, {}
        for name in names:
            key, layer = dist_key(name)
            shape = megatron_shape(name, self.cfg)
            if layer is None:
                state[key], offsets[key] = torch.empty(shape, dtype=self.dtype(name)), (0,) * len(shape)
            else:
                state[key] = torch.empty((1,) + shape, dtype=self.dtype(name))
                offsets[key] = (layer,) + (0,) * len(shape)
            back[name] = key
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, storage_reader=FileSystemReader(str(self.path)), planner=_slice_planner(offsets),
                         no_dist=True)
        except (Exception, CheckpointException) as e:
            raise ConversionError(f"{self.path}: reading {', '.join(names)} failed ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                                  "the checkpoint's files are incomplete or damaged") from None
        return {name: state[key].reshape(megatron_shape(name, self.cfg)) for name, key in back.items()}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) in file order, one layer in memory at a time."""
        yield EMBEDDING, self.read([EMBEDDING])[EMBEDDING]
        for i in range(self.cfg.num_layers):
            names = [n for n in megatron_names(self.cfg) if split_layer_name(n)[0] == i]
            yield from self.read(names).items()
        tail = [FINAL_NORM] + ([] if self.cfg.tie_embeddings else [OUTPUT])
        yield from self.read(tail).items()


# ------------------------------------------------------------------------------ logits
@torch.no_grad()
def model_logits(model, cfg: ModelConfig, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits [b, S, vocab] (padding stripped, float32) of `model` — this rank's pipeline stage — for
    `tokens` [b, S], each row one document at positions 0..S-1. Collective over the model-parallel
    ranks; returns the logits on the last pipeline stage and None elsewhere."""
    from megatron.core import parallel_state as mpu

    from megalong.attention.module import DocumentParams
    from megalong.data.batch import PackedSample, make_micro_batch

    b, S = tokens.shape
    mb = make_micro_batch([PackedSample(row.numpy(), np.ones(S), np.array([S])) for row in tokens])
    params = DocumentParams.for_micro_batch(mb)
    dtype = next(model.parameters()).dtype
    if not mpu.is_pipeline_first_stage():
        hidden = torch.empty(S, b, cfg.hidden_size, dtype=dtype)
        dist.recv(hidden, src=mpu.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(mb.tokens, mb.position_ids, None, packed_seq_params=params)
    if not mpu.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
        return None
    logits = out.float()
    tp = mpu.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=mpu.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :cfg.vocab_size]


def logits_on_rank0(model, cfg: ModelConfig, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """`model_logits` moved to global rank 0 (where reference models and printing live); None elsewhere.
    Collective over all ranks."""
    from megatron.core import parallel_state as mpu

    logits = model_logits(model, cfg, tokens)
    holder = logits is not None and mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return logits
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, holder)
    src, rank = flags.index(True), dist.get_rank()
    if src == 0:
        return logits if rank == 0 else None
    if rank == src:
        dist.send(logits.contiguous(), dst=0)
    elif rank == 0:
        logits = torch.empty(tokens.shape[0], tokens.shape[1], cfg.vocab_size)
        dist.recv(logits, src=src)
        return logits
    return None
