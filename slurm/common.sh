# shellcheck shell=bash
# slurm/common.sh — sourced by every script in slurm/ (never submitted itself).
#
# It holds what the scripts share: the default paths of the whole recipe (so each stage finds the
# previous one's checkpoint), the job header in the log, and the one launcher:
#   ml_launch ARGS...   runs `python ARGS...` as every process of the job, through srun —
#                       one task per GPU (MEGALONG_LAUNCHER=srun, the default) or one torchrun per
#                       node (MEGALONG_LAUNCHER=torchrun); outside SLURM, torchrun on this machine.
#   ml_train SAVE_DIR CONFIG [key=value ...]
#                       one training stage: resume from SAVE_DIR's latest checkpoint, and when the
#                       trainer stopped on SIGUSR1/SIGTERM (it saves first), requeue the job.
#
# Environment (all optional; docs/slurm.md has the full list):
#   MEGALONG_ROOT       the megalong checkout (found by the calling script)
#   MEGALONG_PYTHON     interpreter [$MEGALONG_ROOT/.venv/bin/python if present, else python3]
#   MEGALONG_LAUNCHER   srun | torchrun [srun]
#   NPROC_PER_NODE      processes per node [SLURM_NTASKS_PER_NODE, else the node's GPUs, else 1]
#   MEGALONG_MASTER_ADDR  rendezvous host [the first host of the allocation]
#   MEGALONG_MASTER_PORT  rendezvous port [20000 + SLURM_JOB_ID % 20000]
#                       (not MASTER_ADDR/PORT: those may leak in from the submitting shell)
#   MEGALONG_SRUN_ARGS  extra srun flags for the training step, word-split (e.g. "--mpi=pmix")
#   MEGALONG_REQUEUE    1: requeue a job whose trainer stopped on a signal; 0: exit 75 instead [1]
#   MEGALONG_MAX_RESTARTS  stop requeueing after this many restarts [50]
#   WANDB_MODE          offline | online | disabled: wins over the recipe's logging.wandb_mode
#   DATA_ROOT           data folder: docs/ (preprocessed) and packed/ [$MEGALONG_ROOT/data]
#   CKPT_ROOT           checkpoint folder of the recipe [$MEGALONG_ROOT/checkpoints]
#   STAGE1_SAVE_DIR, STAGE2_SAVE_DIR, SFT_SAVE_DIR, HF_OUT_DIR   [$CKPT_ROOT/{stage1_64k,stage2_512k,sft,hf}]

: "${MEGALONG_ROOT:?slurm/common.sh: set MEGALONG_ROOT before sourcing it}"
MEGALONG_ROOT=$(cd "$MEGALONG_ROOT" && pwd)
export MEGALONG_ROOT
if [[ -z ${MEGALONG_PYTHON:-} ]]; then
    if [[ -x $MEGALONG_ROOT/.venv/bin/python ]]; then MEGALONG_PYTHON=$MEGALONG_ROOT/.venv/bin/python
    else MEGALONG_PYTHON=python3; fi
fi
export MEGALONG_PYTHON
export PYTHONPATH=$MEGALONG_ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# The recipe's paths: every stage reads the previous stage's output from here.
export DATA_ROOT=${DATA_ROOT:-$MEGALONG_ROOT/data}
export CKPT_ROOT=${CKPT_ROOT:-$MEGALONG_ROOT/checkpoints}
export STAGE1_SAVE_DIR=${STAGE1_SAVE_DIR:-$CKPT_ROOT/stage1_64k}
export STAGE2_SAVE_DIR=${STAGE2_SAVE_DIR:-$CKPT_ROOT/stage2_512k}
export SFT_SAVE_DIR=${SFT_SAVE_DIR:-$CKPT_ROOT/sft}
export HF_OUT_DIR=${HF_OUT_DIR:-$CKPT_ROOT/hf}

# Exit code of a stage that stopped early and saved, when it is not requeued (sysexits EX_TEMPFAIL):
# non-zero, so `--dependency=afterok` never starts the next stage from an unfinished one.
ML_EXIT_INTERRUPTED=75

# The batch shell itself survives a stray SIGUSR1 (`scancel --full`, `--signal=B:USR1`): a trap, unlike
# an ignore, is reset in children, so srun and the trainer still get the signal's normal handling.
trap 'ml_log "batch shell got SIGUSR1 (the trainer handles it: use --signal=USR1@T without B:)"' USR1

ml_log() {
    printf '[megalong %s] %s\n' "$(date '+%F %T')" "$*"
}

ml_die() {
    ml_log "error: $*" >&2
    exit 2
}

# Processes per node: NPROC_PER_NODE, else the job's tasks per node, else its GPUs per node.
ml_nproc_per_node() {
    if [[ -n ${NPROC_PER_NODE:-} ]]; then echo "$NPROC_PER_NODE"
    elif [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then echo "$SLURM_NTASKS_PER_NODE"
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE:-0} != 0 ]]; then echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${SLURM_NTASKS:-} && -n ${SLURM_JOB_NUM_NODES:-} ]]; then echo $((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
    else echo 1; fi
}

# The job header: which job, where, with what. $1 names the step.
ml_header() {
    ml_log "==== megalong $1 ===="
    ml_log "job ${SLURM_JOB_ID:-(not under SLURM)} name=${SLURM_JOB_NAME:-} restart=${SLURM_RESTART_COUNT:-0}" \
        "partition=${SLURM_JOB_PARTITION:-}"
    ml_log "nodes ${SLURM_JOB_NUM_NODES:-1}: ${SLURM_JOB_NODELIST:-$(hostname)}; tasks/node" \
        "${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}; GPUs/node ${SLURM_GPUS_ON_NODE:-0};" \
        "CPUs/node ${SLURM_CPUS_ON_NODE:-$(nproc)}"
    ml_log "checkout $MEGALONG_ROOT (git $(git -C "$MEGALONG_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'));" \
        "python $MEGALONG_PYTHON; cwd $(pwd)"
    ml_log "data $DATA_ROOT; checkpoints $CKPT_ROOT"
}

# Runs `python ARGS...` as all processes of the job (see the top of this file).
ml_launch() {
    local mode=${MEGALONG_LAUNCHER:-srun} nproc nnodes cpus cpt
    nproc=$(ml_nproc_per_node)
    export NPROC_PER_NODE=$nproc
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        ml_log "launch: not under SLURM: torchrun --standalone with $nproc processes on $(hostname)"
        bash "$MEGALONG_ROOT/slurm/launch.sh" local "$MEGALONG_PYTHON" "$@"
        return
    fi
    nnodes=${SLURM_JOB_NUM_NODES:-1}
    MASTER_ADDR=${MEGALONG_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    MASTER_PORT=${MEGALONG_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    cpus=${SLURM_CPUS_ON_NODE:-1}
    local -a srun_args=(--kill-on-bad-exit=1 --nodes="$nnodes")
    case $mode in
        srun)
            cpt=$((cpus / nproc)); ((cpt >= 1)) || cpt=1
            export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpt}
            srun_args+=(--ntasks=$((nnodes * nproc)) --ntasks-per-node="$nproc" --cpus-per-task="$cpt") ;;
        torchrun)
            srun_args+=(--ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus") ;;
        *) ml_die "MEGALONG_LAUNCHER=$mode: use srun (one task per GPU) or torchrun (one per node)" ;;
    esac
    # every task sees all GPUs of its node (the trainer picks LOCAL_RANK), whatever the step default
    if ((${SLURM_GPUS_ON_NODE:-0} > 0)); then srun_args+=(--gpus-per-node="$SLURM_GPUS_ON_NODE"); fi
    local -a extra=()
    # shellcheck disable=SC2206  # word splitting of the user's extra flags is intended
    [[ -n ${MEGALONG_SRUN_ARGS:-} ]] && extra=($MEGALONG_SRUN_ARGS)
    ml_log "launch: $mode, $nnodes node(s) × $nproc processes = $((nnodes * nproc)); rendezvous" \
        "$MASTER_ADDR:$MASTER_PORT"
    ml_log "launch: $MEGALONG_PYTHON $*"
    srun "${srun_args[@]}" "${extra[@]}" bash "$MEGALONG_ROOT/slurm/launch.sh" "$mode" "$MEGALONG_PYTHON" "$@"
}

# Fills the array ML_DATA_OVERRIDES from a stage's packed dataset ($1) and held-out dataset ($2);
# "" keeps the recipe's. A held-out dataset that does not exist turns evaluation off, saying so.
ml_data_overrides() {
    ML_DATA_OVERRIDES=()
    if [[ -n $1 ]]; then ML_DATA_OVERRIDES+=("data.datasets=[{path: $1}]"); fi
    if [[ -n $2 && -f $2.meta.json ]]; then
        ML_DATA_OVERRIDES+=("eval.datasets=[{path: $2}]")
    elif [[ -n $2 ]]; then
        ml_log "no held-out dataset at $2: evaluation off (pack one there or set the *_EVAL_DATA variable)"
        ML_DATA_OVERRIDES+=("eval.datasets=[]")
    fi
}

# A field of a run's summary.json (written by the trainer when it returns).
ml_summary_field() {
    "$MEGALONG_PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]))' "$1" "$2"
}

# One training stage; see the top of this file. Later overrides win over earlier ones.
ml_train() {
    local save_dir=$1 config=$2 rc=0 status step
    shift 2
    [[ -f $config ]] || ml_die "recipe $config does not exist (set the stage's *_CONFIG variable)"
    mkdir -p "$save_dir"
    ml_log "recipe $config; overrides: ${*:-(none)}"
    if [[ -f $save_dir/latest ]]; then
        ml_log "checkpoints $save_dir: resuming from $(cat "$save_dir/latest")"
    else
        ml_log "checkpoints $save_dir: none yet, starting the stage"
    fi
    ml_log "W&B: mode ${WANDB_MODE:-from the recipe (logging.wandb_mode)}, run files under $save_dir/wandb;" \
        "resolved config printed below and saved as $save_dir/config.yaml"
    ml_launch -m megalong.train --config "$config" "train.save_dir=$save_dir" train.resume=auto "$@" || rc=$?
    if ((rc != 0)); then
        ml_log "trainer failed with exit code $rc (2: bad config or setup, 3: non-finite loss); see above"
        exit "$rc"
    fi
    [[ -f $save_dir/summary.json ]] || ml_die "trainer exited 0 but wrote no $save_dir/summary.json"
    status=$(ml_summary_field "$save_dir/summary.json" status)
    step=$(ml_summary_field "$save_dir/summary.json" final_step)
    ml_log "trainer: $status at step $step; checkpoint $(ml_summary_field "$save_dir/summary.json" checkpoint);" \
        "W&B files $(ml_summary_field "$save_dir/summary.json" wandb_dir)"
    case $status in
        completed) return 0 ;;
        preempted | time_limit) ml_requeue "$save_dir" "$step" ;;
        *) ml_log "unexpected trainer status $status"; exit 1 ;;
    esac
}

# The trainer saved and stopped early: put the job back in the queue; it resumes from save_dir.
ml_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [[ ${MEGALONG_REQUEUE:-1} != 1 || -z ${SLURM_JOB_ID:-} ]]; then
        ml_log "stopped at step $2 (saved in $1); not requeueing: submit this script again to resume"
        exit "$ML_EXIT_INTERRUPTED"
    fi
    if ((restarts >= ${MEGALONG_MAX_RESTARTS:-50})); then
        ml_log "stopped at step $2 after $restarts restarts (MEGALONG_MAX_RESTARTS); not requeueing"
        exit "$ML_EXIT_INTERRUPTED"
    fi
    ml_log "stopped at step $2 (saved in $1); requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    ml_log "scontrol requeue failed (does the cluster allow --requeue?); submit this script again to resume"
    exit "$ML_EXIT_INTERRUPTED"
}
