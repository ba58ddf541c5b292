"""`python -m megalong.train --config RECIPE.yaml [key=value ...]` — one training stage.

Launch one process per GPU with torchrun (`torchrun --nproc-per-node 8 -m megalong.train ...`) or
srun (`srun --ntasks-per-node 8 python -m megalong.train ...`; RANK/WORLD_SIZE come from SLURM_*).
NCCL on GPUs, gloo on CPU. Exit codes: 0 done; `train.interrupted_exit_code` (default 0) after
SIGTERM/SIGUSR1 or `train.exit_duration_minutes` (a checkpoint was saved); 2 bad config or setup
(a one-line `megalong.train: error: ...`); 3 stopped on a non-finite loss or gradient.
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  python -m megalong.train --config examples/tiny_stage1.yaml train.save_dir=runs/s1
  torchrun --nproc-per-node 2 -m megalong.train --config examples/tiny_stage2.yaml \\
      train.init_from=runs/s1 train.save_dir=runs/s2 parallel.tensor_parallel=2
overrides are dotted keys of the recipe (see docs/configuration.md), e.g. optim.lr=2e-5,
data.datasets='[{path: data/packed/stage1}]', train.resume=never, logging.jsonl=true."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megalong.train", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run recipe YAML (examples/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of recipe keys, applied after the YAML (e.g. train.steps=10)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and the batch plan for this many processes, then exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megalong.config import ConfigError, dump_yaml
    from megalong.train.config import load_run_config, plan_run

    from megalong.runtime.distributed import env_rank

    rank = env_rank()
    try:
        cfg = load_run_config(args.config, args.overrides)
        plan = plan_run(cfg)
    except (ConfigError, ValueError) as e:
        if rank == 0:
            print(f"megalong.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.print_config:
        if rank == 0:
            print(dump_yaml(cfg))
            print(f"# {plan.world_size} processes: DP {plan.dp}, {plan.steps} steps of {plan.global_batch_size} "
                  f"samples, {plan.num_micro_batches} micro-batches of {plan.micro_batch_size} per DP rank")
        return 0
    from megalong.runtime.distributed import destroy_distributed
    from megalong.train.trainer import run

    try:
        return run(cfg, plan)
    finally:
        destroy_distributed()


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import the main module
    sys.exit(main())
