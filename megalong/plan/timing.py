"""Step time of one layout: compute at calibrated rates, communication at link bandwidth, bubbles.

Per micro-batch on the slowest pipeline stage (the last: it also runs the LM head):

    matmul    = tokens·6·(N_layers_stage + [V·d on the last stage]) / TP / (peak · matmul_efficiency)
    attention = tokens·6·layers_stage·H·d_head·L_eff / TP / attention_TF/s[backend]
    recompute = full: +1/3 of layer matmul and attention; selective (core_attn): +1/3 of attention;
                always +1/3 of the LM head (megalong's chunked cross-entropy recomputes its logits)
    other     = elementwise_overhead · (matmul + its recomputed part): norms, RoPE, SwiGLU, adds scale
                with tokens·d like the GEMMs, not with the attention's L_eff
    TP comm   = per layer 10 collectives (SP: fwd 2 all-gather + 2 reduce-scatter, bwd 6; +4 under
                full recompute) of (TP-1)/TP · tokens·d·a bytes
    CP comm   = all-gather: K/V gathered forward, reduce-scattered backward (+1 gather when the
                attention is recomputed); a2a: Q/K/V and the output exchanged over heads, fwd and bwd
    PP p2p    = activations forward + gradients backward, tokens·d/SP·a each

with tokens = micro_batch·S/CP per rank. Then

    step = (m + PP − 1) · t_micro_batch + max(0, t_DP − dp_overlap·t_micro_batch) + t_optimizer + overhead

where m = grad_accum, t_DP = reduce-scatter of fp32 gradients + all-gather of bf16 weights over
DP·CP ranks. A group runs over NVLink when its ranks fit in one node (megatron's rank order
tp-cp-dp-pp), otherwise over InfiniBand; links deliver `comm_efficiency` of their datasheet rate.
Nothing overlaps with compute except the DP traffic: megalong's TP and CP collectives are blocking.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megalong.plan.calibration import Calibration
from megalong.plan.flops import flops_per_token
from megalong.plan.memory import Layout, MemoryOptions, stage_params, state_bytes_per_param
from megalong.plan.shapes import GpuSpec, ModelShape, as_shape, get_gpu


@dataclass
class TimeBreakdown:
    """Seconds per optimizer step (compute parts summed over the step's micro-batches)."""

    matmul: float
    attention: float
    recompute: float
    elementwise: float
    tp_comm: float
    cp_comm: float
    pp_p2p: float
    bubble: float
    dp_exposed: float
    optimizer: float
    overhead: float
    tokens_per_s_per_gpu: float = 0.0
    mfu: float = 0.0
    notes: list[str] = field(default_factory=list)

    PARTS = ("matmul", "attention", "recompute", "elementwise", "tp_comm", "cp_comm", "pp_p2p", "bubble",
             "dp_exposed", "optimizer", "overhead")

    @property
    def step(self) -> float:
        return sum(getattr(self, p) for p in self.PARTS)

    def shares(self) -> dict[str, float]:
        total = self.step
        return {p: getattr(self, p) / total for p in self.PARTS}


def attention_rate(cal: Calibration, gpu: GpuSpec, backend: str) -> tuple[float, Optional[str]]:
    """Attention TF/s for `backend` on `gpu`; scaled by the peak ratio when calibrated on another card."""
    if backend not in cal.attention_tflops:
        raise ValueError(f"no attention rate for backend {backend!r}; calibrated backends: "
                         f"{', '.join(sorted(cal.attention_tflops))}")
    rate = cal.attention_tflops[backend]
    if cal.gpu == gpu.name:
        return rate, None
    ref = get_gpu(cal.gpu)
    if ref.peak_tflops == gpu.peak_tflops:
        return rate, f"attention rate calibrated on {cal.gpu}, used as is for {gpu.name} (same bf16 peak)"
    return rate * gpu.peak_tflops / ref.peak_tflops, (
        f"attention rate scaled from {cal.gpu} by peak ratio ({gpu.peak_tflops:g}/{ref.peak_tflops:g})")


def _bandwidth(span: int, gpus_per_node: int, gpu: GpuSpec, cal: Calibration) -> float:
    """Bytes/s for a group whose ranks span `span` consecutive GPUs."""
    gbps = gpu.nvlink_gbps if span <= gpus_per_node else gpu.ib_gbps
    return gbps * 1e9 * cal.comm_efficiency


def step_time(model, layout: Layout, seq_len: int, global_batch_tokens: int, *, l_eff: Optional[float] = None,
              gpu: str | GpuSpec = "h100", gpus_per_node: int = 8, attention_backend: str = "cudnn",
              calibration: Optional[Calibration] = None,
              options: MemoryOptions = MemoryOptions()) -> TimeBreakdown:
    """Predicted time of one optimizer step of `global_batch_tokens` tokens (see module docstring)."""
    shape: ModelShape = as_shape(model)
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    cal = calibration or Calibration()
    l_eff = float(min(l_eff or seq_len, seq_len))
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    a = 4 if options.precision == "fp32" else 2
    sp = tp if options.sequence_parallel else 1
    tokens = layout.micro_batch * seq_len / cp
    layers = shape.n_layers // pp
    d, V = shape.d_model, shape.vocab
    notes: list[str] = []

    # --- compute on the last stage (layers + LM head) for one micro-batch
    matmul_rate = gpu.peak_tflops * 1e12 * cal.matmul_efficiency
    attn_tflops, note = attention_rate(cal, gpu, attention_backend)
    if note:
        notes.append(note)
    attn_rate = attn_tflops * 1e12
    layer_mm = tokens * 6 * shape.layer_matmul_params * layers / tp / matmul_rate
    head_mm = tokens * 6 * V * d / tp / matmul_rate
    attn = tokens * 6 * layers * shape.n_heads * shape.d_head * l_eff / tp / attn_rate
    recompute_mm = head_mm / 3 + (layer_mm / 3 if layout.recompute == "full" else 0.0)
    recompute = recompute_mm + (attn / 3 if layout.recompute in ("full", "selective") else 0.0)
    matmul = layer_mm + head_mm
    other = cal.elementwise_overhead * (matmul + recompute_mm)

    # --- communication for one micro-batch
    tp_comm = 0.0
    if tp > 1:
        n_ops = 10 + (4 if layout.recompute == "full" else 0)
        tp_bw = _bandwidth(tp, gpus_per_node, gpu, cal)
        tp_comm = layers * n_ops * (tp - 1) / tp * tokens * d * a / tp_bw
    cp_comm = 0.0
    if cp > 1:
        cp_bw = _bandwidth(tp * cp, gpus_per_node, gpu, cal)
        again = layout.recompute in ("full", "selective")
        if layout.cp_comm == "allgather":
            gathered = layout.micro_batch * seq_len * 2 * shape.kv_dim / tp * a
            per_layer = (2 + again) * (cp - 1) / cp * gathered / cp_bw
        else:
            local = tokens * (2 * shape.q_dim + 2 * shape.kv_dim) / tp * a
            per_layer = (2 + again) * (cp - 1) / cp * local / cp_bw
        cp_comm = layers * per_layer
    pp_p2p = 0.0
    if pp > 1:
        pp_p2p = 2 * tokens * d / sp * a / _bandwidth(layout.world, gpus_per_node, gpu, cal)

    t_mb = matmul + attn + recompute + other + tp_comm + cp_comm + pp_p2p
    m = layout.grad_accum

    # --- once per step: gradient/weight traffic over DP·CP, optimizer update
    shards = dp * cp
    params = max(stage_params(shape, tp, pp, s) for s in range(pp))
    w_b, g_b, _ = state_bytes_per_param(options, shards)
    t_dp = 0.0
    if shards > 1:
        dp_bw = _bandwidth(tp * cp * dp, gpus_per_node, gpu, cal)
        factor = (w_b + g_b) if options.distributed_optimizer else 2 * g_b  # RS + AG, or all-reduce
        t_dp = (shards - 1) / shards * params * factor / dp_bw
    dp_exposed = max(0.0, t_dp - cal.dp_overlap * t_mb)
    opt_bytes = params * (30.0 / (shards if options.distributed_optimizer else 1) + 2 * g_b)
    optimizer = opt_bytes / (gpu.hbm_tbps * 1e12)

    bd = TimeBreakdown(matmul=m * matmul, attention=m * attn, recompute=m * recompute, elementwise=m * other,
                       tp_comm=m * tp_comm, cp_comm=m * cp_comm, pp_p2p=m * pp_p2p, bubble=(pp - 1) * t_mb,
                       dp_exposed=dp_exposed, optimizer=optimizer, overhead=cal.step_overhead_s, notes=notes)
    bd.tokens_per_s_per_gpu = global_batch_tokens / (bd.step * layout.world)
    bd.mfu = flops_per_token(shape, l_eff) * bd.tokens_per_s_per_gpu / (gpu.peak_tflops * 1e12)
    return bd

