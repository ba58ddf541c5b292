#!/bin/bash
# slurm/launch.sh — what each task of a training step runs (started by ml_launch in common.sh):
#   launch.sh srun     PYTHON ARGS...   one task per GPU: maps SLURM's task variables to torch's
#   launch.sh torchrun PYTHON ARGS...   one task per node: torchrun with the node's rank
#   launch.sh local    PYTHON ARGS...   outside SLURM: torchrun --standalone on this machine
# Reads NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT (exported by ml_launch).
#
# SIGUSR1 (sbatch --signal, scancel --signal=USR1) reaches every process of the step. It is ignored
# from here on — an ignored signal stays ignored across exec, so torchrun (which would otherwise
# die of it) never reacts — until the trainer installs its own handler, saves and exits.
set -euo pipefail
trap '' USR1

mode=$1 python=$2
shift 2
case $mode in
    srun)
        export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
        export LOCAL_WORLD_SIZE=${NPROC_PER_NODE:-1} GROUP_RANK=${SLURM_NODEID:-0}
        exec "$python" "$@"
        ;;
    torchrun)
        exec "$python" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \
            --nproc-per-node="$NPROC_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "$@"
        ;;
    local)
        exec "$python" -m torch.distributed.run --standalone --nproc-per-node="${NPROC_PER_NODE:-1}" "$@"
        ;;
    *)
        echo "slurm/launch.sh: unknown mode '$mode' (srun, torchrun or local)" >&2
        exit 2
        ;;
esac
