#!/usr/bin/env bash
#SBATCH --job-name=ordmoe-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=ordmoe-pretrain-%j.out
#
# OrdMoE with the built-in trainer (ordmoe-pretrain) on several nodes: srun starts one torchrun per
# node, torchrun --no-python starts ordmoe-pretrain once per GPU. Submit from the ordmoe-megatron
# repository root:
#
#   sbatch examples/ordmoe_pretrain_slurm.sh [extra ordmoe-pretrain flags]
#   bash examples/ordmoe_pretrain_slurm.sh --dry-run        # check it anywhere
#
# Layout (4 nodes x 8 GPUs = 32): TP 2 (sequence parallel) x PP 4 x DP 4; EP 8, expert TP 1.
# Data, PRECISION and overrides: as examples/ordmoe_pretrain_torchrun.sh. SRUN_ARGS adds srun options.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$here/ordmoe_common.sh" ]] || here="${SLURM_SUBMIT_DIR:-$PWD}/examples"
source "$here/ordmoe_common.sh"

NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-4}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
parallel_args "${TP:-2}" "${PP:-4}" "${EP:-8}" "${ETP:-1}"
ordmoe_pretrain_args "${GLOBAL_BATCH_SIZE:-512}" "${CHECKPOINT_DIR:-checkpoints/ordmoe-pretrain-${NNODES}n}"

slurm_launch --no-python "$ORDMOE_PRETRAIN" "${ARGS[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "would launch: $(show_command "${LAUNCH[@]}")"
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) RANK=0 LOCAL_RANK=0 exec "$ORDMOE_PRETRAIN" "${ARGS[@]}" --dry-run
fi
exec "${LAUNCH[@]}"
