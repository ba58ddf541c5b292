"""Enumerate parallel layouts, drop the invalid ones with a reason, rank the rest by predicted speed.

A layout is valid when (megatron-core + megalong rules):
  * TP divides the attention heads, the KV heads and the FFN width, and fits in one node (NVLink);
  * PP divides the layers; TP·PP·CP divides the GPU count (DP takes the rest);
  * CP: the sequence splits into 2·CP zigzag chunks (S % 2·CP == 0); all-to-all CP also needs the
    heads and KV heads left on a TP rank to divide by CP (Llama-3-8B: 8 KV heads → TP·CP ≤ 8);
  * the global batch (in tokens) is whole sequences that split evenly over DP ranks, and each
    micro-batch's tokens per CP rank split evenly over TP (sequence parallelism).
Valid layouts are ranked by predicted tokens/s among those whose predicted peak fits the GPU's
memory less a safety margin; the rest are reported with the reason they lost.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from megalong.plan.calibration import Calibration
from megalong.plan.memory import (CP_COMMS, GIB, RECOMPUTE_MODES, Layout, MemoryBreakdown, MemoryOptions,
                                  memory_breakdown)
from megalong.plan.shapes import ModelShape, get_gpu, get_model
from megalong.plan.timing import TimeBreakdown, step_time


@dataclass
class PlanRequest:
    """What to plan for. Sizes accept 64K / 512K / 4M (the config loader's integer syntax)."""

    model: str = "llama3_8b"
    seq_len: int = 65536
    l_eff: Optional[float] = None  # Σ L²/Σ L of the packed documents; None: one document per sequence
    gpu: str = "h100"
    gpus: int = 8
    gpus_per_node: int = 8
    global_batch_tokens: int = 4 * 1024 * 1024  # ProLong stage 1: 64 × 64K
    recompute: str = "auto"  # auto | none | selective | full
    cp_comm: str = "auto"  # auto | allgather | a2a
    attention_backend: str = "cudnn"
    memory_margin: float = 0.10  # keep this fraction of the GPU's memory free
    max_micro_batch: int = 8
    tp: Optional[int] = None  # fix a dimension instead of searching it
    pp: Optional[int] = None
    cp: Optional[int] = None
    precision: str = "bf16"
    sequence_parallel: bool = True
    distributed_optimizer: bool = True
    loss_chunk_tokens: int = 2048


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.time.tokens_per_s_per_gpu


@dataclass
class Rejection:
    layout: str
    reason: str  # a short key, e.g. "memory", "tp-heads"
    message: str


@dataclass
class Plan:
    request: PlanRequest
    shape: ModelShape
    l_eff: float
    budget_bytes: float
    ranked: list[Candidate]  # fit in memory, fastest first
    too_big: list[Candidate]  # valid but over budget, fastest first
    rejections: list[Rejection]
    calibration: Calibration
    explanation: list[str] = field(default_factory=list)

    @property
    def best(self) -> Optional[Candidate]:
        return self.ranked[0] if self.ranked else None


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_layout(shape: ModelShape, layout: Layout, seq_len: int, global_batch_tokens: int,
                 gpus_per_node: int) -> Optional[tuple[str, str]]:
    """(reason key, message) for the first rule `layout` breaks, or None when it is valid."""
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    if tp > gpus_per_node:
        return "tp-node", f"TP={tp} exceeds the {gpus_per_node} GPUs of a node (TP needs NVLink)"
    if shape.n_heads % tp or shape.n_kv_heads % tp:
        return "tp-heads", (f"TP={tp} does not divide {shape.n_heads} heads and {shape.n_kv_heads} KV heads")
    if shape.d_ffn % tp:
        return "tp-ffn", f"TP={tp} does not divide the FFN width {shape.d_ffn}"
    if shape.n_layers % pp:
        return "pp-layers", f"PP={pp} does not divide {shape.n_layers} layers"
    if seq_len % (2 * cp):
        return "cp-seq", f"sequence {seq_len} does not split into 2·CP={2 * cp} zigzag chunks"
    if layout.cp_comm == "a2a" and cp > 1 and ((shape.n_kv_heads // tp) % cp or (shape.n_heads // tp) % cp):
        return "cp-a2a-heads", (f"all-to-all CP={cp} needs the {shape.n_kv_heads // tp} KV heads per TP "
                                f"rank to divide by CP")
    if global_batch_tokens % seq_len:
        return "batch-seq", f"global batch {global_batch_tokens} tokens is not whole {seq_len}-token sequences"
    seqs = global_batch_tokens // seq_len
    if seqs % dp:
        return "batch-dp", f"{seqs} sequences per step do not split over DP={dp}"
    if (layout.micro_batch * seq_len // cp) % tp:
        return "sp-tokens", f"{layout.micro_batch * seq_len // cp} tokens per CP rank do not split over TP={tp}"
    return None


def _options(req: PlanRequest) -> MemoryOptions:
    return MemoryOptions(precision=req.precision, sequence_parallel=req.sequence_parallel,
                         distributed_optimizer=req.distributed_optimizer, loss_chunk_tokens=req.loss_chunk_tokens)


def validate_request(req: PlanRequest) -> None:
    """Clear errors for requests no layout could satisfy (before enumerating)."""
    get_model(req.model)
    get_gpu(req.gpu)
    if req.seq_len <= 0 or req.gpus <= 0 or req.gpus_per_node <= 0:
        raise ValueError("--seq-len, --gpus and --gpus-per-node must be positive")
    if req.gpus > req.gpus_per_node and req.gpus % req.gpus_per_node:
        raise ValueError(f"--gpus {req.gpus} is not a whole number of {req.gpus_per_node}-GPU nodes")
    if req.global_batch_tokens % req.seq_len:
        raise ValueError(f"--global-batch-tokens {req.global_batch_tokens} is not a multiple of --seq-len "
                         f"{req.seq_len}; use a whole number of sequences, e.g. "
                         f"{max(1, req.global_batch_tokens // req.seq_len) * req.seq_len}")
    if req.recompute not in ("auto",) + RECOMPUTE_MODES:
        raise ValueError(f"recompute={req.recompute!r}: use auto, {', '.join(RECOMPUTE_MODES)}")
    if req.cp_comm not in ("auto",) + CP_COMMS:
        raise ValueError(f"cp_comm={req.cp_comm!r}: use auto, {', '.join(CP_COMMS)}")
    if not 0 <= req.memory_margin < 1:
        raise ValueError(f"memory_margin={req.memory_margin}: use a fraction in [0, 1)")
    if req.l_eff is not None and req.l_eff <= 0:
        raise ValueError(f"l_eff={req.l_eff}: must be positive")
    for name in ("tp", "pp", "cp"):
        v = getattr(req, name)
        if v is not None and (v <= 0 or req.gpus % v):
            raise ValueError(f"--{name} {v} does not divide --gpus {req.gpus}")


def plan(req: PlanRequest, calibration: Optional[Calibration] = None) -> Plan:
    """All layouts for `req`, ranked; see the module docstring for the rules."""
    validate_request(req)
    shape, gpu, cal = get_model(req.model), get_gpu(req.gpu), calibration or Calibration()
    node = min(req.gpus_per_node, req.gpus)
    l_eff = float(min(req.l_eff or req.seq_len, req.seq_len))
    options = _options(req)
    budget = gpu.memory_gib * GIB * (1 - req.memory_margin)
    recomputes = RECOMPUTE_MODES if req.recompute == "auto" else (req.recompute,)
    comms = CP_COMMS if req.cp_comm == "auto" else (req.cp_comm,)
    seqs = req.global_batch_tokens // req.seq_len
    fits, too_big, rejections = [], [], []
    for tp in _divisors(req.gpus):
        for pp in _divisors(req.gpus // tp):
            for cp in _divisors(req.gpus // (tp * pp)):
                if any(getattr(req, k) not in (None, v) for k, v in (("tp", tp), ("pp", pp), ("cp", cp))):
                    continue
                dp = req.gpus // (tp * pp * cp)
                for comm in (comms if cp > 1 else ("allgather",)):
                    base = Layout(tp=tp, pp=pp, cp=cp, dp=dp, cp_comm=comm)
                    bad = check_layout(shape, base, req.seq_len, req.global_batch_tokens, node)
                    if bad and bad[0] != "sp-tokens":  # that rule depends on the micro-batch: checked below
                        rejections.append(Rejection(_name(base), *bad))
                        continue
                    per_rank = seqs // dp
                    for mb in [k for k in _divisors(per_rank) if k <= req.max_micro_batch]:
                        for rc in recomputes:
                            lay = Layout(tp=tp, pp=pp, cp=cp, dp=dp, micro_batch=mb, grad_accum=per_rank // mb,
                                         recompute=rc, cp_comm=comm)
                            bad = check_layout(shape, lay, req.seq_len, req.global_batch_tokens, node)
                            if bad:
                                rejections.append(Rejection(_name(lay), *bad))
                                continue
                            mem = memory_breakdown(shape, lay, req.seq_len, l_eff=l_eff, options=options,
                                                   calibration=cal)
                            t = step_time(shape, lay, req.seq_len, req.global_batch_tokens, l_eff=l_eff, gpu=gpu,
                                          gpus_per_node=node, attention_backend=req.attention_backend,
                                          calibration=cal, options=options)
                            cand = Candidate(lay, mem, t)
                            if mem.total <= budget:
                                fits.append(cand)
                            else:
                                too_big.append(cand)
                                rejections.append(Rejection(_name(lay), "memory",
                                                            f"needs {mem.total / GIB:.1f} GiB > budget "
                                                            f"{budget / GIB:.1f} GiB"))
    key = lambda c: (-c.tokens_per_s_per_gpu, c.memory.total, c.layout.tp * c.layout.pp * c.layout.cp)  # noqa: E731
    fits.sort(key=key)
    too_big.sort(key=key)
    result = Plan(req, shape, l_eff, budget, fits, too_big, rejections, cal)
    result.explanation = explain(result)
    return result


def _name(lay: Layout) -> str:
    comm = f" {lay.cp_comm}" if lay.cp > 1 else ""
    return f"{lay.label}{comm} mb{lay.micro_batch}×{lay.grad_accum} {lay.recompute}"


def _structure(lay: Layout) -> tuple:
    return (lay.tp, lay.pp, lay.cp)


PART_WORDS = {"matmul": "GEMMs", "attention": "attention", "recompute": "recomputation",
              "elementwise": "elementwise ops", "tp_comm": "TP collectives", "cp_comm": "CP K/V exchange",
              "pp_p2p": "pipeline sends", "bubble": "pipeline bubble", "dp_exposed": "exposed DP gradient sync",
              "optimizer": "optimizer update", "overhead": "per-step overhead"}


def explain(p: Plan) -> list[str]:
    """Why the best layout won: where its time goes, what the runner-up loses, what did not fit."""
    lines: list[str] = []
    best = p.best
    if best is None:
        if p.too_big:
            c = p.too_big[0]
            lines.append(f"No layout fits {p.budget_bytes / GIB:.1f} GiB per GPU; the fastest valid one, "
                         f"{_name(c.layout)}, needs {c.memory.total / GIB:.1f} GiB. Add GPUs, raise CP, "
                         "or use recompute=full.")
        else:
            lines.append("No valid layout: see the rejection reasons.")
        return lines
    t = best.time
    top = sorted(t.shares().items(), key=lambda kv: -kv[1])[:3]
    lines.append(f"Best: {_name(best.layout)} — {best.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU "
                 f"{t.mfu:.1%}, {best.memory.total / GIB:.1f} of {p.budget_bytes / GIB:.1f} GiB budget.")
    lines.append("Its step time goes to " + ", ".join(f"{PART_WORDS[k]} {v:.0%}" for k, v in top) + ".")
    other = next((c for c in p.ranked[1:] if _structure(c.layout) != _structure(best.layout)), None)
    if other is not None:
        gain = best.tokens_per_s_per_gpu / other.tokens_per_s_per_gpu - 1
        diffs = {k: getattr(other.time, k) - getattr(t, k) for k in t.PARTS}
        worst = max(diffs, key=diffs.get)
        lines.append(f"It beats the next different layout, {_name(other.layout)}, by {gain:.1%}: that one "
                     f"spends {diffs[worst]:.2f} s/step more on {PART_WORDS[worst]}.")
    faster = [c for c in p.too_big if c.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu]
    if faster:
        c = min(faster, key=lambda c: c.memory.total)
        lines.append(f"The leanest faster layout, {_name(c.layout)} ({c.tokens_per_s_per_gpu:,.0f} tokens/s/GPU), "
                     f"needs {c.memory.total / GIB:.1f} GiB: over the budget.")
    counts = Counter(r.reason for r in p.rejections)
    if counts:
        lines.append("Rejected: " + ", ".join(f"{n} × {k}" for k, n in counts.most_common()) + ".")
    lines.extend(t.notes + best.memory.notes)
    return lines
