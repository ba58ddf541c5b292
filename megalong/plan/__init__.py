"""`megalong plan`: choose TP/PP/CP/DP, micro-batching and recomputation for long-context training.

Modules read in order: `shapes` (model and GPU numbers), `flops` (the one FLOP/MFU counter, also used
by the trainer), `calibration` (the models' constants, rewritable by a GPU benchmark), `memory` (peak
bytes per GPU), `timing` (step time), `planner` (enumerate, check, rank, explain), `cli`.
"""
from megalong.plan.calibration import Calibration, load_calibration, save_calibration
from megalong.plan.flops import flops_per_token, l_eff, l_eff_from_cu_seqlens, mfu, packed_l_eff
from megalong.plan.memory import Layout, MemoryOptions, memory_breakdown, predict_peak_bytes
from megalong.plan.planner import PlanRequest, check_layout, plan
from megalong.plan.shapes import GPUS, MODELS, GpuSpec, ModelShape, as_shape, get_gpu, get_model
from megalong.plan.timing import step_time

__all__ = [
    "Calibration", "load_calibration", "save_calibration", "flops_per_token", "l_eff", "l_eff_from_cu_seqlens",
    "mfu", "packed_l_eff", "Layout", "MemoryOptions", "memory_breakdown", "predict_peak_bytes", "PlanRequest",
    "check_layout", "plan", "GPUS", "MODELS", "GpuSpec", "ModelShape", "as_shape", "get_gpu", "get_model",
    "step_time",
]
