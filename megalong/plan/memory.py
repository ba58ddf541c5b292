"""Peak memory per GPU for one parallel layout: weights, gradients, optimizer states, activations.

The model follows what megatron-core plus megalong's modules keep alive during a training step:

* **States** (per parameter on the GPU): bf16 weights 2 B + fp32 gradient buffer 4 B
  (`grad_reduce_in_fp32`) + fp32 main weights, Adam m and v 12 B. The distributed optimizer shards
  the 12 B over the data-parallel group *with* context parallelism (DP·CP ranks): 6 + 12/(DP·CP)
  bytes per parameter. fp32 training: 4 + 4 + 8/(DP·CP).
* **Activations** saved for backward, per token of one layer (a = bytes per activation element,
  d model width, q/kv projection widths, f FFN width, H heads; TP shards everything, sequence
  parallelism also shards the d-wide tensors):
    none:      a·(4d/sp + (2q + 2kv + 3f)/tp) + 4H/tp   (norm ins/outs; q, k, v, attention out;
               SwiGLU gate+up and product; fp32 log-sum-exp of the fused attention kernel)
    selective: megatron's core_attn recompute — drops the log-sum-exp and, with all-gather CP, the
               gathered K/V (keeps the local ones); costs one attention forward again
    full:      a·d/sp per layer (the layer input; recompute_granularity=full, uniform, 1 layer)
  With all-gather CP (megalong's `context_parallel.py`) each rank keeps the K/V its zigzag chunks
  attend to — up to the whole sequence — counted exactly by `cp_key_tokens`. All-to-all CP keeps
  S × heads/CP, the same bytes as the local-token count.
* **1F1B pipeline**: stage s holds min(PP − s, micro-batches) micro-batches of its layers' activations.
* **Transient**: one layer's backward working set (gradients of its activations, fp32 dQ
  accumulator; under full recompute also the recomputed layer), or the chunked cross-entropy's
  logits chunk on the last stage (bf16 + fp32 logits, fp32 softmax and gradient: (a + 12) B per
  chunk-token per vocab/TP entry), whichever is larger.
* **Fixed**: CUDA context, NCCL buffers, allocator slack (`calibration.fixed_memory_gib`).

`predict_peak_bytes` is the function to compare with a measured peak (GPU, or CPU for the tiny
model with precision="fp32" and fixed_bytes=0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megalong.plan.calibration import Calibration
from megalong.plan.shapes import ModelShape, as_shape

GIB = 1024 ** 3
RECOMPUTE_MODES = ("none", "selective", "full")
CP_COMMS = ("allgather", "a2a")


@dataclass(frozen=True)
class Layout:
    """One way to run a training step: parallel sizes, micro-batching, recomputation."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch: int = 1  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step on each DP rank
    recompute: str = "none"  # none | selective (core_attn) | full
    cp_comm: str = "allgather"  # allgather (megalong's K/V all-gather) | a2a (Ulysses, over heads)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}"


@dataclass(frozen=True)
class MemoryOptions:
    """Numerics and features that change bytes, not the layout."""

    precision: str = "bf16"  # bf16 (fp32 main weights in the optimizer) | fp32
    grad_reduce_in_fp32: bool = True  # fp32 gradient buffer (megatron's recommended bf16 setting)
    distributed_optimizer: bool = True
    sequence_parallel: bool = True  # with TP > 1 (megatron's standard; shards the d-wide tensors)
    loss_chunk_tokens: int = 2048  # megalong's chunked cross-entropy (ModelConfig.loss_chunk_tokens)


@dataclass
class MemoryBreakdown:
    """Bytes on the GPU of the pipeline stage with the highest peak."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # saved for backward, all in-flight micro-batches
    transient: float  # the largest short-lived working set during backward
    fixed: float
    stage: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.transient + self.fixed

    def gib(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GIB, 3) for k in
                ("weights", "grads", "optimizer", "activations", "transient", "fixed", "total")}


def state_bytes_per_param(options: MemoryOptions, shards: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per parameter; the optimizer part is divided over
    `shards` = DP·CP ranks when the distributed optimizer is on."""
    n = shards if options.distributed_optimizer else 1
    if options.precision == "fp32":
        return 4.0, 4.0, 8.0 / n  # Adam m, v; the fp32 weights are the main weights
    if options.precision != "bf16":
        raise ValueError(f"precision={options.precision!r}: use bf16 or fp32")
    return 2.0, (4.0 if options.grad_reduce_in_fp32 else 2.0), 12.0 / n


def stage_params(shape: ModelShape, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one GPU of pipeline stage `stage` (vocabulary and matmuls sharded by TP).
    A tied embedding has a second copy on the last stage when PP > 1 (megatron's rule)."""
    n = (shape.n_layers // pp) * (shape.layer_matmul_params / tp + shape.layer_norm_params)
    if stage == 0:
        n += shape.embedding_params / tp
    if stage == pp - 1:
        head = shape.vocab * shape.d_model if (not shape.tied_embeddings or pp > 1) else 0
        n += head / tp + shape.d_model
    return n


def cp_key_tokens(seq_len: int, cp: int, doc_len: int) -> int:
    """Keys one CP rank keeps for backward under all-gather CP (the max over ranks): each of its two
    zigzag chunks [a, e) needs keys from the start of the document containing `a` up to `e`, with
    documents of `doc_len` tokens tiling the sequence."""
    if cp <= 1:
        return seq_len
    c = seq_len // (2 * cp)
    doc_len = max(1, int(doc_len))
    worst = 0
    for rank in range(cp):
        keys = 0
        for chunk in (rank, 2 * cp - 1 - rank):
            a, e = chunk * c, (chunk + 1) * c
            keys += e - (a // doc_len) * doc_len
        worst = max(worst, keys)
    return worst


def _layer_bytes(shape: ModelShape, layout: Layout, seq_len: int, doc_len: int, a: int, sp: int):
    """(saved-for-backward bytes, backward working-set bytes) of one layer for one micro-batch."""
    tp, b = layout.tp, layout.micro_batch
    tokens = b * seq_len / layout.cp
    d, q, kv, f, h = shape.d_model, shape.q_dim, shape.kv_dim, shape.d_ffn, shape.n_heads
    local_kv = tokens * a * 2 * kv / tp
    if layout.cp > 1 and layout.cp_comm == "allgather":
        kept_kv = b * cp_key_tokens(seq_len, layout.cp, doc_len) * a * 2 * kv / tp
    else:
        kept_kv = local_kv
    lse = tokens * 4 * h / tp
    base = tokens * a * (4 * d / sp + (2 * q + 3 * f) / tp)
    full_layer = base + kept_kv + lse
    working = tokens * a * (2 * d / sp + (3 * f + q) / tp) + tokens * 4 * q / tp + kept_kv
    if layout.recompute == "none":
        return full_layer, working
    if layout.recompute == "selective":
        return base + local_kv, working + (kept_kv - local_kv) + lse
    if layout.recompute == "full":
        return tokens * a * d / sp, working + full_layer
    raise ValueError(f"recompute={layout.recompute!r}: use one of {', '.join(RECOMPUTE_MODES)}")


def memory_breakdown(model, layout: Layout, seq_len: int, *, l_eff: Optional[float] = None,
                     options: MemoryOptions = MemoryOptions(), calibration: Optional[Calibration] = None,
                     fixed_bytes: Optional[float] = None) -> MemoryBreakdown:
    """Peak memory of the worst pipeline stage. `l_eff` (default: seq_len, one document per
    sequence) sets how far keys reach under all-gather CP."""
    shape = as_shape(model)
    cal = calibration or Calibration()
    if layout.cp_comm not in CP_COMMS:
        raise ValueError(f"cp_comm={layout.cp_comm!r}: use one of {', '.join(CP_COMMS)}")
    if shape.n_layers % layout.pp:
        raise ValueError(f"{shape.name}: {shape.n_layers} layers do not split into PP={layout.pp} stages")
    a = 4 if options.precision == "fp32" else 2
    sp = layout.tp if options.sequence_parallel else 1
    doc_len = int(min(l_eff or seq_len, seq_len))
    w_b, g_b, o_b = state_bytes_per_param(options, layout.dp * layout.cp)
    saved, working = _layer_bytes(shape, layout, seq_len, doc_len, a, sp)
    tokens = layout.micro_batch * seq_len / layout.cp
    head_saved = tokens * (a * shape.d_model / sp + a * shape.d_model / sp + 4)  # final-norm in, head in, CE
    chunk = min(options.loss_chunk_tokens, tokens)
    head_working = chunk * shape.vocab / layout.tp * (a + 12) + tokens * a * shape.d_model
    fixed = cal.fixed_memory_gib * GIB if fixed_bytes is None else fixed_bytes
    layers = shape.n_layers // layout.pp
    best: Optional[MemoryBreakdown] = None
    for stage in range(layout.pp):
        in_flight = max(1, min(layout.pp - stage, layout.grad_accum))
        last = stage == layout.pp - 1
        acts = in_flight * (layers * saved + (head_saved if last else 0.0))
        trans = max(working, head_working if last else 0.0)
        n = stage_params(shape, layout.tp, layout.pp, stage)
        mb = MemoryBreakdown(weights=n * w_b, grads=n * g_b, optimizer=n * o_b,
                             activations=acts * cal.activation_factor, transient=trans * cal.activation_factor,
                             fixed=fixed, stage=stage)
        if best is None or mb.total > best.total:
            best = mb
    assert best is not None
    if layout.cp > 1 and layout.cp_comm == "allgather" and layout.recompute == "none":
        kept = cp_key_tokens(seq_len, layout.cp, doc_len)
        best.notes.append(f"all-gather CP keeps K/V of {kept:,} of {seq_len:,} tokens per layer for backward")
    return best


def predict_peak_bytes(model, layout: Layout, seq_len: int, *, l_eff: Optional[float] = None,
                       options: MemoryOptions = MemoryOptions(), calibration: Optional[Calibration] = None,
                       fixed_bytes: Optional[float] = None) -> float:
    """Predicted peak bytes on the busiest GPU — compare with torch.cuda.max_memory_allocated (pass
    fixed_bytes=0 to leave out context/NCCL/allocator slack) or a CPU peak for the tiny model."""
    return memory_breakdown(model, layout, seq_len, l_eff=l_eff, options=options, calibration=calibration,
                            fixed_bytes=fixed_bytes).total
