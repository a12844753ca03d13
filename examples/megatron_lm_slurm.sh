#!/usr/bin/env bash
#SBATCH --job-name=ordmoe-megatron-lm
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=ordmoe-megatron-lm-%j.out
#
# OrdMoE with Megatron-LM's pretrain_gpt.py on several nodes: sbatch runs this once, srun starts
# one torchrun per node, torchrun starts one process per GPU. Submit from the ordmoe-megatron
# repository root (sbatch copies the script away, so examples/ is found from there):
#
#   MEGATRON_LM_PATH=/path/to/Megatron-LM sbatch examples/megatron_lm_slurm.sh [extra pretrain_gpt.py flags]
#   MEGATRON_LM_PATH=/path/to/Megatron-LM bash examples/megatron_lm_slurm.sh --dry-run    # check it anywhere
#
# Layout (4 nodes x 8 GPUs = 32): TP 2 (sequence parallel) x PP 4 x DP 4; EP 8, expert TP 1.
# Entry point, PRECISION (bf16 | fp8) and overrides: as examples/megatron_lm_torchrun.sh.
# SRUN_ARGS adds srun options (e.g. --container-image=... --container-mounts=...).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$here/ordmoe_common.sh" ]] || here="${SLURM_SUBMIT_DIR:-$PWD}/examples"
source "$here/ordmoe_common.sh"
ORDMOE_HOME=${ORDMOE_HOME:-$(dirname "$here")}

NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-4}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
parallel_args "${TP:-2}" "${PP:-4}" "${EP:-8}" "${ETP:-1}"
megatron_lm_entry
megatron_lm_args "${GLOBAL_BATCH_SIZE:-512}" "${CHECKPOINT_DIR:-checkpoints/ordmoe-megatron-lm-${NNODES}n}"

slurm_launch "$ENTRY" "${ARGS[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "would launch: $(show_command "${LAUNCH[@]}")"
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) RANK=0 LOCAL_RANK=0 exec "$PYTHON" "$ENTRY" "${ARGS[@]}" --ordmoe-dry-run
fi
exec "${LAUNCH[@]}"
