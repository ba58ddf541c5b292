#!/bin/bash
# ProLong stage 1: continued pretraining at 64K tokens (RoPE base 8e6), 8 nodes × 8 GPUs by default.
#
#   sbatch slurm/stage1_64k.sh [key=value ...]    # from the megalong checkout; key=value are trainer
#                                                 # overrides, e.g. parallel.context_parallel=2
# Environment [default]:
#   STAGE1_CONFIG     run recipe [examples/prolong_stage1_64k.yaml]
#   STAGE1_DATA       packed dataset prefix [$DATA_ROOT/packed/stage1]; empty: the recipe's data.datasets
#   STAGE1_EVAL_DATA  held-out packed prefix [$DATA_ROOT/packed/stage1_heldout; no evaluation if absent];
#                     empty: the recipe's eval.datasets
#   STAGE1_SAVE_DIR   checkpoints, summary.json, W&B files [$CKPT_ROOT/stage1_64k]
#   STAGE1_INIT_FROM  checkpoint to start from, e.g. Llama-3-8B-Instruct converted with
#                     tools/convert_checkpoint.py [empty: the recipe's train.init_from]
#   plus slurm/common.sh's: MEGALONG_LAUNCHER (srun|torchrun), NPROC_PER_NODE, MEGALONG_MASTER_PORT, DATA_ROOT,
#   CKPT_ROOT, MEGALONG_PYTHON, MEGALONG_REQUEUE, MEGALONG_SRUN_ARGS.
# Preemption: 10 min before the time limit (or on `scancel --signal=USR1 JOB`) the trainer finishes
# its step, saves and exits; the job requeues itself and resumes from STAGE1_SAVE_DIR.
# CPU cluster: sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/stage1_64k.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-stage1
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
for MEGALONG_ROOT in "${MEGALONG_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $MEGALONG_ROOT/slurm/common.sh ]] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$MEGALONG_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: set MEGALONG_ROOT" >&2; exit 2; }

ml_header "stage 1 (64K)"
config=${STAGE1_CONFIG:-$MEGALONG_ROOT/examples/prolong_stage1_64k.yaml}
ml_data_overrides "${STAGE1_DATA-$DATA_ROOT/packed/stage1}" "${STAGE1_EVAL_DATA-$DATA_ROOT/packed/stage1_heldout}"
overrides=("${ML_DATA_OVERRIDES[@]}")
[[ -n ${STAGE1_INIT_FROM:-} ]] && overrides+=("train.init_from=$STAGE1_INIT_FROM")

ml_train "$STAGE1_SAVE_DIR" "$config" "${overrides[@]}" "$@"
