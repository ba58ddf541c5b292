#!/bin/bash
# Converts a megalong checkpoint (by default SFT's final one) to a HuggingFace Llama folder
# (safetensors + config.json) with tools/convert_checkpoint.py megalong-to-hf. One CPU process.
#
#   sbatch slurm/convert_to_hf.sh
# Environment [default]:
#   CONVERT_CKPT    a save_dir (its latest checkpoint is used) or an iter_* directory [$SFT_SAVE_DIR]
#   HF_OUT_DIR      output folder [$CKPT_ROOT/hf]
#   TOKENIZER_DIR   tokenizer files copied beside the weights [none]
#   CONVERT_ARGS    extra flags for tools/convert_checkpoint.py megalong-to-hf
#   plus slurm/common.sh's CKPT_ROOT, SFT_SAVE_DIR, MEGALONG_PYTHON.
# CPU cluster: sbatch --cpus-per-task=1 slurm/convert_to_hf.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
for MEGALONG_ROOT in "${MEGALONG_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $MEGALONG_ROOT/slurm/common.sh ]] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$MEGALONG_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: set MEGALONG_ROOT" >&2; exit 2; }

ckpt=${CONVERT_CKPT:-$SFT_SAVE_DIR}
[[ -f $ckpt/latest ]] && ckpt=$ckpt/$(cat "$ckpt/latest")
args=(megalong-to-hf --ckpt "$ckpt" --out "$HF_OUT_DIR")
[[ -n ${TOKENIZER_DIR:-} ]] && args+=(--tokenizer-dir "$TOKENIZER_DIR")
read -r -a extra <<<"${CONVERT_ARGS:-}"
ml_header "convert to HF"
ml_log "convert $ckpt → $HF_OUT_DIR"
"$MEGALONG_PYTHON" "$MEGALONG_ROOT/tools/convert_checkpoint.py" "${args[@]}" "${extra[@]}"
ml_log "HuggingFace model in $HF_OUT_DIR"
