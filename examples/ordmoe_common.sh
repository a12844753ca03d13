# Shared settings of the OrdMoE launch scripts (sourced by them; not run on its own).
#
# The model is the paper's setting (Ming-Lite-Omni's language model shape): 28 layers, hidden 2048,
# 64 routed experts, top-6, two shared experts' worth of shared-expert width, a dense first layer,
# OrdMoE with 3 tiers (ranks 1-6, 25-30, 59-64). Every value can be overridden from the
# environment (names below); extra command-line arguments are passed to the program last, so they
# win over the script's flags.
#
#   --dry-run (first argument) or DRY_RUN=1  print the resolved configuration, the parallel layout
#                                            and the tier layout, then exit; builds nothing, needs
#                                            no GPU, launches no torchrun/srun (the would-be launch
#                                            command is printed first)
#   PRECISION=bf16 | fp8 | fp32              bf16 (default), or FP8-hybrid (E4M3 forward, E5M2
#                                            backward; Transformer Engine) on top of bf16
#   ORDMOE_NUM_TIERS, ORDMOE_GROUPING, ORDMOE_RANK_LOSS_COEFF, ORDMOE_LAYER_SCOPE   OrdMoE flags
#   TP, PP, EP, ETP                          tensor / pipeline / expert / expert-tensor parallel sizes
#   MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, SEQ_LENGTH, LR
#   DATA_PATH (+ TOKENIZER_MODEL)            real data; without DATA_PATH the run uses mock data
#   CHECKPOINT_DIR                           --save/--load directory
#   PYTHON, TORCHRUN, ORDMOE_PRETRAIN        programs (default: python, torchrun, ordmoe-pretrain)

set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
EXTRA_ARGS=("$@")

PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
ORDMOE_PRETRAIN=${ORDMOE_PRETRAIN:-ordmoe-pretrain}
PRECISION=${PRECISION:-bf16}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
VOCAB_SIZE=${VOCAB_SIZE:-126464}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
TRAIN_ITERS=${TRAIN_ITERS:-10000}
LR=${LR:-3e-4}

# Architecture flags both trainers accept (Megatron-LM spelling).
MODEL_ARGS=(
    --num-layers 28
    --hidden-size 2048
    --ffn-hidden-size 5632
    --num-attention-heads 16
    --group-query-attention --num-query-groups 4
    --seq-length "$SEQ_LENGTH"
    --max-position-embeddings "$SEQ_LENGTH"
    --position-embedding-type rope --rotary-base 600000
    --normalization RMSNorm --norm-epsilon 1e-6
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --num-experts 64
    --moe-router-topk 6
    --moe-ffn-hidden-size 1408
    --moe-shared-expert-intermediate-size 2816
    --moe-layer-freq "([0]+[1]*27)"
)

MOE_TRAINING_ARGS=(
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-3
    --moe-token-dispatcher-type alltoall
)

ORDMOE_ARGS=(
    --ordmoe
    --ordmoe-num-tiers "${ORDMOE_NUM_TIERS:-3}"
    --ordmoe-grouping "${ORDMOE_GROUPING:-uniform}"
    --ordmoe-rank-loss-coeff "${ORDMOE_RANK_LOSS_COEFF:-1.0}"
)
if [[ -n "${ORDMOE_LAYER_SCOPE:-}" ]]; then
    ORDMOE_ARGS+=(--ordmoe-layer-scope "$ORDMOE_LAYER_SCOPE")
fi

case "$PRECISION" in
    bf16) PRECISION_ARGS=(--bf16) ;;
    fp8)  PRECISION_ARGS=(--bf16 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
                          --moe-router-padding-for-quantization) ;;
    fp32) PRECISION_ARGS=() ;;
    *) echo "PRECISION=$PRECISION: use bf16, fp8 (FP8-hybrid) or fp32" >&2; exit 2 ;;
esac

# parallel_args TP PP EP ETP: the layout flags (sequence parallelism whenever TP > 1: MoE needs it).
parallel_args() {
    PARALLEL_ARGS=(
        --tensor-model-parallel-size "$1"
        --pipeline-model-parallel-size "$2"
        --expert-model-parallel-size "$3"
        --expert-tensor-parallel-size "$4"
    )
    if (( $1 > 1 )); then
        PARALLEL_ARGS+=(--sequence-parallel)
    fi
}

# show_command CMD...: print a command line, quoted so it can be pasted.
show_command() {
    printf '%q ' "$@"
    printf '\n'
}

# Megatron-LM entry point: the patched pretrain_gpt.py, or examples/pretrain_gpt_ordmoe.py.
# ORDMOE_ENTRY=patched|example (default: patched when the checkout carries the patch).
megatron_lm_entry() {
    : "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout at a supported tag (README, Supported versions)}"
    local entry=${ORDMOE_ENTRY:-}
    if [[ -z "$entry" ]]; then
        if grep -q "ordmoe_megatron" "$MEGATRON_LM_PATH/pretrain_gpt.py" 2>/dev/null; then
            entry=patched
        else
            entry=example
        fi
    fi
    case "$entry" in
        patched)
            if ! grep -q "ordmoe_megatron" "$MEGATRON_LM_PATH/pretrain_gpt.py"; then
                echo "ORDMOE_ENTRY=patched: $MEGATRON_LM_PATH/pretrain_gpt.py is not patched; run" \
                     "'git -C $MEGATRON_LM_PATH apply $ORDMOE_HOME/patches/megatron-lm-<tag>-ordmoe.patch'" \
                     "(the patch for your tag: core_v0.16.1 also serves core_v0.17.x) or use ORDMOE_ENTRY=example" >&2
                exit 2
            fi
            ENTRY="$MEGATRON_LM_PATH/pretrain_gpt.py" ;;
        example) ENTRY="$ORDMOE_HOME/examples/pretrain_gpt_ordmoe.py" ;;
        *) echo "ORDMOE_ENTRY=$entry: use patched or example" >&2; exit 2 ;;
    esac
    export PYTHONPATH="$MEGATRON_LM_PATH${PYTHONPATH:+:$PYTHONPATH}"
}

# Megatron-LM flags besides the model: data, training schedule, precision, logging, checkpoints.
megatron_lm_args() {
    local global_batch=$1 checkpoints=$2
    if [[ -n "${DATA_PATH:-}" ]]; then
        DATA_ARGS=(--data-path "$DATA_PATH" --split 99,1,0
                   --tokenizer-type HuggingFaceTokenizer
                   --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL with DATA_PATH}")
    else
        DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
    fi
    ARGS=(
        "${MODEL_ARGS[@]}" "${MOE_TRAINING_ARGS[@]}"
        --moe-grouped-gemm --moe-router-dtype fp32
        --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.006
        "${PARALLEL_ARGS[@]}"
        --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
        "${PRECISION_ARGS[@]}"
        --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$global_batch"
        --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 500
        --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
        "${DATA_ARGS[@]}"
        --log-interval 10 --log-throughput --eval-interval 1000 --eval-iters 10
        --save "$checkpoints" --load "$checkpoints" --save-interval 1000
        --tensorboard-dir "$checkpoints/tensorboard"
        "${ORDMOE_ARGS[@]}"
        "${EXTRA_ARGS[@]}"
    )
    # Megatron-LM requires it with tensor parallelism (ordered kernel launches for TP overlap).
    export CUDA_DEVICE_MAX_CONNECTIONS=1
}

# ordmoe-pretrain flags besides the model (it has no optimizer/precision flags beyond these).
ordmoe_pretrain_args() {
    local global_batch=$1 checkpoints=$2
    if [[ -n "${DATA_PATH:-}" ]]; then
        DATA_ARGS=(--data-path "$DATA_PATH" --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL with DATA_PATH}")
    else
        DATA_ARGS=(--mock-data --vocab-size "$VOCAB_SIZE")
    fi
    # ordmoe-pretrain builds no Transformer Engine layers: BF16 or FP32, never FP8.
    local precision=()
    case "$PRECISION" in
        bf16) precision=(--bf16) ;;
        fp8) echo "PRECISION=fp8: ordmoe-pretrain builds no Transformer Engine layers and cannot train in" \
                  "FP8; use PRECISION=bf16, or examples/megatron_lm_*.sh (Megatron-LM) for FP8" >&2
             exit 2 ;;
    esac
    ARGS=(
        "${MODEL_ARGS[@]}" "${MOE_TRAINING_ARGS[@]}"
        "${PARALLEL_ARGS[@]}"
        "${precision[@]}"
        --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$global_batch"
        --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr 3e-5 --lr-warmup-iters 500
        --weight-decay 0.1 --clip-grad 1.0
        "${DATA_ARGS[@]}"
        --log-interval 10 --eval-interval 1000 --eval-iters 10
        --save "$checkpoints" --load "$checkpoints" --save-interval 1000
        --metrics-out "$checkpoints/metrics.jsonl"
        "${ORDMOE_ARGS[@]}"
        "${EXTRA_ARGS[@]}"
    )
}

# LAUNCH=(srun ... torchrun ... "$@"): one torchrun per node of the SLURM allocation, each starting
# GPUS_PER_NODE copies of "$@" (the program and its arguments).
slurm_launch() {
    local master_addr="<first node of the allocation>"
    if [[ "$DRY_RUN" != 1 ]]; then
        master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
    local srun_extra=()
    read -r -a srun_extra <<< "${SRUN_ARGS:-}"
    LAUNCH=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 "${srun_extra[@]}"
            "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
            --rdzv-id "${SLURM_JOB_ID:-ordmoe}" --rdzv-backend c10d --rdzv-endpoint "$master_addr:$MASTER_PORT"
            "$@")
}
