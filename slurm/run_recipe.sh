#!/bin/bash
# Submits the whole recipe as a chain of jobs, each starting only when the previous one COMPLETED
# (sbatch --dependency=afterok, --kill-on-invalid-dep=yes: a failed step cancels the rest):
#   preprocess → pack → stage1 (64K) → stage2 (512K) → sft → convert → eval
# Run it (not sbatch it) on a login node, from anywhere:
#   bash slurm/run_recipe.sh                       # every step
#   bash slurm/run_recipe.sh stage2 sft convert    # some steps, in this order
# A requeued (preempted) job keeps its id, so its dependents simply wait for it.
# Environment [default]:
#   RECIPE_SBATCH_ARGS          sbatch flags for every step, word-split (e.g. "--partition=gpu --account=x")
#   RECIPE_SBATCH_ARGS_<STEP>   flags for one step (STEP upper-case: PREPROCESS, PACK, STAGE1, STAGE2,
#                               SFT, CONVERT, EVAL), after the common ones; later flags win
#   <STEP>_ARGS                 arguments for that step's script (trainer overrides), word-split,
#                               e.g. STAGE1_ARGS="train.steps=100 parallel.context_parallel=2"
#   RECIPE_AFTER                a job id the first step waits for [none]
#   plus every variable of the step scripts (STAGE1_CONFIG, STAGE2_DATA, CKPT_ROOT, ...): the jobs
#   inherit this environment, and slurm/common.sh fixes the shared paths before submitting.
# Prints one "STEP JOB_ID" line per job; follow them with squeue or scontrol show job.
set -euo pipefail
for MEGALONG_ROOT in "${MEGALONG_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.."; do
    [[ -f $MEGALONG_ROOT/slurm/common.sh ]] && break
done
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$MEGALONG_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: set MEGALONG_ROOT" >&2; exit 2; }

declare -A SCRIPTS=([preprocess]=preprocess.sh [pack]=pack.sh [stage1]=stage1_64k.sh [stage2]=stage2_512k.sh
                    [sft]=sft.sh [convert]=convert_to_hf.sh [eval]=eval.sh)
steps=("$@")
((${#steps[@]})) || steps=(preprocess pack stage1 stage2 sft convert eval)
for step in "${steps[@]}"; do
    [[ -n ${SCRIPTS[$step]:-} ]] || ml_die "unknown step '$step'; steps: preprocess pack stage1 stage2 sft convert eval"
done
command -v sbatch >/dev/null || ml_die "sbatch not found: run this on a SLURM login node"

read -r -a common <<<"${RECIPE_SBATCH_ARGS:-}"
previous=${RECIPE_AFTER:-}
for step in "${steps[@]}"; do
    upper=${step^^}
    step_sbatch=RECIPE_SBATCH_ARGS_$upper step_args=${upper}_ARGS
    read -r -a own <<<"${!step_sbatch:-}"
    read -r -a args <<<"${!step_args:-}"
    flags=(--parsable "--output=$MEGALONG_ROOT/slurm/logs/%x-%j.out" "${common[@]}" "${own[@]}")
    [[ -n $previous ]] && flags+=("--dependency=afterok:$previous" --kill-on-invalid-dep=yes)
    job=$(sbatch "${flags[@]}" "$MEGALONG_ROOT/slurm/${SCRIPTS[$step]}" "${args[@]}")
    job=${job%%;*}
    echo "$step $job"
    previous=$job
done
ml_log "submitted ${#steps[@]} job(s); logs in $MEGALONG_ROOT/slurm/logs unless --output was given" >&2
