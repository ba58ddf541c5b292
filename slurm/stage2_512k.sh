#!/bin/bash
# ProLong stage 2: 512K tokens (RoPE base 1.28e8), starting from stage 1's final checkpoint;
# 8 nodes × 8 GPUs by default (512K sequences need context parallelism: see the recipe's parallel.*).
#
#   sbatch slurm/stage2_512k.sh [key=value ...]   # from the megalong checkout; key=value are trainer
#                                                 # overrides, e.g. parallel.context_parallel=8
# Environment [default]:
#   STAGE2_CONFIG     run recipe [examples/prolong_stage2_512k.yaml]
#   STAGE2_DATA       packed dataset prefix [$DATA_ROOT/packed/stage2]; empty: the recipe's data.datasets
#   STAGE2_EVAL_DATA  held-out packed prefix [$DATA_ROOT/packed/stage2_heldout; no evaluation if absent];
#                     empty: the recipe's eval.datasets
#   STAGE2_SAVE_DIR   checkpoints, summary.json, W&B files [$CKPT_ROOT/stage2_512k]
#   STAGE2_INIT_FROM  weights to start from [$STAGE1_SAVE_DIR: stage 1's latest (final) checkpoint]
#   plus slurm/common.sh's: MEGALONG_LAUNCHER (srun|torchrun), NPROC_PER_NODE, MEGALONG_MASTER_PORT, DATA_ROOT,
#   CKPT_ROOT, STAGE1_SAVE_DIR, MEGALONG_PYTHON, MEGALONG_REQUEUE, MEGALONG_SRUN_ARGS.
# A requeued stage 2 resumes from its own latest checkpoint (train.resume=auto wins over init_from).
# Preemption: 15 min before the time limit (or on `scancel --signal=USR1 JOB`) the trainer finishes
# its step, saves and exits; the job requeues itself.
# CPU cluster: sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/stage2_512k.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-stage2
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
for MEGALONG_ROOT in "${MEGALONG_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $MEGALONG_ROOT/slurm/common.sh ]] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$MEGALONG_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: set MEGALONG_ROOT" >&2; exit 2; }

ml_header "stage 2 (512K)"
config=${STAGE2_CONFIG:-$MEGALONG_ROOT/examples/prolong_stage2_512k.yaml}
ml_data_overrides "${STAGE2_DATA-$DATA_ROOT/packed/stage2}" "${STAGE2_EVAL_DATA-$DATA_ROOT/packed/stage2_heldout}"
init_from=${STAGE2_INIT_FROM:-$STAGE1_SAVE_DIR}
overrides=("train.init_from=$init_from" "${ML_DATA_OVERRIDES[@]}")

ml_log "stage 2 starts from $init_from ($(cat "$init_from/latest" 2>/dev/null || echo 'no latest pointer'))"
ml_train "$STAGE2_SAVE_DIR" "$config" "${overrides[@]}" "$@"
