#!/bin/bash
# Packs each stage's document datasets into its packed dataset (tools/pack_dataset.py and the data
# recipes in examples/data/): $DATA_ROOT/docs/* → $DATA_ROOT/packed/{stage1,stage2,sft}.
#
#   sbatch slurm/pack.sh
# Environment [default]:
#   PACK_STAGES     space-separated NAME=DATA_RECIPE pairs; writes $DATA_ROOT/packed/NAME
#                   [stage1=examples/data/prolong_stage1_64k.yaml stage2=examples/data/prolong_stage2_512k.yaml
#                    sft=examples/data/prolong_sft_64k.yaml]
#   PACK_DOCS_DIR   where the recipes' source paths are resolved [$DATA_ROOT/docs]
#   PACK_ARGS       extra flags for every pack_dataset.py call (e.g. "--no-plot --set seed=7")
#   plus slurm/common.sh's DATA_ROOT, MEGALONG_PYTHON.
# CPU cluster: sbatch --cpus-per-task=1 slurm/pack.sh  (docs/slurm.md)
#SBATCH --job-name=megalong-pack
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
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

ex=$MEGALONG_ROOT/examples/data
default_stages="stage1=$ex/prolong_stage1_64k.yaml stage2=$ex/prolong_stage2_512k.yaml sft=$ex/prolong_sft_64k.yaml"
stages=${PACK_STAGES:-$default_stages}
docs=${PACK_DOCS_DIR:-$DATA_ROOT/docs}
read -r -a extra <<<"${PACK_ARGS:-}"
ml_header "pack"
mkdir -p "$DATA_ROOT/packed"
for pair in $stages; do
    name=${pair%%=*} recipe=${pair#*=}
    [[ $name != "$pair" && -f $recipe ]] ||
        ml_die "PACK_STAGES: '$pair' is not NAME=DATA_RECIPE with an existing recipe"
    ml_log "pack $name: $recipe (sources under $docs) → $DATA_ROOT/packed/$name"
    "$MEGALONG_PYTHON" "$MEGALONG_ROOT/tools/pack_dataset.py" "$recipe" --data-root "$docs" \
        --output "$DATA_ROOT/packed/$name" "${extra[@]}"
done
ml_log "packed datasets in $DATA_ROOT/packed"
