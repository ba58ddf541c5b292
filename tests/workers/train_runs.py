"""Runs several trainer stages in one torchrun launch (imports cost 5–9 s per launch) and writes what
the tests compare: every run's exit code, metrics.jsonl records, summary and probe values.

    torchrun --nproc-per-node N tests/workers/train_runs.py SUITE DATA_DIR OUT_DIR

SUITE "dp" (2 processes) and "single" (1 process) are listed in RUNS below. Each run is the example
recipe plus overrides, through the trainer's own `run()` (the function `python -m megalong.train` calls).
"""
import json
import sys
import time
from pathlib import Path

# torch, megatron and megalong are imported inside the functions: dist_checkpointing's writer starts
# a helper process that re-imports this file, and should not pay for them again.

QUIET = ["logging.wandb=false", "logging.jsonl=true", "logging.interval=1"]
CONST = ["optim.lr=3e-3", "optim.min_lr=3e-3", "optim.warmup_fraction=0", "optim.decay_style=constant"]


def stage1(data, out, name, *extra):
    return ("examples/tiny_stage1.yaml",
            [f"data.datasets=[{{path: {data}/stage1}}]", f"eval.datasets=[{{path: {data}/stage1_eval}}]",
             f"train.save_dir={out}/{name}", *QUIET, *extra])


def parity(data, out, name, mode, *extra):
    """Three constant-LR steps of one global batch of 8 samples, in a given layout and loss mode."""
    return stage1(data, out, name, f"data.loss_mode={mode}", "train.steps=3", "train.save_at_end=false",
                  "eval.datasets=[]", "train.save_interval=0", *CONST, *extra)


def sft(data, out, name, recipe="examples/tiny_sft.yaml", dataset="sft", *extra):
    return (recipe, [f"data.datasets=[{{path: {data}/{dataset}}}]", f"train.save_dir={out}/{name}",
                     "train.init_from=null", "train.steps=2", *QUIET, *extra])


def runs(suite, data, out):
    if suite == "dp":
        ref = stage1(data, out, "ref", "train.steps=12", "train.save_interval=4", "train.keep_last=0",
                     "eval.interval=6")
        return {
            "ref": ref,
            # the same run resumed from step 8 in other layouts (the checkpoint was written at TP1 DP2)
            "tp2": stage1(data, out, "tp2", "train.steps=12", "eval.interval=6", f"train.resume={out}/ref/iter_0000008",
                          "parallel.tensor_parallel=2", "train.save_at_end=false"),
            "pp2": stage1(data, out, "pp2", "train.steps=12", "eval.interval=6", f"train.resume={out}/ref/iter_0000008",
                          "parallel.pipeline_parallel=2", "train.save_at_end=false"),
            "token_dp2": parity(data, out, "token_dp2", "token"),
            # recomputation must not change anything either
            "token_cp2": parity(data, out, "token_cp2", "token", "parallel.context_parallel=2",
                                "model.recompute=selective"),
            "sequence_dp2": parity(data, out, "sequence_dp2", "sequence", "model.recompute=full"),
            "sequence_cp2": parity(data, out, "sequence_cp2", "sequence", "parallel.context_parallel=2"),
            "stage2": ("examples/tiny_stage2.yaml", [f"data.datasets=[{{path: {data}/stage2}}]",
                                                    f"train.init_from={out}/ref", f"train.save_dir={out}/stage2",
                                                    "train.steps=2", *QUIET]),
            "sft": sft(data, out, "sft", "examples/tiny_sft.yaml", "sft", "train.save_at_end=false"),
            "nan_stop": stage1(data, out, "nan_stop", "train.steps=5", "train.save_interval=1", "eval.datasets=[]",
                               "optim.lr=1e30", "optim.min_lr=1e30", "optim.warmup_fraction=0",
                               "optim.decay_style=constant"),
        }
    return {
        "token_1x8": parity(data, out, "token_1x8", "token"),
        "token_2x4": parity(data, out, "token_2x4", "token", "train.micro_batch_size=2"),
        "sequence_1x8": parity(data, out, "sequence_1x8", "sequence"),
        "sorted": sft(data, out, "sorted", "examples/tiny_longalign_sorted.yaml", "sft_docs", "train.save_at_end=false"),
        "time_limit": stage1(data, out, "time_limit", "train.steps=5", "eval.datasets=[]",
                             "train.exit_duration_minutes=0", "train.interrupted_exit_code=75"),
        "nan_skip": stage1(data, out, "nan_skip", "train.steps=3", "eval.datasets=[]", "train.on_nan=skip",
                           "train.save_at_end=false",
                           "optim.lr=1e30", "optim.min_lr=1e30", "optim.warmup_fraction=0",
                           "optim.decay_style=constant"),
    }


# ------------------------------------------------------------------------------- probes


def sequence_formula(s) -> float:
    """(1/M) Σ_i L_i/N_i over the M documents with targets in global batch 0, from plain per-token CE
    of the initial model and the raw target masks (nothing from the loss code)."""
    import numpy as np
    import torch

    from megalong.attention.module import DocumentParams
    from megalong.data.batch import make_micro_batch
    from megalong.model.build import output_head

    model = s.chunks[0]
    ratios = []
    for d, i in s.loader.sample_ids(0, s.plan.global_batch_size):
        sample = s.loader.datasets[d][i]
        toks = torch.as_tensor(sample.tokens, dtype=torch.int64)[None]
        labels = torch.zeros_like(toks)
        labels[0, :-1] = toks[0, 1:]
        mb = make_micro_batch([sample], "token")  # only for the document layout / positions
        with torch.no_grad(), output_head(model).targets(labels):
            ce = model(toks, mb.position_ids, None, packed_seq_params=DocumentParams.for_micro_batch(mb))
        ce = ce.reshape(-1).double().numpy()
        bounds = np.concatenate([[0], np.cumsum(sample.doc_lengths)])
        mask = np.asarray(sample.target_mask, dtype=np.float64)
        for a, b in zip(bounds[:-1], bounds[1:]):
            # target j (a < j < b) is predicted at position j-1 inside the same document
            w = mask[a + 1:b]
            if w.sum() > 0:
                ratios.append(float((ce[a:b - 1] * w).sum() / w.sum()))
    return float(np.mean(ratios))


def sft_target_count(s) -> int:
    """Σ target mask over global batch 0 (prompts are masked; a conversation never starts on a target)."""
    import numpy as np

    return int(sum(np.asarray(s.loader.datasets[d][i].target_mask).sum()
                   for d, i in s.loader.sample_ids(0, s.plan.global_batch_size)))


PROBES = {"sequence_1x8": sequence_formula, "sft": sft_target_count}


def main(suite, data, out):
    import torch.distributed as dist

    from megalong.train import trainer
    from megalong.train.config import load_run_config, plan_run

    rank = 0
    results = {}
    for name, (recipe, overrides) in runs(suite, data, out).items():
        cfg = load_run_config(recipe, overrides)
        plan = plan_run(cfg)
        probe = {}
        hook = (lambda s, n=name: probe.update(value=PROBES[n](s))) if name in PROBES else None
        t0 = time.perf_counter()
        code = trainer.run(cfg, plan, before_fit=hook)
        seconds = time.perf_counter() - t0
        rank = dist.get_rank()
        save_dir = Path(cfg.train.save_dir)
        if rank == 0:
            records = [json.loads(x) for x in (save_dir / "metrics.jsonl").read_text().splitlines()] \
                if (save_dir / "metrics.jsonl").is_file() else []
            summary = json.loads((save_dir / "summary.json").read_text()) if (save_dir / "summary.json").is_file() else None
            results[name] = {"code": code, "train": [r for r in records if r["kind"] == "train"],
                             "eval": [r for r in records if r["kind"] == "eval"], "summary": summary,
                             "probe": probe.get("value"), "seconds": seconds}
            print(f"RUN {name} exit {code} in {seconds:.1f} s", flush=True)
    if rank == 0:
        (Path(out) / f"{suite}.json").write_text(json.dumps(results, indent=1))
    from megalong.runtime.distributed import destroy_distributed
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
