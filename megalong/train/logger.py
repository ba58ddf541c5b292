"""Metrics out of the trainer: one console line per log interval (rank 0), W&B, and a JSONL file.

W&B runs offline by default (`WANDB_MODE=offline`, files under `{save_dir}/wandb`; upload later
with `wandb sync`); `logging.wandb_mode: online` or `WANDB_MODE=online` in the environment sends
them live. The W&B run id is kept in `{save_dir}/wandb_run_id` so a resumed run continues the same
W&B run. Without wandb installed the trainer says so once and logs to the console (and JSONL).
"""
from __future__ import annotations

import json
import os
import resource
import secrets
from pathlib import Path
from typing import Any, Optional

import torch

from megalong.train.config import LoggingConfig


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def default_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU (megalong.plan's datasheet numbers); None on CPU/unknown."""
    if device.type != "cuda":
        return None
    from megalong.plan.shapes import GPUS

    name = torch.cuda.get_device_name(device).lower()
    for key, spec in GPUS.items():
        if key in name.replace("-", "").replace(" ", ""):
            return spec.peak_tflops
    return None


def format_line(m: dict) -> str:
    """`step 12/100 | stage1 | loss 4.1234 | lr 1.00e-05 | grad 0.812 | 52,310 tok/s | MFU 41.3% | ...`"""
    parts = [f"step {m['step']}/{m['steps']}", str(m.get("stage", ""))]
    if m.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    parts.append(f"loss {m['loss']:.4f}")
    if m.get("source_losses"):
        parts.append(" ".join(f"{k} {v:.3f}" for k, v in m["source_losses"].items()))
    parts.append(f"lr {m['lr']:.2e}")
    if m.get("grad_norm") is not None:
        parts.append(f"grad {m['grad_norm']:.3f}")
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"L_eff {m['l_eff']:,.0f}")
    parts.append(f"mem {m['memory_gib']:.2f} GiB")
    parts.append(f"{m['step_time_s']:.2f} s/step")
    return " | ".join(parts)


def format_eval_line(m: dict) -> str:
    """`eval step 20 | loss 3.8881 | by position 0-16 4.101 16-32 3.902 ... | by source a 3.9 ...`"""
    parts = [f"eval step {m['step']}", f"loss {m['loss']:.4f}"]
    if m.get("position_losses"):
        parts.append("by position " + " ".join(f"{k} {v:.3f}" for k, v in m["position_losses"].items()))
    if m.get("source_losses"):
        parts.append("by source " + " ".join(f"{k} {v:.3f}" for k, v in m["source_losses"].items()))
    parts.append(f"{m['tokens']:,} tokens")
    return " | ".join(parts)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so callers need no rank checks."""

    def __init__(self, cfg: LoggingConfig, save_dir: str | Path, run_config: dict, stage: str, active: bool):
        self.cfg, self.active = cfg, active
        self.save_dir = Path(save_dir)
        self.jsonl = self.save_dir / "metrics.jsonl" if (cfg.jsonl and active) else None
        self.wandb_run = None
        self.wandb_dir: Optional[str] = None
        if active and cfg.wandb:
            self._start_wandb(run_config, stage)

    def _start_wandb(self, run_config: dict, stage: str) -> None:
        try:
            import wandb
        except ImportError:
            print("megalong.train: wandb is not installed; logging to the console (and metrics.jsonl) only",
                  flush=True)
            return
        mode = os.environ.get("WANDB_MODE") or self.cfg.wandb_mode
        if mode == "disabled":
            return
        id_file = self.save_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.wandb_run = wandb.init(
            project=self.cfg.wandb_project, entity=self.cfg.wandb_entity, id=run_id, resume="allow",
            name=self.cfg.wandb_name or f"{stage}-{self.save_dir.name}", group=stage,
            tags=[stage, *self.cfg.wandb_tags], config=run_config, dir=str(self.save_dir), mode=mode)
        self.wandb_dir = str(Path(self.wandb_run.dir).parent)
        where = f"offline in {self.wandb_dir} (upload: wandb sync {self.wandb_dir})" if mode == "offline" \
            else f"online: {self.wandb_run.url}"
        print(f"megalong.train: W&B run {run_id} {where}", flush=True)

    def log(self, metrics: dict[str, Any], kind: str = "train") -> None:
        """One record: console line (train records), W&B under `{kind}/`, and JSONL."""
        if not self.active:
            return
        if kind == "train":
            print(format_line(metrics), flush=True)
        else:
            print(format_eval_line(metrics), flush=True)
        if self.wandb_run is not None:
            flat = _flatten(metrics, kind)
            self.wandb_run.log(flat, step=int(metrics["step"]))
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"kind": kind, **metrics}) + "\n")

    def note(self, text: str) -> None:
        if self.active:
            print(f"megalong.train: {text}", flush=True)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _flatten(metrics: dict, kind: str) -> dict:
    out = {}
    for k, v in metrics.items():
        if k in ("step", "stage"):
            continue
        if isinstance(v, dict):
            out.update({f"{kind}/{k}/{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            if v is not None:
                out[f"{kind}/{k}"] = v
    return out
