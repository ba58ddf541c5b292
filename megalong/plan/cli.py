"""`megalong plan`: recommend TP/PP/CP/DP, micro-batching and recomputation for a long-context run.

    python -m megalong.plan --model llama3_8b --seq-len 64K --gpus 32 --doc-len-mean 16K
    python -m megalong.plan --model llama3_8b --seq-len 512K --gpus 64 --global-batch-tokens 8M --json plan.json

Prints the top layouts (predicted memory per GPU, step time, tokens/s per GPU, causal-counted MFU)
and why the best one won. All figures are model predictions; see docs/planner.md for the equations
and which constants are measured.
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megalong.config import ConfigError, from_dict, to_dict
from megalong.plan.calibration import load_calibration
from megalong.plan.flops import packed_l_eff
from megalong.plan.memory import GIB, RECOMPUTE_MODES
from megalong.plan.planner import Plan, PlanRequest, plan
from megalong.plan.shapes import GPUS, MODELS

_IDX_MAGIC = b"MMIDIDX\x00\x00"


def read_doc_lengths(path: str | Path) -> np.ndarray:
    """Document lengths from a Megatron `.idx` (its sequence lengths: one per document or packed
    segment), a `.npy` array, or text (integers separated by spaces, commas or newlines; `#` comments;
    or one JSON list)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--doc-lens-file {p}: no such file")
    if p.suffix == ".idx":
        with open(p, "rb") as f:
            head = f.read(9 + 8 + 1 + 8 + 8)
            if len(head) < 34 or head[:9] != _IDX_MAGIC:
                raise ValueError(f"{p}: not a Megatron indexed-dataset .idx file (bad magic header)")
            (count,) = struct.unpack("<Q", head[18:26])
            lengths = np.fromfile(f, dtype="<i4", count=count)
        if lengths.size != count:
            raise ValueError(f"{p}: truncated — header says {count} sequences, file holds {lengths.size}")
    elif p.suffix == ".npy":
        lengths = np.load(p).reshape(-1)
    else:
        text = p.read_text()
        if text.lstrip().startswith("["):
            try:
                lengths = np.asarray(json.loads(text)).reshape(-1)
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{p}: not a JSON list of integers: {e}") from None
        else:
            values = []
            for lineno, line in enumerate(text.splitlines(), 1):
                for tok in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
                    if not tok:
                        continue
                    if not tok.isdigit():
                        raise ValueError(f"{p}:{lineno}: {tok!r} is not a document length (a positive integer)")
                    values.append(int(tok))
            lengths = np.asarray(values, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError(f"{p}: no document lengths found")
    if not np.issubdtype(lengths.dtype, np.integer) or (lengths <= 0).any():
        raise ValueError(f"{p}: document lengths must be positive integers")
    return lengths.astype(np.int64)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megalong plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3_8b", choices=sorted(MODELS), help="model shape (default llama3_8b)")
    ap.add_argument("--seq-len", default="64K", help="training sequence length in tokens: 65536, 64K, 512K")
    docs = ap.add_mutually_exclusive_group()
    docs.add_argument("--doc-len-mean", default=None,
                      help="typical document length (tokens, e.g. 16K); taken as every document having this "
                           "length, so L_eff = min(it, seq-len). Default: one document per sequence")
    docs.add_argument("--doc-lens-file", default=None,
                      help="document lengths: a Megatron .idx (packed or document dataset), .npy, or text "
                           "of integers; documents longer than seq-len are cut into seq-len pieces")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="accelerator type (default h100)")
    ap.add_argument("--gpus", type=int, default=8, help="total GPU count")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing NVLink in one node (default 8)")
    ap.add_argument("--global-batch-tokens", default="4M",
                    help="tokens per optimizer step (default 4M = ProLong's 64 × 64K); a multiple of seq-len")
    ap.add_argument("--recompute", default="auto", choices=("auto",) + RECOMPUTE_MODES,
                    help="activation recomputation to consider: none, selective (megatron core_attn), full "
                         "(every layer), or auto (try all)")
    ap.add_argument("--cp-comm", default="auto", choices=("auto", "allgather", "a2a"),
                    help="context-parallel exchange: allgather (megalong's K/V all-gather), a2a (all-to-all "
                         "over heads; needs KV heads per TP rank divisible by CP), auto (both)")
    ap.add_argument("--attention-backend", default="cudnn",
                    help="attention kernel whose calibrated TF/s to use: cudnn, te, flex, varlen, flash_attn")
    ap.add_argument("--tp", type=int, default=None, help="fix tensor-parallel size instead of searching")
    ap.add_argument("--pp", type=int, default=None, help="fix pipeline-parallel size instead of searching")
    ap.add_argument("--cp", type=int, default=None, help="fix context-parallel size instead of searching")
    ap.add_argument("--max-micro-batch", type=int, default=8, help="largest micro-batch (sequences) to try")
    ap.add_argument("--memory-margin", type=float, default=0.10,
                    help="fraction of GPU memory kept free as a safety margin (default 0.10)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="training precision")
    ap.add_argument("--no-sequence-parallel", action="store_true",
                    help="model TP without sequence parallelism (d-wide activations replicated over TP)")
    ap.add_argument("--calibration", default=None,
                    help="JSON/YAML of measured model constants (written by the GPU benchmark)")
    ap.add_argument("--top", type=int, default=8, help="how many layouts to print (default 8)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the full plan as JSON ('-': stdout)")
    return ap


def _request(args: argparse.Namespace) -> tuple[PlanRequest, str]:
    raw = {"model": args.model, "seq_len": args.seq_len, "gpu": args.gpu, "gpus": args.gpus,
           "gpus_per_node": args.gpus_per_node, "global_batch_tokens": args.global_batch_tokens,
           "recompute": args.recompute, "cp_comm": args.cp_comm, "attention_backend": args.attention_backend,
           "tp": args.tp, "pp": args.pp, "cp": args.cp, "max_micro_batch": args.max_micro_batch,
           "memory_margin": args.memory_margin, "precision": args.precision,
           "sequence_parallel": not args.no_sequence_parallel}
    try:
        req = from_dict(PlanRequest, raw, where="megalong plan")
    except ConfigError as e:  # name the flag, not the dataclass field
        msg = str(e)
        for key in raw:
            msg = msg.replace(f"megalong plan.{key}", "--" + key.replace("_", "-"))
        raise ConfigError(msg) from None
    if args.doc_lens_file:
        lengths = read_doc_lengths(args.doc_lens_file)
        req.l_eff = packed_l_eff(lengths, req.seq_len)
        source = f"{lengths.size:,} documents from {args.doc_lens_file}"
    elif args.doc_len_mean:
        try:
            mean = from_dict(PlanRequest, {"seq_len": args.doc_len_mean}).seq_len
        except ConfigError:
            mean = 0
        if mean <= 0:
            raise ValueError(f"--doc-len-mean {args.doc_len_mean!r}: expected a positive token count such as "
                             "16384 or 16K")
        req.l_eff = packed_l_eff([mean], req.seq_len)
        source = f"documents of {mean:,} tokens"
    else:
        source = "one document per sequence: full causal"
    return req, source


def format_table(p: Plan, top: int) -> str:
    head = (" #  TP PP CP DP  cp-comm    mb   acc  recompute  mem GiB   step s  tok/s/GPU    MFU")
    rows = [head]
    for i, c in enumerate(p.ranked[:top], 1):
        lay, t = c.layout, c.time
        comm = lay.cp_comm if lay.cp > 1 else "-"
        rows.append(f"{i:2d} {lay.tp:3d} {lay.pp:2d} {lay.cp:2d} {lay.dp:2d}  {comm:9s} {lay.micro_batch:3d} "
                    f"{lay.grad_accum:5d}  {lay.recompute:9s} {c.memory.total / GIB:8.1f} {t.step:8.2f} "
                    f"{c.tokens_per_s_per_gpu:10,.0f} {t.mfu:6.1%}")
    return "\n".join(rows)


def to_json(p: Plan, source: str, top: int) -> dict:
    def cand(c):
        return {"layout": to_dict(c.layout), "memory_gib": c.memory.gib(), "memory_stage": c.memory.stage,
                "step_s": c.time.step, "time_s": {k: getattr(c.time, k) for k in c.time.PARTS},
                "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu, "mfu": c.time.mfu}
    counts: dict[str, int] = {}
    for r in p.rejections:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return {"request": to_dict(p.request), "l_eff": p.l_eff, "l_eff_source": source,
            "n_params": p.shape.n_params, "budget_gib": p.budget_bytes / GIB,
            "calibration": to_dict(p.calibration), "unmeasured_constants": p.calibration.unmeasured(),
            "ranked": [cand(c) for c in p.ranked[:top]], "over_memory": [cand(c) for c in p.too_big[:top]],
            "rejections": counts, "rejection_examples": [to_dict(r) for r in p.rejections[:50]],
            "explanation": p.explanation, "note": "predictions of a model; see docs/planner.md"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        req, source = _request(args)
        cal = load_calibration(args.calibration)
        result = plan(req, cal)
    except (ConfigError, ValueError, TypeError) as e:
        print(f"megalong plan: error: {e}", file=sys.stderr)
        return 2
    shape = result.shape
    print(f"megalong plan — {shape.name} ({shape.n_params / 1e9:.2f}B params), sequence {req.seq_len:,}, "
          f"L_eff {result.l_eff:,.0f} ({source})")
    print(f"{req.gpus} × {req.gpu} ({min(req.gpus_per_node, req.gpus)} per node), global batch "
          f"{req.global_batch_tokens:,} tokens = {req.global_batch_tokens // req.seq_len} sequences; "
          f"memory budget {result.budget_bytes / GIB:.1f} GiB/GPU ({req.memory_margin:.0%} margin)")
    print(f"attention backend {req.attention_backend} at {cal.attention_tflops.get(req.attention_backend, 0):g} "
          f"TF/s on {cal.gpu}; GEMMs at {cal.matmul_efficiency:.0%} of peak\n")
    if result.ranked:
        print(format_table(result, args.top))
        print()
    for line in result.explanation:
        print(line)
    unmeasured = cal.unmeasured()
    if unmeasured:
        print(f"\nPredictions use unmeasured constants: {', '.join(unmeasured)} (calibration: {cal.source}).")
    if args.json:
        payload = json.dumps(to_json(result, source, args.top), indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n")
            print(f"wrote {args.json}")
    print(f"\nSummary: {len(result.ranked)} layouts fit, {len(result.too_big)} exceed memory, "
          f"{len(result.rejections) - len(result.too_big)} rejected by a divisibility rule.")
    return 0 if result.ranked else 1


if __name__ == "__main__":
    sys.exit(main())
