"""The constants of the planner's time and memory models, in one file a GPU benchmark can rewrite.

Defaults are stated guesses except where `measured` says otherwise. A benchmark on a lent GPU
writes a JSON with the keys it measured (any subset of the fields below) and names them in
`measured`; `megalong plan --calibration that.json` then uses it. JSON is read through the one
config loader (JSON is YAML), so a misspelt key fails with the key's name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megalong.config import load_config, to_dict

# Useful (causal, document-masked) fwd+bwd TF/s of each attention backend on one H100, GQA 32/8, head
# dim 128, bf16 — DESIGN §5, measured on the lent H100 on 2026-11-23: cuDNN frontend 489–533 (500
# taken), flex_attention 384–390, varlen_attn 305–330. "te" and "flash_attn" are NOT measured: TE's
# fused attention runs cuDNN, so it is set equal to "cudnn"; flash_attn is set to varlen's figure.
ATTENTION_TFLOPS_H100 = {"cudnn": 500.0, "te": 500.0, "flex": 385.0, "varlen": 315.0, "flash_attn": 315.0}
MEASURED_BY_DEFAULT = ["attention_tflops.cudnn", "attention_tflops.flex", "attention_tflops.varlen"]


@dataclass
class Calibration:
    """Model constants. Rates are for `gpu`; planning another GPU scales TF/s by the peak ratio."""

    gpu: str = "h100"
    # achieved fraction of dense bf16 peak for the layers' and LM head's GEMMs (unmeasured guess)
    matmul_efficiency: float = 0.70
    # useful attention TF/s per backend (see ATTENTION_TFLOPS_H100 for what is measured)
    attention_tflops: dict[str, float] = field(default_factory=lambda: dict(ATTENTION_TFLOPS_H100))
    # norms, RoPE, SwiGLU, residual adds, cross-entropy: time as a fraction of GEMM time (unmeasured)
    elementwise_overhead: float = 0.15
    # achieved fraction of the NVLink / InfiniBand datasheet bandwidth by NCCL collectives
    comm_efficiency: float = 0.70
    # fraction of one micro-batch's time that hides the data-parallel reduce-scatter/all-gather
    dp_overlap: float = 0.8
    # per optimizer step: data loading, logging, launch gaps (seconds)
    step_overhead_s: float = 0.05
    # per GPU, outside the model: CUDA context, NCCL buffers, allocator slack (GiB)
    fixed_memory_gib: float = 3.0
    # multiplies the activation estimate (set from measured peak / predicted peak)
    activation_factor: float = 1.0
    measured: list[str] = field(default_factory=lambda: list(MEASURED_BY_DEFAULT))
    source: str = ("defaults in megalong/plan/calibration.py; attention rates from DESIGN §5 "
                   "(lent H100, 2026-11-23); everything else unmeasured")

    def unmeasured(self) -> list[str]:
        names = ["matmul_efficiency", "elementwise_overhead", "comm_efficiency", "dp_overlap",
                 "step_overhead_s", "fixed_memory_gib", "activation_factor"]
        names += [f"attention_tflops.{k}" for k in sorted(self.attention_tflops)]
        return [n for n in names if n not in self.measured]

    def validate(self) -> "Calibration":
        for name in ("matmul_efficiency", "comm_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"calibration.{name}={v}: must be in (0, 1]")
        if not 0 <= self.dp_overlap <= 1:
            raise ValueError(f"calibration.dp_overlap={self.dp_overlap}: must be in [0, 1]")
        for k, v in self.attention_tflops.items():
            if v <= 0:
                raise ValueError(f"calibration.attention_tflops.{k}={v}: must be positive")
        if self.activation_factor <= 0 or self.fixed_memory_gib < 0:
            raise ValueError("calibration.activation_factor must be > 0 and fixed_memory_gib ≥ 0")
        return self


def load_calibration(path: str | Path | None = None) -> Calibration:
    """Defaults, overridden by the keys in `path` (JSON or YAML). Missing attention backends keep
    their default rates."""
    cal = load_config(Calibration, path) if path is not None else Calibration()
    if path is not None:
        merged = dict(ATTENTION_TFLOPS_H100) if cal.gpu == "h100" else {}
        merged.update(cal.attention_tflops)
        cal.attention_tflops = merged
    try:
        return cal.validate()
    except ValueError as e:
        raise ValueError(f"{path or 'default calibration'}: {e}") from None


def save_calibration(cal: Calibration, path: str | Path) -> None:
    """Writes the file a GPU benchmark produces (all fields, so it documents itself)."""
    Path(path).write_text(json.dumps(to_dict(cal.validate()), indent=2) + "\n")
