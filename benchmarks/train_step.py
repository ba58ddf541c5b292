"""Training-step benchmark: tokens/s, document-aware MFU and peak memory of the trainer's own step
(`megalong.train.trainer.train_step`: forward/backward through megatron-core's schedules, the agreed
finiteness check, the distributed optimizer step) for a model shape and a packed-sequence layout.

Data is synthetic by default (random tokens, documents of --doc-len tokens packed into --seq-len
samples), so no dataset is needed; `--recipe R.yaml --real-data` times the recipe's own data instead.
MFU is causal-counted model FLOPs (DESIGN §9, megalong/plan/flops.py) over the GPU's dense bf16 peak.

Examples:
    python benchmarks/train_step.py                          # CPU smoke: tiny model, 1K tokens, 2 docs
    torchrun --nproc-per-node 1 benchmarks/train_step.py --model llama3_2_1b --seq-len 64K \\
        --doc-len 8K --recompute selective --json train_step_1b_64k.json        # the H100 target
    torchrun --nproc-per-node 8 benchmarks/train_step.py --recipe examples/prolong_stage1_64k.yaml \\
        --micro-batches 2 parallel.tensor_parallel=2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalong.config import parse_int  # noqa: E402


class SyntheticBatches:
    """GlobalBatchLoader's interface over random packed samples: documents of `doc_len` tokens
    (the last one shorter) filling `seq_len`; the same samples every step (the speed is what counts)."""

    def __init__(self, seq_len: int, doc_len: int, vocab: int, loss_mode: str = "token", seed: int = 0):
        from megalong.data.batch import PackedSample

        rng = np.random.default_rng(seed)
        n_full, rest = divmod(seq_len, doc_len)
        lengths = np.array([doc_len] * n_full + ([rest] if rest else []), dtype=np.int64)
        self.sample = PackedSample(rng.integers(0, vocab, seq_len), np.ones(seq_len, np.uint8), lengths)
        self.loss_mode, self._cache = loss_mode, {}

    def micro_batches(self, consumed, global_batch_size, micro_batch_size, dp_rank=0, dp_size=1):
        from megalong.data.batch import make_micro_batch

        if micro_batch_size not in self._cache:
            self._cache[micro_batch_size] = make_micro_batch([self.sample] * micro_batch_size, self.loss_mode)
        return [self._cache[micro_batch_size]] * (global_batch_size // (micro_batch_size * dp_size))

    def state_dict(self, consumed):
        return {"consumed_samples": consumed, "synthetic": True}


def build_config(args):
    from megalong.train.config import fill_model_section, load_run_config

    base = [] if args.recipe else [f"model.preset={args.model}"]
    cfg = load_run_config(args.recipe, [*base, *args.overrides])
    section = cfg.model
    for key, value in (("recompute", args.recompute), ("attention_backend", args.attention_backend),
                       ("params_dtype", args.dtype)):
        if value is not None:
            setattr(section, key, value)
    cfg.model = fill_model_section(section)
    cfg.train.resume, cfg.train.init_from = "never", None
    cfg.logging.wandb = False
    if not args.real_data:
        cfg.data.datasets = []
        cfg.data.seq_length = parse_int(args.seq_len) if args.seq_len else (cfg.data.seq_length or 1024)
        cfg.eval.datasets = []
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="run recipe YAML to take model/parallel/optim settings from (optional)")
    ap.add_argument("--model", default="tiny", help="model preset when no recipe is given (default tiny)")
    ap.add_argument("--seq-len", help="tokens per sample, e.g. 64K (default: the recipe's, else 1024)")
    ap.add_argument("--doc-len", default="512", help="synthetic document length, e.g. 8K (default 512)")
    ap.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per DP rank and step (default 1)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], help="override model.recompute")
    ap.add_argument("--attention-backend", help="override model.attention_backend (auto, cudnn, flex, ...)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="override model.params_dtype")
    ap.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: known GPUs; CPU: none)")
    ap.add_argument("--real-data", action="store_true", help="use the recipe's datasets instead of synthetic data")
    ap.add_argument("--json", help="also write the result to this JSON file")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (e.g. parallel.tensor_parallel=2)")
    args = ap.parse_args(argv)

    import torch

    from megalong.plan.flops import flops_per_token, mfu
    from megalong.runtime.distributed import destroy_distributed, init_distributed
    from megalong.train import trainer
    from megalong.train.config import plan_run, world_size_from_env
    from megalong.train.logger import default_peak_tflops, peak_memory_gib

    cfg = build_config(args)
    m, M = args.micro_batch_size, args.micro_batches
    tp, pp, cp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.context_parallel
    dp = world_size_from_env() // (tp * pp * cp)
    cfg.train.global_batch_size, cfg.train.global_batch_tokens = m * M * dp, None
    cfg.train.micro_batch_size, cfg.train.steps, cfg.train.total_tokens = m, args.warmup + args.steps, None
    plan = plan_run(cfg, check_data=args.real_data)
    ps = init_distributed(cfg.parallel, seed=cfg.train.seed)
    loader = None if args.real_data else SyntheticBatches(plan.seq_length, parse_int(args.doc_len),
                                                          plan.model.vocab_size, cfg.data.loss_mode)
    s = trainer.build(cfg, plan, ps, loader=loader)
    G, S = plan.global_batch_size, plan.seq_length
    sync = torch.cuda.synchronize if ps.device.type == "cuda" else (lambda: None)
    times, l_effs = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and ps.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mbs = s.loader.micro_batches(step * G, G, m, ps.dp_rank, ps.dp)
        sync()
        t0 = time.perf_counter()
        r = trainer.train_step(s, mbs)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            lengths = np.concatenate([np.diff(mb.cu_seqlens.numpy()) for mb in mbs]).astype(np.float64)
            l_effs.append(float((lengths ** 2).sum() / lengths.sum()))
    step_s = float(np.median(times))
    tps = G * S / step_s
    l_eff = float(np.mean(l_effs))
    peak = args.peak_tflops or cfg.logging.peak_tflops or default_peak_tflops(ps.device)
    result = {
        "model": plan.model.name, "seq_len": S, "doc_len": None if args.real_data else parse_int(args.doc_len),
        "layout": f"TP{tp} PP{pp} CP{cp} DP{ps.dp}", "world_size": ps.world_size, "global_batch": G,
        "micro_batch_size": m, "micro_batches": M, "recompute": plan.model.recompute,
        "dtype": plan.model.params_dtype, "attention_backend": plan.model.attention_backend,
        "step_s_median": step_s, "step_s_all": times, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / ps.world_size,
        "l_eff": l_eff, "tflops_per_gpu": flops_per_token(plan.model, l_eff) * tps / ps.world_size / 1e12,
        "mfu": mfu(plan.model, l_eff, tps / ps.world_size, peak) if peak else None, "peak_tflops": peak,
        "peak_memory_gib": peak_memory_gib(ps.device), "last_loss": r.loss,
        "device": torch.cuda.get_device_name() if ps.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    if ps.rank == 0:
        rows = [("model", result["model"]), ("layout", result["layout"]), ("seq_len / doc_len", f"{S} / {result['doc_len']}"),
                ("global batch", f"{G} samples = {G * S:,} tokens"), ("step time (median)", f"{step_s:.3f} s"),
                ("tokens/s (per GPU)", f"{tps:,.0f} ({tps / ps.world_size:,.0f})"), ("L_eff", f"{l_eff:,.0f}"),
                ("model TFLOP/s per GPU", f"{result['tflops_per_gpu']:.2f}"),
                ("MFU (causal-counted)", "n/a (no peak known)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"),
                ("peak memory", f"{result['peak_memory_gib']:.2f} GiB"), ("device", result["device"])]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
