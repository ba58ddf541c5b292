#!/bin/bash
# ProLong SFT (UltraChat, 64K packed sequences) from stage 2's final checkpoint; 4 nodes × 8 GPUs by
# default. LongAlign-style SFT: SFT_CONFIG=examples/longalign_sft_64k.yaml (loss weighting, sorted
# batching: see docs/training.md).
#
#   sbatch slurm/sft.sh [key=value ...]           # from the megalong checkout; key=value are trainer
#                                                 # overrides, e.g. data.loss_mode=sequence
# Environment [default]:
#   SFT_CONFIG        run recipe [examples/prolong_sft_64k.yaml]
#   SFT_DATA          packed dataset prefix [$DATA_ROOT/packed/sft]; empty: the recipe's data.datasets
#   SFT_EVAL_DATA     held-out packed prefix [$DATA_ROOT/packed/sft_heldout; no evaluation if absent];
#                     empty: the recipe's eval.datasets
#   SFT_SAVE_DIR      checkpoints, summary.json, W&B files [$CKPT_ROOT/sft]
#   SFT_INIT_FROM     weights to start from [$STAGE2_SAVE_DIR: stage 2's latest (final) checkpoint]
#   plus slurm/common.sh's: MEGALONG_LAUNCHER (srun|torchrun), NPROC_PER_NODE, MEGALONG_MASTER_PORT, DATA_ROOT,
#   CKPT_ROOT, STAGE2_SAVE_DIR, MEGALONG_PYTHON, MEGALONG_REQUEUE, MEGALONG_SRUN_ARGS.
# A requeued SFT resumes from its own latest checkpoint (train.resume=auto wins over init_from).
# CPU cluster: sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/sft.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-sft
#SBATCH --nodes=4
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

ml_header "SFT"
config=${SFT_CONFIG:-$MEGALONG_ROOT/examples/prolong_sft_64k.yaml}
ml_data_overrides "${SFT_DATA-$DATA_ROOT/packed/sft}" "${SFT_EVAL_DATA-$DATA_ROOT/packed/sft_heldout}"
init_from=${SFT_INIT_FROM:-$STAGE2_SAVE_DIR}
overrides=("train.init_from=$init_from" "${ML_DATA_OVERRIDES[@]}")

ml_log "SFT starts from $init_from ($(cat "$init_from/latest" 2>/dev/null || echo 'no latest pointer'))"
ml_train "$SFT_SAVE_DIR" "$config" "${overrides[@]}" "$@"
