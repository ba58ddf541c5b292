#!/bin/bash
# Long-context evaluation of the final model (by default the HF export of SFT): megalong's probes
# (perplexity by position, needle and JSON key-value recall) or the HELMET launcher, through
# `python -m megalong.eval` (docs/evaluation.md). One node; the probes run on its first GPU.
#
#   sbatch slurm/eval.sh
#   EVAL_COMMAND=helmet EVAL_ARGS="--helmet-dir /opt/HELMET --categories recall,rag" sbatch slurm/eval.sh
# Environment [default]:
#   EVAL_COMMAND    ppl | needle | jsonkv | all | compare | helmet [all]
#   EVAL_MODEL      an HF folder (has config.json: --hf-dir) or a megalong checkpoint (--ckpt) [$HF_OUT_DIR]
#   EVAL_DATA       held-out document or packed dataset prefix for ppl (and the recall haystack) [none]
#   EVAL_OUT_DIR    results (JSON, plots) [$CKPT_ROOT/eval]
#   EVAL_ARGS       extra flags for the command, word-split (see python -m megalong.eval COMMAND --help);
#                   for compare: the ppl.json files to plot together (→ $EVAL_OUT_DIR/ppl_compare.png)
#   plus slurm/common.sh's CKPT_ROOT, HF_OUT_DIR, MEGALONG_PYTHON.
# CPU cluster: sbatch --gpus-per-node=0 --ntasks-per-node=1 slurm/eval.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
for MEGALONG_ROOT in "${MEGALONG_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $MEGALONG_ROOT/slurm/common.sh ]] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$MEGALONG_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: set MEGALONG_ROOT" >&2; exit 2; }

command=${EVAL_COMMAND:-all}
model=${EVAL_MODEL:-$HF_OUT_DIR}
out=${EVAL_OUT_DIR:-$CKPT_ROOT/eval}
read -r -a extra <<<"${EVAL_ARGS:-}"
ml_header "eval ($command)"
mkdir -p "$out"
if [[ $command == compare ]]; then
    # compare plots earlier ppl.json results (given in EVAL_ARGS) on one figure; no model is loaded
    (( ${#extra[@]} )) || ml_die "EVAL_COMMAND=compare needs ppl.json files in EVAL_ARGS"
    "$MEGALONG_PYTHON" -m megalong.eval compare --out "$out/ppl_compare.png" "${extra[@]}"
    ml_log "plot in $out/ppl_compare.png"
    exit 0
fi
if [[ -f $model/config.json ]]; then
    args=(--hf-dir "$model")
elif [[ $command == helmet ]]; then
    ml_die "EVAL_COMMAND=helmet needs an HF export (a folder with config.json); $model is not one:" \
           "run slurm/convert_to_hf.sh first or set EVAL_MODEL"
else
    args=(--ckpt "$model")
fi
[[ -n ${EVAL_DATA:-} && $command != helmet ]] && args+=(--data "$EVAL_DATA")
ml_log "evaluate $model → $out"
"$MEGALONG_PYTHON" -m megalong.eval "$command" "${args[@]}" --out "$out" "${extra[@]}"
ml_log "results in $out"
