"""Checkpoints: megatron-core dist_checkpointing (reshardable across TP/PP/DP) plus megalong run state.

Layout of a checkpoint root:
    root/iter_0000100/            dist_checkpointing files (model, optionally optimizer)
    root/iter_0000100/megalong.json   step, model config, resolved run config, run state, layout
    root/iter_0000100/rng/rank{r}.pt  per-rank RNG states (for bit-exact resume)
    root/latest                   text: the name of the newest *complete* iteration directory

A save writes into `iter_X.tmp`, renames it when every rank has finished, and only then moves
`latest` (write-to-temp + rename), so a crash mid-save leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megalong.model.layout import unwrap
from megalong.runtime import cpu_shim

FORMAT_VERSION = 1
META = "megalong.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under `root` (or `root` itself if it is one), else None."""
    root = Path(root)
    if (root / META).is_file():
        return root
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / META).is_file() else None


def read_meta(path: str | Path) -> dict:
    path = latest_checkpoint(path)
    if path is None:
        raise FileNotFoundError(f"no complete megalong checkpoint at {path}: expected {META} or a 'latest' pointer")
    return json.loads((path / META).read_text())


def model_config_from_checkpoint(path: str | Path):
    from megalong.config import from_dict
    from megalong.model.config import ModelConfig

    return from_dict(ModelConfig, read_meta(path)["model"], f"{path}/{META}:model")


def _model_sharded_state(model_chunks) -> dict:
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


# Reshardable across TP/PP/DP (the default format of 0.16 cannot even be saved on CPU).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizer_state(optimizer, model_state: dict, is_loading: bool):
    from megalong.runtime.compat import call_with_supported

    model_sd = model_state["model"] if "model" in model_state else model_state
    if is_loading:
        from megalong.runtime.compat import prepare_optimizer_for_load
        prepare_optimizer_for_load(optimizer)
    return call_with_supported(optimizer.sharded_state_dict, model_sd, is_loading=is_loading,
                               metadata=dict(_OPTIMIZER_METADATA))


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": _tracker_states()}


def _tracker_states():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | Path, step: int, model_chunks: Sequence[torch.nn.Module], model_cfg, *,
                    optimizer=None, scheduler=None, run_state: Optional[dict] = None,
                    resolved_config: Optional[dict] = None, keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory."""
    from megatron.core import dist_checkpointing

    from megalong.config import to_dict
    from megalong.runtime.distributed import current_parallel_state

    cpu_shim.prepare_checkpoint_writer()
    root = Path(root)
    final = iteration_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
    _barrier()
    state = _model_sharded_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(optimizer, state, is_loading=False)
    dist_checkpointing.save(state, str(tmp))
    torch.save(_rng_state(), tmp / "rng" / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        ps = current_parallel_state() if dist.is_initialized() else None
        meta = {
            "format": FORMAT_VERSION, "step": step, "model": to_dict(model_cfg),
            "run_state": run_state or {}, "config": resolved_config or {},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "has_optimizer": optimizer is not None,
            "parallel": None if ps is None else {"tp": ps.tp, "pp": ps.pp, "cp": ps.cp, "dp": ps.dp,
                                                  "world_size": ps.world_size},
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / META).is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model_chunks: Sequence[torch.nn.Module], *, optimizer=None,
                    scheduler=None, restore_rng: bool = False) -> dict:
    """Collective. Loads weights (any TP/PP layout), and optimizer/scheduler/RNG when given; returns meta."""
    from megatron.core import dist_checkpointing

    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete megalong checkpoint (no {META}, no 'latest' pointer); "
                                "check the path or start without train.init_from/resume")
    meta = json.loads((found / META).read_text())
    if optimizer is not None and not meta.get("has_optimizer"):
        raise ValueError(f"{found} holds weights only (no optimizer state): start from it with "
                         "train.init_from, not resume")
    template = _model_sharded_state(model_chunks)
    if optimizer is not None:
        template["optimizer"] = _optimizer_state(optimizer, template, is_loading=True)
    loaded = dist_checkpointing.load(template, str(found))
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=False)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=False)
    if optimizer is not None:
        from megalong.runtime.compat import unshare_adam_steps

        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = found / "rng" / f"rank{_rank()}.pt"
    if restore_rng and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    meta["path"] = str(found)
    return meta
