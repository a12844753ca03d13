#!/usr/bin/env bash
# OrdMoE with Megatron-LM's pretrain_gpt.py on one node (8 GPUs) under torchrun.
#
#   MEGATRON_LM_PATH=/path/to/Megatron-LM bash examples/megatron_lm_torchrun.sh [--dry-run] [extra pretrain_gpt.py flags]
#
# Entry point: the patched $MEGATRON_LM_PATH/pretrain_gpt.py (git apply
# patches/megatron-lm-<tag>-ordmoe.patch), else examples/pretrain_gpt_ordmoe.py with the
# checkout on PYTHONPATH; ORDMOE_ENTRY=patched|example picks one.
# Layout (8 GPUs): TP 2 (sequence parallel) x PP 2 x DP 2; EP 4, expert TP 1.
# PRECISION=bf16 (default) or PRECISION=fp8 (FP8-hybrid, Transformer Engine). --dry-run (or
# DRY_RUN=1) prints the configuration, parallel layout and tier layout and exits: no GPU needed.
# Every setting is in examples/ordmoe_common.sh and can be overridden from the environment.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/ordmoe_common.sh"
ORDMOE_HOME=${ORDMOE_HOME:-$(dirname "$here")}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
parallel_args "${TP:-2}" "${PP:-2}" "${EP:-4}" "${ETP:-1}"
megatron_lm_entry
megatron_lm_args "${GLOBAL_BATCH_SIZE:-128}" "${CHECKPOINT_DIR:-checkpoints/ordmoe-megatron-lm}"

LAUNCH=("$TORCHRUN" --standalone --nnodes 1 --nproc-per-node "$GPUS_PER_NODE" "$ENTRY" "${ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "would launch: $(show_command "${LAUNCH[@]}")"
    WORLD_SIZE=$GPUS_PER_NODE RANK=0 LOCAL_RANK=0 exec "$PYTHON" "$ENTRY" "${ARGS[@]}" --ordmoe-dry-run
fi
exec "${LAUNCH[@]}"
