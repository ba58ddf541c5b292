"""cuDNN SDPA on ragged (THD) tensors through `nvidia-cudnn-frontend` (`import cudnn`).

Why: measured on a lent H100 (DESIGN §5, 2026-11-23, frontend 1.32.0 over cuDNN 9.19, GQA 32/8,
hd128, bf16, fwd+bwd) this path ran document-masked attention at 489–533 TF/s, against 305–390 for
varlen_attn and flex_attention. The recipe that made it work, kept here:
- q/k/v/o stay THD buffers [T, H, D]; cuDNN sees them as dims (b, h, s_max, d) with BSHD strides
  (s_max·h·d, d, h·d, 1) plus INT64 ragged offsets (b+1, 1, 1, 1) in *elements*
  (cu_seqlens·h·d; K/V use their own head count); dO shares O's offsets;
- INT32 seq_len_q / seq_len_kv of shape (b, 1, 1, 1) with use_padding_mask=True;
- causal as diagonal_band_right_bound=0. Bottom-right alignment is per segment with the padding
  mask, so a query segment shorter than its key segment (context parallelism) is served; when all
  segments have Lq == Lk, TOP_LEFT (the measured configuration) is used — the two coincide there.
- a graph is built per (b, s_max, heads, dtype, …): the document count is rounded up to a power of
  two with zero-length padding segments (as Transformer Engine does) and s_max to a power-of-two
  multiple of 128, so a training run builds a handful of graphs, cached per process.
Softmax stats: on cuDNN >= 9.6 they are ragged too ([T, H] float32 with offsets cu_seqlens·h, as TE
does), so their memory does not grow with the bucketed b·s_max; set MEGALONG_CUDNN_RAGGED_STATS=0
for the dense (b, h, s_max, 1) layout measured in DESIGN §5.

Verified in this session (CPU only): bucketing and offset arithmetic, import safety, refusals.
Unverified here (no GPU): graph build, numerics, speed, the ragged-stats layout and BOTTOM_RIGHT
with Lq < Lk — `benchmarks/attention.py` checks each backend against the reference before timing.
"""
from __future__ import annotations

import importlib.util
import math
import os
import threading
from dataclasses import dataclass

import torch

from megalong.attention.checks import check_attention_inputs, require_cuda_half

MIN_BACKEND_VERSION = 90000  # ragged (THD) offsets need cuDNN 9
RAGGED_STATS_MIN_VERSION = 90600  # TE uses ragged stats from 9.6 on
LEN_QUANTUM = 128


def _cudnn():
    import cudnn  # the nvidia-cudnn-frontend package (absolute import, not this module)
    return cudnn


def available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("cudnn") is None:
        return False
    cudnn = _cudnn()
    if not hasattr(cudnn, "pygraph") or cudnn.backend_version() < MIN_BACKEND_VERSION:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 9  # ragged layouts: Hopper and newer


# ---- bucketing and offsets (pure tensor arithmetic, tested on CPU) ----

def bucket_count(n: int) -> int:
    """Segments are padded (with empty ones) to the next power of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_len(max_len: int) -> int:
    """Longest segment rounded up to a power-of-two multiple of 128."""
    tiles = max(1, -(-int(max_len) // LEN_QUANTUM))
    return LEN_QUANTUM * (1 << (tiles - 1).bit_length())


def round_tokens(t: int) -> int:
    """Token totals (the backward's max_total_seq_len) in 16 buckets per octave (<= 12.5% slack):
    with context parallelism the key count changes every micro-batch, graphs must not."""
    step = max(LEN_QUANTUM, 1 << max(0, (int(t) - 1).bit_length() - 4))
    return max(LEN_QUANTUM, -(-int(t) // step) * step)


def padded_cu(cu: torch.Tensor, b: int) -> torch.Tensor:
    """cu_seqlens extended to b+1 entries by repeating the total (zero-length segments), int64."""
    cu = cu.to(torch.int64)
    return torch.cat([cu, cu[-1:].expand(b + 1 - cu.numel())])


def ragged_offsets(cu: torch.Tensor, b: int, elems_per_token: int) -> torch.Tensor:
    """Start of each segment in elements, shape (b+1, 1, 1, 1) int64, as cuDNN wants it."""
    return (padded_cu(cu, b) * elems_per_token).view(b + 1, 1, 1, 1)


def seq_lens(cu: torch.Tensor, b: int) -> torch.Tensor:
    """Per-segment lengths padded with zeros, shape (b, 1, 1, 1) int32."""
    cu = padded_cu(cu, b)
    return (cu[1:] - cu[:-1]).to(torch.int32).view(b, 1, 1, 1)


# ---- graphs ----

@dataclass(frozen=True)
class GraphKey:
    device: int
    dtype: torch.dtype
    b: int
    s_q: int
    s_kv: int
    h_q: int
    h_kv: int
    d: int
    scale: float
    bottom_right: bool
    ragged_stats: bool
    t_q: int  # rounded token totals: max_total_seq_len for the backward
    t_kv: int


@dataclass
class _Graph:
    graph: object
    tensors: dict  # name -> graph tensor
    workspace: int


_lock = threading.Lock()
_graphs: dict = {}
_handles: dict = {}


def _handle(device: int):
    if device not in _handles:
        with torch.cuda.device(device):
            _handles[device] = _cudnn().create_handle()
    return _handles[device]


def _io_type(dtype: torch.dtype):
    dt = _cudnn().data_type
    return {torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF}[dtype]


def _strides(h: int, s: int, d: int):
    return [s * h * d, d, h * d, 1]  # BSHD strides over a THD buffer


def _new_graph(key: GraphKey):
    cudnn = _cudnn()
    g = cudnn.pygraph(io_data_type=_io_type(key.dtype),
                      intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=_handle(key.device))
    t = {}
    for name in ("off_q", "off_k", "off_v", "off_o") + (("off_s",) if key.ragged_stats else ()):
        t[name] = g.tensor(name=name, dim=[key.b + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                           data_type=cudnn.data_type.INT64)
    for name in ("seq_q", "seq_kv"):
        t[name] = g.tensor(name=name, dim=[key.b, 1, 1, 1], stride=[1, 1, 1, 1],
                           data_type=cudnn.data_type.INT32)
    for name, h, s, off in (("q", key.h_q, key.s_q, "off_q"), ("k", key.h_kv, key.s_kv, "off_k"),
                            ("v", key.h_kv, key.s_kv, "off_v")):
        t[name] = g.tensor(name=name, dim=[key.b, h, s, key.d], stride=_strides(h, s, key.d),
                           data_type=_io_type(key.dtype))
        t[name].set_ragged_offset(t[off])
    return cudnn, g, t


def _stats_layout(key: GraphKey, stats, t) -> None:
    dims = [key.b, key.h_q, key.s_q, 1]
    if key.ragged_stats:  # token-major [T, H] float32
        stats.set_dim(dims).set_stride([key.h_q * key.s_q, 1, key.h_q, 1])
        stats.set_ragged_offset(t["off_s"])
    else:
        stats.set_dim(dims).set_stride([key.h_q * key.s_q, key.s_q, 1, 1])


def _mask_kwargs(key: GraphKey):
    cudnn = _cudnn()
    align = (cudnn.diagonal_alignment.BOTTOM_RIGHT if key.bottom_right
             else cudnn.diagonal_alignment.TOP_LEFT)
    return dict(attn_scale=key.scale, use_padding_mask=True, diagonal_band_right_bound=0,
                diagonal_alignment=align)


def _finish(key: GraphKey, cudnn, g, t) -> _Graph:
    try:
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
    except Exception as e:  # not-supported, or a frontend/backend mismatch: say what and where
        raise RuntimeError(f"attention backend 'cudnn': building the cuDNN {cudnn.backend_version()} "
                           f"graph failed for {key}: {type(e).__name__}: {e} — choose "
                           "model.attention_backend=flex (or te)") from e
    return _Graph(g, t, int(g.get_workspace_size()))


def _build_forward(key: GraphKey) -> _Graph:
    cudnn, g, t = _new_graph(key)
    o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True,
                      seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], **_mask_kwargs(key))
    o.set_output(True).set_dim([key.b, key.h_q, key.s_q, key.d])
    o.set_stride(_strides(key.h_q, key.s_q, key.d)).set_ragged_offset(t["off_o"])
    stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
    _stats_layout(key, stats, t)
    t["o"], t["stats"] = o, stats
    return _finish(key, cudnn, g, t)


def _build_backward(key: GraphKey) -> _Graph:
    cudnn, g, t = _new_graph(key)
    for name in ("o", "dO"):
        t[name] = g.tensor(name=name, dim=[key.b, key.h_q, key.s_q, key.d],
                           stride=_strides(key.h_q, key.s_q, key.d), data_type=_io_type(key.dtype))
        t[name].set_ragged_offset(t["off_o"])
    t["stats"] = g.tensor(name="stats", dim=[key.b, key.h_q, key.s_q, 1], stride=[1, 1, 1, 1],
                          data_type=cudnn.data_type.FLOAT)
    _stats_layout(key, t["stats"], t)
    extra = {}
    if cudnn.backend_version() >= RAGGED_STATS_MIN_VERSION:
        extra = dict(max_total_seq_len_q=key.t_q, max_total_seq_len_kv=key.t_kv)
    dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"],
                                 dO=t["dO"], stats=t["stats"], seq_len_q=t["seq_q"],
                                 seq_len_kv=t["seq_kv"], **_mask_kwargs(key), **extra)
    for grad, src, h, s, off in ((dq, "q", key.h_q, key.s_q, "off_q"),
                                 (dk, "k", key.h_kv, key.s_kv, "off_k"),
                                 (dv, "v", key.h_kv, key.s_kv, "off_v")):
        grad.set_output(True).set_dim([key.b, h, s, key.d]).set_stride(_strides(h, s, key.d))
        grad.set_ragged_offset(t[off])
        t["d" + src] = grad
    return _finish(key, cudnn, g, t)


def _graph(kind: str, key: GraphKey) -> _Graph:
    with _lock:
        if (kind, key) not in _graphs:
            build = _build_forward if kind == "fwd" else _build_backward
            _graphs[(kind, key)] = build(key)
        return _graphs[(kind, key)]


def _execute(key: GraphKey, graph: _Graph, buffers: dict, device: torch.device) -> None:
    cudnn = _cudnn()
    handle = _handle(key.device)
    cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)
    workspace = torch.empty(max(graph.workspace, 1), dtype=torch.uint8, device=device)
    # Bare device addresses: cuDNN takes the geometry declared in the graph (a THD buffer is
    # smaller than its declared (b, h, s_max, d) extent; only the ragged offsets are read).
    pack = {graph.tensors[name]: buf.data_ptr() for name, buf in buffers.items()}
    graph.graph.execute(pack, workspace, handle=handle)


def _metadata(key: GraphKey, cu_q, cu_k):
    meta = {"seq_q": seq_lens(cu_q, key.b), "seq_kv": seq_lens(cu_k, key.b),
            "off_q": ragged_offsets(cu_q, key.b, key.h_q * key.d),
            "off_k": ragged_offsets(cu_k, key.b, key.h_kv * key.d)}
    meta["off_v"], meta["off_o"] = meta["off_k"], meta["off_q"]
    if key.ragged_stats:
        meta["off_s"] = ragged_offsets(cu_q, key.b, key.h_q)
    return meta


def _stats_buffer(key: GraphKey, device) -> torch.Tensor:
    if key.ragged_stats:  # rows for every (rounded) token, like TE's max_tokens
        return torch.empty(key.t_q, key.h_q, dtype=torch.float32, device=device)
    return torch.empty(key.b, key.h_q, key.s_q, 1, dtype=torch.float32, device=device)


class _RaggedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, key: GraphKey):
        meta = _metadata(key, cu_q, cu_k)
        o = torch.empty_like(q)
        stats = _stats_buffer(key, q.device)
        _execute(key, _graph("fwd", key), dict(meta, q=q, k=k, v=v, o=o, stats=stats), q.device)
        names = sorted(meta)
        ctx.key, ctx.meta_names = key, names
        ctx.save_for_backward(q, k, v, o, stats, *(meta[n] for n in names))
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, o, stats, *meta_values = ctx.saved_tensors
        meta = dict(zip(ctx.meta_names, meta_values))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        buffers = dict(meta, q=q, k=k, v=v, o=o, dO=grad_out.contiguous(), stats=stats,
                       dq=dq, dk=dk, dv=dv)
        _execute(ctx.key, _graph("bwd", ctx.key), buffers, q.device)
        return dq, dk, dv, None, None, None


def _ragged_stats_enabled() -> bool:
    if os.environ.get("MEGALONG_CUDNN_RAGGED_STATS", "1") == "0":
        return False
    return _cudnn().backend_version() >= RAGGED_STATS_MIN_VERSION


def cudnn_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                    softmax_scale=None):
    seg = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, backend="cudnn")
    require_cuda_half(q, backend="cudnn", kernel="cuDNN SDPA")
    d = q.shape[2]
    if d % 8 != 0 or d > 256:
        raise ValueError(f"attention backend 'cudnn': head_dim {d} — cuDNN SDPA needs a multiple of "
                         "8 up to 256; use attention backend flex")
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    key = GraphKey(device=index, dtype=q.dtype, b=bucket_count(seg.num),
                   s_q=bucket_len(seg.max_q), s_kv=bucket_len(seg.max_k),
                   h_q=q.shape[1], h_kv=k.shape[1], d=d,
                   scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d),
                   bottom_right=not seg.equal, ragged_stats=_ragged_stats_enabled(),
                   t_q=round_tokens(q.shape[0]), t_kv=round_tokens(k.shape[0]))
    return _RaggedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                  cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device), key)
