#!/bin/bash
# Tokenizes raw JSONL/Parquet sources into document datasets (tools/preprocess_data.py) and chat data
# into SFT document datasets with loss masks (tools/prepare_sft.py), under $DATA_ROOT/docs/.
#
#   PREPROCESS_SOURCES="books=/raw/books code_repos=/raw/code" TOKENIZER_MODEL=/models/llama3 \
#       sbatch slurm/preprocess.sh
# Environment [default]:
#   TOKENIZER_MODEL       the tokenizer: tokenizer.json, HF directory or SentencePiece .model (required)
#   TOKENIZER_TYPE        [HuggingFaceTokenizer]
#   PREPROCESS_SOURCES    space-separated NAME=INPUT pairs (a file, quoted glob or folder); writes
#                         $DATA_ROOT/docs/NAME_text_document (the paths examples/data/*.yaml use)
#   PREPROCESS_ARGS_<NAME>  extra flags for one source, e.g.
#                         PREPROCESS_ARGS_code_repos="--group-by repo --sort-by path"
#   PREPROCESS_ARGS       extra flags for every source (e.g. --overwrite)
#   SFT_SOURCES           NAME=INPUT pairs of chat JSONL; writes $DATA_ROOT/docs/NAME_sft
#   PREPARE_SFT_ARGS      extra flags for tools/prepare_sft.py [--template llama3 --max-length 64K]
#   PREPROCESS_WORKERS    tokenizer processes [the job's CPUs]
#   plus slurm/common.sh's DATA_ROOT, MEGALONG_PYTHON.
# CPU cluster: sbatch --cpus-per-task=2 slurm/preprocess.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
for MEGALONG_ROOT in "${MEGALONG_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f $MEGALONG_ROOT/slurm/common.sh ]] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$MEGALONG_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: set MEGALONG_ROOT" >&2; exit 2; }

ml_header "preprocess"
[[ -n ${PREPROCESS_SOURCES:-}${SFT_SOURCES:-} ]] || ml_die "set PREPROCESS_SOURCES and/or SFT_SOURCES (NAME=INPUT ...)"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer (tokenizer.json, HF directory or .model)}"
workers=${PREPROCESS_WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
out=$DATA_ROOT/docs
mkdir -p "$out"
read -r -a common_args <<<"${PREPROCESS_ARGS:-}"
tokenizer_args=(--tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}" --tokenizer-model "$TOKENIZER_MODEL"
                --workers "$workers")
split_pair() {  # $1: the variable's name (for the error), $2: one NAME=INPUT word → $name, $input
    name=${2%%=*} input=${2#*=}
    [[ $name != "$2" && $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
        ml_die "$1: '$2' is not NAME=INPUT (NAME: letters, digits, _)"
}
for pair in ${PREPROCESS_SOURCES:-}; do
    split_pair PREPROCESS_SOURCES "$pair"
    per_source=PREPROCESS_ARGS_$name
    read -r -a source_args <<<"${!per_source:-}"
    ml_log "source $name: $input → $out/${name}_text_document"
    # shellcheck disable=SC2086  # $input may be a glob the tool expands itself
    "$MEGALONG_PYTHON" "$MEGALONG_ROOT/tools/preprocess_data.py" --input $input --output-prefix "$out/$name" \
        --source-name "$name" "${tokenizer_args[@]}" "${common_args[@]}" "${source_args[@]}"
done
read -r -a sft_args <<<"${PREPARE_SFT_ARGS:---template llama3 --max-length 64K}"
for pair in ${SFT_SOURCES:-}; do
    split_pair SFT_SOURCES "$pair"
    ml_log "SFT source $name: $input → $out/${name}_sft"
    # shellcheck disable=SC2086
    "$MEGALONG_PYTHON" "$MEGALONG_ROOT/tools/prepare_sft.py" --input $input --output-prefix "$out/${name}_sft" \
        --source-name "$name" "${tokenizer_args[@]}" "${sft_args[@]}"
done
ml_log "document datasets in $out"
