"""Document-masked attention benchmark: speed, peak memory and correctness of every backend.

For each backend (megalong/attention/backends.py) it first checks outputs and gradients against
the exact `reference` backend at a small size — uneven documents, and queries shorter than keys
(context parallelism) — then times forward and forward+backward on packed sequences of documents.

FLOPs are "useful" causal FLOPs inside documents. A segment with Lq queries over Lk keys
(bottom-right causal) has A = Lq·Lk − Lq²/2 visible (query, key) pairs, so
    forward  = 2 matmuls × 2·A·D·Hq            (= 2·Hq·D·L² for one document of length L)
    fwd+bwd  = 3 × forward = 6·Hq·D·ΣL²        (DESIGN §9: 6·n_heads·d_head·L_eff per token)
`tflops` uses that count. The FlashAttention papers count the backward as 2.5 × forward
(fwd+bwd = 3.5 × forward); that figure is printed as `tflops_fa` for comparison with them.

Examples:
    python benchmarks/attention.py                      # GPU: all available backends, full grid
    python benchmarks/attention.py --backends cudnn,flex --seq-lens 64K --doc-lens 8K
    python benchmarks/attention.py --smoke              # tiny CPU-sized run (reference, flex)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalong.attention import available_backends, get_attention_fn  # noqa: E402
from megalong.config import parse_int  # noqa: E402

FORMULA = ("forward = 4·Hq·D·Σ(Lq·Lk − Lq²/2) (= 2·Hq·D·ΣL² when Lq = Lk); "
           "fwd+bwd = 3 × forward (DESIGN §9); tflops_fa: fwd+bwd = 3.5 × forward (flash-attn)")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_doc_len(text: str):
    return None if text.strip().lower() in ("full", "one", "single") else parse_int(text)


def doc_lengths(total: int, mean, dist: str, rng: random.Random) -> list[int]:
    """Document lengths filling `total` tokens: equal lengths (plus a remainder) or uniform."""
    if mean is None or mean >= total:
        return [total]
    lens = []
    while sum(lens) < total:
        length = mean if dist == "equal" else rng.randint(max(1, mean // 4), 2 * mean - mean // 4)
        lens.append(min(length, total - sum(lens)))
    return lens


def cu_from(lens: list[int], device) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def forward_flops(lens_q, lens_k, h_q: int, d: int) -> float:
    return sum(4.0 * h_q * d * (lq * lk - lq * lq / 2.0) for lq, lk in zip(lens_q, lens_k))


def l_eff(lens) -> float:
    return sum(n * n for n in lens) / max(1, sum(lens))


# ---- timing helpers ----

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _repeat_ms(fn, device, warmup: int, iters: int, max_seconds: float) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times, budget = [], time.perf_counter() + max_seconds
    while len(times) < iters and (not times or time.perf_counter() < budget):
        times.append(_elapsed_ms(fn, device))
    return statistics.median(times)


def _inputs(t_q, t_k, args, dtype, device, requires_grad=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: 512K tokens are GiBs

    def make(t, h):
        x = torch.randn(t, h, args.head_dim, generator=g, device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)
    return make(t_q, args.heads), make(t_k, args.kv_heads), make(t_k, args.kv_heads)


# ---- correctness against the reference ----

def check_cases(tokens: int):
    """(name, lens_q, lens_k): uneven documents, then queries shorter than keys."""
    a, b = int(tokens * 0.45), int(tokens * 0.3)
    lens = [a, b, tokens - a - b]
    short = [lens[0] // 2, lens[1], max(1, lens[2] // 3)]
    return [("uneven documents", lens, lens), ("queries shorter than keys", short, lens)]


def check_backend(name, args, dtype, device) -> dict:
    fn, ref = get_attention_fn(name), get_attention_fn("reference")
    result = {"backend": name, "cases": [], "backward": "checked"}
    scale = 1.0 / math.sqrt(args.head_dim)
    for case, lens_q, lens_k in check_cases(args.check_tokens):
        cu_q, cu_k = cu_from(lens_q, device), cu_from(lens_k, device)
        q, k, v = _inputs(sum(lens_q), sum(lens_k), args, dtype, device, seed=1)
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
        out_ref = ref(qr, kr, vr, cu_q, cu_k, max(lens_q), max(lens_k), scale)
        out_ref.backward(grad.float())
        try:
            out = fn(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale)
            out.backward(grad)
            backward = True
        except NotImplementedError:  # e.g. flex on CPU: forward only
            with torch.no_grad():
                out = fn(q.detach(), k.detach(), v.detach(), cu_q, cu_k, max(lens_q), max(lens_k),
                         scale)
            backward, result["backward"] = False, "unsupported on this device"
        errors = {}
        pairs = [("out", out, out_ref)]
        if backward:
            pairs += [("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)]
        for label, got, want in pairs:
            diff = (got.float() - want).abs().max().item()
            errors[label] = {"max_abs": diff, "rel": diff / max(want.abs().max().item(), 1e-12)}
        result["cases"].append({"case": case, "lens_q": lens_q, "lens_k": lens_k, "errors": errors})
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    worst = max(e["rel"] for c in result["cases"] for e in c["errors"].values())
    result.update(worst_rel=worst, tolerance=tol, ok=bool(worst <= tol))
    return result


# ---- one timed configuration ----

def time_config(name, lens, args, dtype, device, backward_ok: bool) -> dict:
    fn = get_attention_fn(name)
    total = sum(lens)
    row = {"backend": name, "tokens": total, "docs": len(lens), "mean_doc": total / len(lens),
           "max_doc": max(lens), "l_eff": l_eff(lens), "fwd_ms": None, "fwd_bwd_ms": None,
           "tflops_fwd": None, "tflops": None, "tflops_fa": None, "peak_gib": None,
           "peak_extra_gib": None, "status": "ok"}
    cu = cu_from(lens, device)
    scale = 1.0 / math.sqrt(args.head_dim)
    try:
        q, k, v = _inputs(total, total, args, dtype, device, requires_grad=backward_ok)
        grad = torch.randn_like(q)

        def forward():
            with torch.set_grad_enabled(backward_ok):
                fn(q, k, v, cu, cu, max(lens), max(lens), scale)

        def forward_backward():
            q.grad = k.grad = v.grad = None
            fn(q, k, v, cu, cu, max(lens), max(lens), scale).backward(grad)

        flops = forward_flops(lens, lens, args.heads, args.head_dim)
        row["fwd_ms"] = _repeat_ms(forward, device, args.warmup, args.iters, args.max_seconds)
        row["tflops_fwd"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        if backward_ok:
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                forward_backward()
                _sync(device)
                peak = torch.cuda.max_memory_allocated(device)
                row["peak_gib"], row["peak_extra_gib"] = peak / 2**30, (peak - base) / 2**30
            row["fwd_bwd_ms"] = _repeat_ms(forward_backward, device, args.warmup, args.iters,
                                           args.max_seconds)
            seconds = row["fwd_bwd_ms"] * 1e-3
            row["tflops"] = 3.0 * flops / seconds / 1e12
            row["tflops_fa"] = 3.5 * flops / seconds / 1e12
        else:
            row["status"] = "ok (forward only: no backward on this device)"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except (RuntimeError, ValueError, NotImplementedError) as e:
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---- CLI ----

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="FLOP counting: " + FORMULA)
    p.add_argument("--backends", default="all",
                   help="comma-separated backend names, or 'all' for every backend available on the "
                        "device (default: all)")
    p.add_argument("--seq-lens", default=None,
                   help="comma-separated packed sequence lengths in tokens, K/M suffixes allowed "
                        "(default: 16K,64K,128K,512K; smoke: 256)")
    p.add_argument("--doc-lens", default=None,
                   help="comma-separated mean document lengths, or 'full' for one document "
                        "(default: 4K,8K,full; smoke: 64,full)")
    p.add_argument("--doc-dist", choices=["equal", "uniform"], default="equal",
                   help="document lengths: all equal to the mean (remainder last), or uniform in "
                        "[mean/4, 7·mean/4] (default: equal)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32; smoke 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8; smoke 2)")
    p.add_argument("--head-dim", type=int, default=None, help="head dimension (default 128; smoke 32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration "
                   "(default 2; smoke 1); the first call builds graphs / compiles kernels")
    p.add_argument("--iters", type=int, default=None, help="timed calls per configuration, median "
                   "reported (default 5; smoke 2)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a configuration after this many seconds (at least one call)")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="tokens in the correctness check against the reference (default 2048; "
                        "smoke 256)")
    p.add_argument("--json-out", default="attention_benchmark.json",
                   help="where to write the results as JSON (default: attention_benchmark.json)")
    p.add_argument("--seed", type=int, default=0, help="seed for uniform document lengths")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration that runs in seconds on a CPU (reference and flex)")
    return p


def resolve_args(args):
    smoke = args.smoke
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    device = torch.device(args.device)
    defaults = dict(seq_lens="256" if smoke else "16K,64K,128K,512K",
                    doc_lens="64,full" if smoke else "4K,8K,full",
                    heads=4 if smoke else 32, kv_heads=2 if smoke else 8,
                    head_dim=32 if smoke else 128, warmup=1 if smoke else 2,
                    iters=2 if smoke else 5, check_tokens=256 if smoke else 2048,
                    dtype="bf16" if device.type == "cuda" else "fp32")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.backends != "all":
        return device, [n.strip() for n in args.backends.split(",") if n.strip()]
    if smoke:  # the two backends that run everywhere
        return device, ["reference", "flex"]
    return device, available_backends(device)


def print_table(rows, correctness):
    print("\ncorrectness vs reference (worst relative max-abs error over out, dq, dk, dv):")
    for c in correctness:
        verdict = "ok" if c.get("ok") else "FAILED"
        print(f"  {c['backend']:<11} {verdict:<7} worst {c.get('worst_rel', float('nan')):.2e} "
              f"(tol {c.get('tolerance', float('nan')):.0e}); backward {c.get('backward')}"
              + (f"; {c['error']}" if c.get("error") else ""))
    header = (f"{'backend':<11}{'tokens':>8}{'docs':>6}{'doc len':>9}{'fwd ms':>10}{'f+b ms':>10}"
              f"{'TF/s':>10}{'TF/s fa':>10}{'peak GiB':>10}  status")
    print("\n" + header + "\n" + "-" * len(header))

    def fmt(x, width, spec):
        return format(x, f"{width}{spec}") if x is not None else format("-", f">{width}")
    for r in rows:
        print(f"{r['backend']:<11}{r['tokens']:>8}{r['docs']:>6}{r['mean_doc']:>9.0f}"
              f"{fmt(r['fwd_ms'], 10, '.2f')}{fmt(r['fwd_bwd_ms'], 10, '.2f')}"
              f"{fmt(r['tflops'], 10, '.3g')}{fmt(r['tflops_fa'], 10, '.3g')}"
              f"{fmt(r['peak_gib'], 10, '.2f')}  {r['status']}")
    print(f"\nFLOPs: {FORMULA}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device, names = resolve_args(args)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":  # one compiled flex kernel per shape: allow the whole grid
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    seq_lens = [parse_int(s) for s in args.seq_lens.split(",")]
    doc_lens = [parse_doc_len(s) for s in args.doc_lens.split(",")]
    rng = random.Random(args.seed)
    from tqdm import tqdm

    correctness, rows = [], []
    for name in names:
        try:
            correctness.append(check_backend(name, args, dtype, device))
        except Exception as e:  # report and go on: one broken backend must not hide the others
            correctness.append({"backend": name, "ok": False, "backward": "-",
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    configs = [(name, s, m) for name in names for s in seq_lens for m in doc_lens]
    for name, total, mean in tqdm(configs, desc="attention configs", unit="cfg"):
        check = next(c for c in correctness if c["backend"] == name)
        if not check.get("ok"):
            continue  # a wrong kernel's speed means nothing
        lens = doc_lengths(total, mean, args.doc_dist, rng)
        rows.append(time_config(name, lens, args, dtype, device,
                                backward_ok=check["backward"] == "checked"))
    print_table(rows, correctness)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu ({platform.processor() or platform.machine()}, "
                            f"{torch.get_num_threads()} threads)"),
            "torch": torch.__version__, "python": platform.python_version(),
            "cudnn_torch": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "doc_dist": args.doc_dist, "formula": FORMULA,
            "command": " ".join(sys.argv)}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "correctness": correctness, "rows": rows}, indent=1))
    print(f"wrote {out} ({len(rows)} rows, {sum(c.get('ok', False) for c in correctness)}/"
          f"{len(correctness)} backends correct)")
    return 0 if all(c.get("ok") for c in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
