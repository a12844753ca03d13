"""``ordmoe-pretrain``: GPT-MoE pretraining with OrdMoE, from megatron-core's own pieces.

One process on CPU (gloo, through the CPU emulation) or GPU, or many under
``torchrun --no-python ordmoe-pretrain``; flags follow Megatron-LM's names where they overlap.
``--preset tiny`` (the default when no data is named) builds a corpus, a SentencePiece tokenizer
and Megatron data files on the machine, trains, saves, plots and evaluates, with no download.

This module reads the flags and turns them into a ``RunConfig``; nothing below it sees them.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.flags import add_ordmoe_args, ordmoe_config_from_args
from ordmoe_megatron.runtime import compat
from ordmoe_megatron.runtime.checkpointing import checkpoint_model_flags, has_checkpoint
from ordmoe_megatron.runtime.distributed import ParallelLayout, world_size_from_env
from ordmoe_megatron.runtime.model_flags import add_model_args, flags_from_args
from ordmoe_megatron.train import build, checks, run
from ordmoe_megatron.train.config import RunConfig

PRESETS = {
    "tiny": dict(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=128,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        disable_bias_linear=True,
        untie_embeddings_and_output_weights=True,
        seq_length=128,
        max_position_embeddings=128,
        micro_batch_size=8,
        global_batch_size=16,
        train_iters=200,
        lr=3e-3,
        min_lr=3e-4,
        lr_warmup_iters=10,
        log_interval=10,
        eval_interval=100,
        eval_iters=4,
        work_dir="runs/tiny",
        ordmoe=True,
        # Without a floor the rank loss drove tiers 2-3 to about -100 nats per token within 200
        # steps of this run (and path 1 ended worse than the baseline); see docs/trainer.md.
        ordmoe_logprob_floor="vocab",
    ),
}
# Fine-tuning on the checkable tiny-sft tasks (data/sft.py), from scratch: its own tokenizer and
# data; sized so that plain SFT gets some held-out answers right and not all (docs/sft.md).
PRESETS["tiny-sft"] = dict(
    PRESETS["tiny"],
    num_layers=2,
    hidden_size=96,
    ffn_hidden_size=192,
    moe_ffn_hidden_size=96,
    seq_length=32,
    max_position_embeddings=32,
    micro_batch_size=16,
    global_batch_size=32,
    train_iters=300,
    lr=3e-3,
    min_lr=3e-4,
    eval_interval=None,
    eval_iters=2,
    work_dir="runs/tiny-sft",
    sft_pack=False,  # rows of 32 hold one conversation with little padding; packing costs more on the CPU
)
# The embedded vision-language default (train/vision_language.py, data/vision.py): a one-layer
# CLIP ViT, a projector and a tiny MoE language model in megatron-core's LLaVAModel; the first
# half of the steps on captions, the rest on the questions; sized so that the plain baseline gets
# some held-out answers right and not all (docs/multimodal.md).
PRESETS["tiny-vl"] = dict(
    PRESETS["tiny"],
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    moe_ffn_hidden_size=64,
    seq_length=16,  # text tokens per sample (the image token included); the image adds 15 positions
    max_position_embeddings=32,
    micro_batch_size=16,
    global_batch_size=32,
    train_iters=200,
    lr=2e-3,
    min_lr=2e-4,
    eval_interval=None,
    eval_iters=6,
    work_dir="runs/tiny-vl",
    make_vocab_size_divisible_by=8,  # the closed vocabulary has 32 words: no padded logits
    vl_caption_fraction=0.5,
)
# The paper's second model (Ling-mini-2.0) and DeepSeek-V3 in miniature: 16 experts in 4 groups
# (each token's top-2 from 2 groups), sigmoid scores with the expert bias (aux-loss-free
# balancing) and a scaling factor, one shared expert, a first dense layer, one
# multi-token-prediction layer and multi-latent attention (its core attention bridged without
# Transformer Engine: runtime/bridges/transformer_engine.py).
PRESETS["tiny-deepseek"] = dict(
    PRESETS["tiny"],
    num_experts=16,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    moe_router_num_groups=4,
    moe_router_group_topk=2,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_topk_scaling_factor=2.5,
    moe_shared_expert_intermediate_size=128,
    moe_layer_freq=[0, 1, 1, 1],
    mtp_num_layers=1,
    mtp_loss_scaling_factor=0.3,
    multi_latent_attention=True,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_head_dim=32,
    qk_pos_emb_head_dim=16,
    v_head_dim=32,
    rope_type="rope",
    train_iters=100,
    eval_interval=50,
    work_dir="runs/tiny-deepseek",
)
# The model the flags describe when no preset is used (as small as a useful test).
DEFAULT_MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    normalization="RMSNorm",
    swiglu=True,
    position_embedding_type="rope",
    disable_bias_linear=True,
    untie_embeddings_and_output_weights=True,
    vocab_size=256,
    make_vocab_size_divisible_by=128,
    seq_length=64,
    max_position_embeddings=64,
)
PRESET_OUTPUTS = (
    ("save", "checkpoints"),
    ("load", "checkpoints"),
    ("metrics_out", "metrics.jsonl"),
    ("plot_out", "metrics.png"),
    ("eval_out", "eval.json"),
    ("preset_data_dir", "data"),
)


def _number(kind, low=None, low_open=False, what=""):
    """An argparse type: ``kind`` (int or float), finite, at least (or above) ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'above' if low_open else 'at least'} {low}{what}")
        return value

    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)
NON_NEGATIVE_FLOAT = _number(float, 0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ordmoe-pretrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="A complete embedded run; 'tiny' is the default when no data is named; 'tiny-deepseek' is "
        "the DeepSeek-V3 / Ling-2.0 style (group-limited sigmoid routing with expert bias, a shared "
        "expert, a first dense layer, MTP, MLA); 'tiny-sft' fine-tunes on checkable instruction / answer "
        "tasks (docs/sft.md); 'tiny-vl' trains a small vision-language model (a megatron-core ViT "
        "and the MoE language model in LLaVAModel) on images it draws, captions then questions "
        "(docs/multimodal.md).",
    )
    parser.add_argument("--work-dir", default=None, help="Where a preset keeps its data, checkpoints and outputs.")
    parser.add_argument(
        "--preset-data-dir",
        default=None,
        help="Where the preset builds (or finds) its corpus, tokenizer and data files; default "
        "<work-dir>/data. Runs with the same --seed can share one.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the resolved configuration, parallel layout and tier layout, then exit.",
    )
    parser.add_argument(
        "--compare-baseline",
        action="store_true",
        help="Also train a plain top-K baseline on the same data and steps, and evaluate both.",
    )
    add_model_args(parser)
    parser.set_defaults(**DEFAULT_MODEL)
    add_ordmoe_args(parser)
    parser.set_defaults(ordmoe=True)
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", default=None, help="Megatron .bin/.idx prefix of the training data.")
    data.add_argument(
        "--valid-data-path", default=None, help="Prefix of validation data (else --split of --data-path)."
    )
    data.add_argument("--split", default="969,30,1")
    data.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece model that made the data files; with --sft-data also a Hugging Face tokenizer directory.",
    )
    data.add_argument("--mock-data", action="store_true", help="Synthetic token streams, no files.")
    data.add_argument(
        "--sft-data",
        default=None,
        help="Fine-tune on chat data: JSONL with 'messages' (system/user/assistant); loss on the answers only.",
    )
    data.add_argument("--sft-valid-data", default=None, help="Validation chats (else the last 5%% of --sft-data).")
    data.add_argument(
        "--sft-pack",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Pack each micro-batch's conversations into one row (THD, cu_seqlens), as Megatron-LM's --sft does.",
    )
    data.add_argument(
        "--vl-caption-fraction",
        type=NON_NEGATIVE_FLOAT,
        default=0.5,
        help="--preset tiny-vl: the share of the steps on captions (continued pretraining) before the "
        "questions (fine-tuning, answer-only loss).",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--train-iters", type=NON_NEGATIVE, default=200)
    train.add_argument("--micro-batch-size", type=POSITIVE, default=4)
    train.add_argument("--global-batch-size", type=POSITIVE, default=8)
    train.add_argument("--lr", type=NON_NEGATIVE_FLOAT, default=3e-3)
    train.add_argument("--min-lr", type=NON_NEGATIVE_FLOAT, default=3e-4)
    train.add_argument("--lr-warmup-iters", type=NON_NEGATIVE, default=5)
    train.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.01)
    train.add_argument("--clip-grad", type=NON_NEGATIVE_FLOAT, default=1.0)
    train.add_argument("--seed", type=NON_NEGATIVE, default=1234)
    train.add_argument("--moe-aux-loss-coeff", type=NON_NEGATIVE_FLOAT, default=1e-2)
    train.add_argument("--moe-router-load-balancing-type", default="aux_loss", choices=compat.LOAD_BALANCING_TYPES)
    train.add_argument("--moe-token-dispatcher-type", default="alltoall", choices=("alltoall", "allgather"))
    train.add_argument("--calculate-per-token-loss", action="store_true")
    train.add_argument("--bf16", action="store_true", help="BF16 weights and activations, FP32 main weights.")
    train.add_argument(
        "--fp8-format",
        choices=("hybrid", "e4m3"),
        default=None,
        help="FP8 through Transformer Engine (GPU with TE only; needs --bf16).",
    )
    train.add_argument("--log-interval", type=POSITIVE, default=5)
    train.add_argument("--eval-interval", type=POSITIVE, default=None)
    train.add_argument("--eval-iters", type=NON_NEGATIVE, default=2)
    train.add_argument("--metrics-out", default=None, help="JSON lines, one object per iteration.")
    train.add_argument(
        "--eval-out",
        default=None,
        help="After training, evaluate every path on --eval-iters held-out batches and write the "
        "result here (JSON); a preset writes <work-dir>/eval.json.",
    )
    train.add_argument("--plot-out", default=None, help="PNG of each path's log-likelihood and the tier ordering.")
    train.add_argument(
        "--overwrite", action="store_true", help="Replace existing outputs (metrics, plot, checkpoints)."
    )
    par = parser.add_argument_group("parallelism (data-parallel size = world size / (TP x PP))")
    par.add_argument("--tensor-model-parallel-size", type=POSITIVE, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--pipeline-model-parallel-size", type=POSITIVE, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=POSITIVE, default=None)
    par.add_argument("--expert-model-parallel-size", type=POSITIVE, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=POSITIVE, default=None)
    ckpt = parser.add_argument_group("checkpoints (Megatron-LM layout, megatron.core.dist_checkpointing)")
    ckpt.add_argument("--save", default=None, help="Checkpoint directory to write.")
    ckpt.add_argument("--load", default=None, help="Checkpoint directory to resume (or, with --finetune, start) from.")
    ckpt.add_argument("--save-interval", type=POSITIVE, default=None)
    ckpt.add_argument("--finetune", action="store_true", help="Load model weights only; start at iteration 0.")
    ckpt.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="Resume with the learning-rate schedule given here (--lr, --min-lr, --lr-warmup-iters, "
        "--train-iters), not the checkpoint's.",
    )
    ckpt.add_argument(
        "--save-grads",
        default=None,
        help="Save the first step's gradients as a checkpoint (to compare parallel layouts).",
    )
    return parser


def preset_load(save: Optional[str], work_dir: str) -> str:
    """A preset's ``--load`` when none is given: the user's ``--save`` (the run resumes what it
    writes), else ``<work-dir>/checkpoints``."""
    return save or os.path.join(work_dir, "checkpoints")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags with the preset's and the checkpoint's defaults under them."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or (None if known.data_path or known.mock_data or known.sft_data else "tiny")
    if preset:
        parser.set_defaults(**PRESETS[preset])
    load = known.load or (preset_load(known.save, known.work_dir or PRESETS[preset]["work_dir"]) if preset else None)
    if has_checkpoint(load):
        # The checkpoint's model flags become the defaults; flags given here still win (and are
        # checked against the checkpoint before it is loaded).
        parser.set_defaults(**(checkpoint_model_flags(load, "--load") or {}))
    args = parser.parse_args(argv)
    args.preset = preset
    return args


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The typed configuration; raises ``OrdMoEError`` naming the flag for what cannot run."""
    if args.preset:
        work = args.work_dir
        if args.load is None:
            args.load = preset_load(args.save, work)
        for name, default in PRESET_OUTPUTS:
            if getattr(args, name) is None:
                setattr(args, name, os.path.join(work, default))
    elif args.data_path and not args.tokenizer_model:
        raise OrdMoEError("--data-path needs --tokenizer-model (the SentencePiece model that made it)")
    elif args.sft_data and not args.tokenizer_model:
        raise OrdMoEError(
            "--sft-data needs --tokenizer-model (a SentencePiece model or a Hugging Face tokenizer directory)"
        )
    if args.sft_data and (args.data_path or args.mock_data):
        raise OrdMoEError("--sft-data is the training data: drop --data-path / --mock-data")
    vstage = args.num_layers_per_virtual_pipeline_stage
    pp = args.pipeline_model_parallel_size
    ordmoe = ordmoe_config_from_args(args)
    layout = ParallelLayout(
        tensor=args.tensor_model_parallel_size,
        pipeline=pp,
        expert=args.expert_model_parallel_size,
        expert_tensor=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        virtual_pipeline=None if vstage is None or pp <= 1 or vstage <= 0 else args.num_layers // pp // vstage,
    )
    model_flags = flags_from_args(args)
    fields = {f for f in RunConfig.__dataclass_fields__} - {"model_flags", "ordmoe", "layout"}
    return RunConfig(
        model_flags=model_flags, ordmoe=ordmoe, layout=layout, **{name: getattr(args, name) for name in fields}
    )


def describe(config: RunConfig, plan: checks.ResumePlan) -> str:
    """The --dry-run report: configuration, parallel layout, tier layout, what --load will do."""
    world = world_size_from_env()
    layout = config.layout
    dp = layout.data_parallel_size(world)
    flags = config.model_flags
    lines = ["configuration:"]
    values = {**flags, **{k: v for k, v in vars(config).items() if k not in ("model_flags", "ordmoe", "layout")}}
    lines += [f"  {k:40s} {v}" for k, v in sorted(values.items())]
    lines += [
        "checkpoint:",
        f"  {plan.kind}"
        + (f" at iteration {plan.iteration}" if plan.loads else "")
        + "".join(f"; {note}" for note in plan.notes),
        "parallel layout:",
        "  " + layout.describe(world),
        "  micro-batches per step and data-parallel rank: "
        f"{config.global_batch_size // (config.micro_batch_size * dp)}",
        "tier layout:",
    ]
    cfg = config.ordmoe
    if cfg is None:
        lines.append("  OrdMoE off (--no-ordmoe): plain top-K")
        return "\n".join(lines)
    shared = cfg.shared_prefix_layers_of(build.transformer_config(config))
    lines += [
        "  " + line
        for line in cfg.describe_layout(
            flags["num_experts"], flags["moe_router_topk"], flags["num_layers"], flags["moe_layer_freq"], shared
        )
    ]
    seq = config.seq_length // layout.tensor if layout.sequence_parallel else config.seq_length
    lines.append(
        f"  activations between pipeline stages: [{seq}, {cfg.stage_batch_rows(config.micro_batch_size)}, "
        f"{flags['hidden_size']}]"
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The one place ``ordmoe-pretrain`` turns a refusal into its one-line exit message."""
    try:
        args = parse_args(argv)
        config = run_config_from_args(args)
        plan = checks.check_run(
            config, world_size_from_env(), args.num_layers_per_virtual_pipeline_stage, dry_run=args.dry_run
        )
        if args.dry_run:
            print(describe(config, plan))
            return 0
        return run.main(config, plan)
    except OrdMoEError as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
