#!/usr/bin/env bash
# OrdMoE with the built-in trainer (ordmoe-pretrain) on one node (8 GPUs) under torchrun.
#
#   bash examples/ordmoe_pretrain_torchrun.sh [--dry-run] [extra ordmoe-pretrain flags]
#
# ordmoe-pretrain takes Megatron-LM's model and parallelism flags and runs under
# torchrun --no-python. Layout (8 GPUs): TP 2 (sequence parallel) x PP 2 x DP 2; EP 4, expert TP 1.
# Mock data unless DATA_PATH (Megatron .bin/.idx prefix) and TOKENIZER_MODEL (SentencePiece) are set.
# --dry-run (or DRY_RUN=1) prints the configuration, parallel layout and tier layout and exits.
# Every setting is in examples/ordmoe_common.sh and can be overridden from the environment.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/ordmoe_common.sh"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
parallel_args "${TP:-2}" "${PP:-2}" "${EP:-4}" "${ETP:-1}"
ordmoe_pretrain_args "${GLOBAL_BATCH_SIZE:-128}" "${CHECKPOINT_DIR:-checkpoints/ordmoe-pretrain}"

LAUNCH=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$GPUS_PER_NODE" --no-python "$ORDMOE_PRETRAIN" "${ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "would launch: $(show_command "${LAUNCH[@]}")"
    WORLD_SIZE=$GPUS_PER_NODE RANK=0 LOCAL_RANK=0 exec "$ORDMOE_PRETRAIN" "${ARGS[@]}" --dry-run
fi
exec "${LAUNCH[@]}"
