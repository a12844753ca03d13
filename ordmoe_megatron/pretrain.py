"""``ordmoe-pretrain``: GPT-MoE pretraining with OrdMoE, from megatron-core's own pieces.

One process on CPU (gloo, through ``cpu_emulation``) or GPU, or many under
``torchrun --no-python ordmoe-pretrain``; flags follow Megatron-LM's names where they overlap.
``--preset tiny`` (the default when no data is named) builds a corpus, a SentencePiece tokenizer
and Megatron data files on the machine, trains, saves, plots and evaluates, with no download.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional

import torch

from ordmoe_megatron.arguments import add_ordmoe_args, ordmoe_config_from_args
from ordmoe_megatron.checkpointing import CheckpointError, checkpoint_model_flags, has_checkpoint

PRESETS = {
    "tiny": dict(
        num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_experts=8,
        moe_router_topk=2, moe_ffn_hidden_size=128, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", disable_bias_linear=True, untie_embeddings_and_output_weights=True,
        seq_length=128, max_position_embeddings=128, micro_batch_size=8, global_batch_size=16,
        train_iters=200, lr=3e-3, min_lr=3e-4, lr_warmup_iters=10, log_interval=10, eval_interval=100,
        eval_iters=4, work_dir="runs/tiny", ordmoe=True,
        # Without a floor the rank loss drove tiers 2-3 to about -100 nats per token within 200
        # steps of this run (and path 1 ended worse than the baseline); see README.
        ordmoe_logprob_floor="vocab",
    ),
}
# The model the flags describe when no preset is used (as small as a useful test).
DEFAULT_MODEL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_experts=8, moe_router_topk=2,
    moe_ffn_hidden_size=64, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
    disable_bias_linear=True, untie_embeddings_and_output_weights=True, vocab_size=256,
    make_vocab_size_divisible_by=128, seq_length=64, max_position_embeddings=64,
)


def build_parser() -> argparse.ArgumentParser:
    from ordmoe_megatron.model_flags import add_model_args

    parser = argparse.ArgumentParser(prog="ordmoe-pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="A complete embedded run; 'tiny' is the default when no data is named.")
    parser.add_argument("--work-dir", default=None, help="Where a preset keeps its data, checkpoints and outputs.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the resolved configuration, parallel layout and tier layout, then exit.")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="Also train a plain top-K baseline on the same data and steps, and evaluate both.")
    add_model_args(parser)
    parser.set_defaults(**DEFAULT_MODEL)
    add_ordmoe_args(parser)
    parser.set_defaults(ordmoe=True)
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", default=None, help="Megatron .bin/.idx prefix of the training data.")
    data.add_argument("--valid-data-path", default=None, help="Prefix of validation data (else --split of --data-path).")
    data.add_argument("--split", default="969,30,1")
    data.add_argument("--tokenizer-model", default=None, help="SentencePiece model that made the data files.")
    data.add_argument("--mock-data", action="store_true", help="Synthetic token streams, no files.")
    train = parser.add_argument_group("training")
    train.add_argument("--train-iters", type=int, default=200)
    train.add_argument("--micro-batch-size", type=int, default=4)
    train.add_argument("--global-batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--min-lr", type=float, default=3e-4)
    train.add_argument("--lr-warmup-iters", type=int, default=5)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    train.add_argument("--moe-router-load-balancing-type", default="aux_loss")
    train.add_argument("--moe-token-dispatcher-type", default="alltoall", choices=("alltoall", "allgather"))
    train.add_argument("--calculate-per-token-loss", action="store_true")
    train.add_argument("--bf16", action="store_true", help="BF16 weights and activations, FP32 main weights.")
    train.add_argument("--fp8-format", choices=("hybrid", "e4m3"), default=None,
                       help="FP8 through Transformer Engine (GPU with TE only; needs --bf16).")
    train.add_argument("--log-interval", type=int, default=5)
    train.add_argument("--eval-interval", type=int, default=None)
    train.add_argument("--eval-iters", type=int, default=2)
    train.add_argument("--metrics-out", default=None, help="JSON lines, one object per iteration.")
    train.add_argument("--plot-out", default=None, help="PNG of each path's log-likelihood and the tier ordering.")
    train.add_argument("--overwrite", action="store_true", help="Replace existing outputs (metrics, plot, checkpoints).")
    par = parser.add_argument_group("parallelism (data-parallel size = world size / (TP x PP))")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    par.add_argument("--expert-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    ckpt = parser.add_argument_group("checkpoints (Megatron-LM layout, megatron.core.dist_checkpointing)")
    ckpt.add_argument("--save", default=None, help="Checkpoint directory to write.")
    ckpt.add_argument("--load", default=None, help="Checkpoint directory to resume (or, with --finetune, start) from.")
    ckpt.add_argument("--save-interval", type=int, default=None)
    ckpt.add_argument("--finetune", action="store_true", help="Load model weights only; start at iteration 0.")
    ckpt.add_argument("--save-grads", default=None,
                      help="Save the first step's gradients as a checkpoint (to compare parallel layouts).")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or (None if known.data_path or known.mock_data else "tiny")
    if preset:
        parser.set_defaults(**PRESETS[preset])
    load = known.load or (os.path.join(known.work_dir or PRESETS[preset]["work_dir"], "checkpoints") if preset else None)
    if has_checkpoint(load):
        # The checkpoint's model flags become the defaults; flags given here still win (and are
        # checked against the checkpoint before it is loaded).
        try:
            parser.set_defaults(**(checkpoint_model_flags(load) or {}))
        except (CheckpointError, OSError, ValueError) as err:
            raise SystemExit(f"ordmoe-pretrain: --load {load}: {err}") from None
    args = parser.parse_args(argv)
    args.preset = preset
    if preset:
        work = args.work_dir
        for name, default in (("save", "checkpoints"), ("load", "checkpoints"), ("metrics_out", "metrics.jsonl"),
                              ("plot_out", "metrics.png")):
            if getattr(args, name) is None:
                setattr(args, name, os.path.join(work, default))
    elif args.data_path and not args.tokenizer_model:
        raise SystemExit("ordmoe-pretrain: --data-path needs --tokenizer-model (the SentencePiece model that made it)")
    _check_layout(args)
    _check_precision(args)
    _check_outputs(args)
    try:
        args.ordmoe_config = ordmoe_config_from_args(args)
    except ValueError as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    return args


def _check_precision(args) -> None:
    if args.fp8_format is None:
        return
    if not args.bf16:
        raise SystemExit("ordmoe-pretrain: --fp8-format needs --bf16 (FP8 GEMMs inside a BF16 model)")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise SystemExit("ordmoe-pretrain: --fp8-format needs Transformer Engine on a GPU "
                         "(pip install '.[te]' on the cluster); drop the flag on this machine") from None


def _check_outputs(args) -> None:
    """Never overwrite results without --overwrite; resuming from --save itself is fine."""
    resuming = has_checkpoint(args.load) and args.load == args.save
    if args.save and has_checkpoint(args.save) and not resuming and not args.overwrite:
        raise SystemExit(f"ordmoe-pretrain: --save {args.save} already holds a checkpoint; pass --overwrite, "
                         "or --load the same directory to resume")
    for name in ("metrics_out", "plot_out"):
        path = getattr(args, name)
        if path and os.path.exists(path) and not resuming and not args.overwrite:
            raise SystemExit(f"ordmoe-pretrain: {path} exists; pass --overwrite to replace it")


def _check_layout(args) -> None:
    """Refuse an impossible parallel layout before anything is built."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    problems = []
    if world % (tp * pp):
        problems.append(f"world size {world} is not a multiple of TP x PP = {tp} x {pp}")
    dp = max(world // (tp * pp), 1)
    if args.num_experts and args.num_experts % ep:
        problems.append(f"--num-experts={args.num_experts} is not a multiple of --expert-model-parallel-size={ep}")
    if (dp * tp) % (ep * (args.expert_tensor_parallel_size or tp)):
        problems.append(f"--expert-model-parallel-size={ep} (x expert TP) must divide data-parallel x TP = {dp * tp}")
    if tp > 1 and args.num_experts and not args.sequence_parallel:
        problems.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
    if args.num_layers % pp:
        problems.append(f"--num-layers={args.num_layers} is not a multiple of --pipeline-model-parallel-size={pp}")
    vstage = args.num_layers_per_virtual_pipeline_stage
    if vstage is not None and (pp == 1 or (args.num_layers // pp) % vstage):
        problems.append("--num-layers-per-virtual-pipeline-stage needs pipeline parallelism and must divide "
                        f"the {args.num_layers // pp} layers of each pipeline stage")
    if args.global_batch_size % (args.micro_batch_size * dp):
        problems.append(f"--global-batch-size={args.global_batch_size} must be a multiple of "
                        f"--micro-batch-size x data-parallel size = {args.micro_batch_size} x {dp}")
    if problems:
        raise SystemExit("ordmoe-pretrain: impossible parallel layout: " + "; ".join(problems))


def virtual_pipeline_size(args) -> Optional[int]:
    vstage = args.num_layers_per_virtual_pipeline_stage
    return None if vstage is None else args.num_layers // args.pipeline_model_parallel_size // vstage


def init_distributed(args) -> None:
    """torch.distributed (gloo on CPU with the emulation, NCCL on GPU) and Megatron's parallel
    state for the layout the flags name."""
    init_parallel(args.seed, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                  vpp=virtual_pipeline_size(args), ep=args.expert_model_parallel_size,
                  etp=args.expert_tensor_parallel_size)


def init_parallel(seed: int, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, ep: int = 1,
                  etp: Optional[int] = None) -> None:
    """``init_distributed`` with explicit sizes (all 1: one process, as the tools run)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron import cpu_emulation
    from ordmoe_megatron.testing import find_free_port

    cpu_emulation.enable()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def build_config(args):
    """The model's ``TransformerConfig``; refuses OrdMoE settings the model cannot honour."""
    from ordmoe_megatron import cpu_emulation
    from ordmoe_megatron.model import moe_layer_numbers
    from ordmoe_megatron.model_flags import flags_from_args, transformer_config_from_flags

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = transformer_config_from_flags(
        flags_from_args(args),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type, calculate_per_token_loss=args.calculate_per_token_loss,
        tensor_model_parallel_size=args.tensor_model_parallel_size, sequence_parallel=args.sequence_parallel,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, fp8=args.fp8_format,
        **cpu_emulation.config_overrides(),
    )
    if args.ordmoe_config is not None:
        args.ordmoe_config.validate_for_model(config, moe_layer_numbers(config))
    return config


def build_model_chunks(args, config) -> list:
    """One model per virtual pipeline stage on this rank (one without virtual stages)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ordmoe_megatron import cpu_emulation
    from ordmoe_megatron.model import OrdMoEGPTModel
    from ordmoe_megatron.model_flags import flags_from_args, gpt_model_from_flags

    flags = flags_from_args(args)
    spec = None
    if args.sequence_parallel and not torch.cuda.is_available():
        # torch's LayerNorm refuses sequence parallelism; the CPU stand-in does not.
        spec = cpu_emulation.sequence_parallel_layer_spec(get_gpt_layer_local_spec(
            num_experts=args.num_experts, moe_grouped_gemm=False, qk_layernorm=args.qk_layernorm,
            normalization=args.normalization))
    extra = {} if args.ordmoe_config is None else dict(model_class=OrdMoEGPTModel, ordmoe=args.ordmoe_config)
    chunks = []
    for vp_stage in range(virtual_pipeline_size(args) or 1):
        kwargs = dict(extra, vp_stage=vp_stage) if virtual_pipeline_size(args) else extra
        chunks.append(gpt_model_from_flags(flags, config, layer_spec=spec, **kwargs))
    return chunks


def prepare_data(args) -> Optional[dict]:
    """Resolve the data source (preset corpus, Megatron files or mock); set the vocabulary size
    from the tokenizer. Clear errors for missing files or a tokenizer that does not fit."""
    from ordmoe_megatron import data

    if args.mock_data:
        return None
    if args.preset:
        paths = data.prepare_tiny_data(os.path.join(args.work_dir, "data"), seed=args.seed)
        args.data_path, args.valid_data_path = paths["train_prefix"], paths["valid_prefix"]
        args.tokenizer_model = paths["tokenizer_model"]
    else:
        paths = {}
    if not os.path.isfile(args.tokenizer_model):
        raise SystemExit(f"ordmoe-pretrain: --tokenizer-model {args.tokenizer_model} does not exist")
    tokenizer = data.load_tokenizer(args.tokenizer_model)
    try:
        for prefix in filter(None, (args.data_path, args.valid_data_path)):
            data.check_data_files(prefix)
            data.check_tokenizer_matches_data(tokenizer, prefix)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    args.vocab_size = tokenizer.vocab_size
    return {**paths, "tokenizer": tokenizer}


def stream_factory(args, data_info):
    """``(split, first micro-batch) -> micro-batch stream`` for the trainer."""
    from ordmoe_megatron.data import batches

    if data_info is None:
        return lambda split, start: batches.synthetic_micro_batches(
            args.seed + (0 if split == "train" else 1), args.vocab_size, args.seq_length, args.micro_batch_size, start)
    from ordmoe_megatron.data import build_gpt_datasets

    per_eval = args.eval_iters * args.global_batch_size
    evals = args.train_iters // args.eval_interval + 2 if args.eval_interval else 2
    train_ds, valid_ds, _ = build_gpt_datasets(
        args.data_path, data_info["tokenizer"], args.seq_length,
        num_samples=(max(args.train_iters, 1) * args.global_batch_size, evals * per_eval, None), seed=args.seed,
        valid_prefix=args.valid_data_path, split=args.split, create_attention_mask=False,
    )
    datasets = {"train": train_ds, "valid": valid_ds or train_ds}
    return lambda split, start: batches.dataset_micro_batches(datasets[split], args.micro_batch_size, start)


def run_meta(args) -> dict:
    """What a checkpoint records to be resumed and checked against the next run."""
    from ordmoe_megatron.model_flags import flags_from_args

    cfg = args.ordmoe_config
    return {
        "model_flags": flags_from_args(args),
        "ordmoe": None if cfg is None else {k: v for k, v in vars(cfg).items() if k != "scope_layers"},
        "tokenizer_model": args.tokenizer_model,
        "global_batch_size": args.global_batch_size,
        "seed": args.seed,
    }


def describe(args) -> str:
    """The --dry-run report: configuration, parallel layout, tier layout."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    dp = world // (tp * pp)
    lines = ["configuration:"]
    lines += [f"  {k:40s} {v}" for k, v in sorted(vars(args).items()) if k != "ordmoe_config"]
    lines += [
        "parallel layout:",
        f"  world {world} = TP {tp} x PP {pp} x DP {dp}; EP {ep}"
        + (f" (expert TP {args.expert_tensor_parallel_size})" if args.expert_tensor_parallel_size else "")
        + (", sequence parallel" if args.sequence_parallel else "")
        + (f", {virtual_pipeline_size(args)} virtual stages per pipeline rank" if virtual_pipeline_size(args) else ""),
        f"  micro-batches per step and data-parallel rank: {args.global_batch_size // (args.micro_batch_size * dp)}",
        "tier layout:",
    ]
    cfg = args.ordmoe_config
    if cfg is None:
        lines.append("  OrdMoE off (--no-ordmoe): plain top-K")
    else:
        lines.append("  " + cfg.describe(args.num_experts, args.moe_router_topk))
        seq = args.seq_length // tp if args.sequence_parallel else args.seq_length
        lines.append(f"  paths per micro-batch: {cfg.num_tiers}; activations between pipeline stages: "
                     f"[{seq}, {cfg.num_tiers} x {args.micro_batch_size}, {args.hidden_size}]")
    return "\n".join(lines)


def run_training(args, config, data_info, label: str):
    from ordmoe_megatron import checkpointing
    from ordmoe_megatron.model_flags import flags_from_args
    from ordmoe_megatron.trainer import setup, train

    if checkpointing.has_checkpoint(args.load):
        try:
            checkpointing.check_compatible(args.load, flags_from_args(args))
        except checkpointing.CheckpointError as err:
            raise SystemExit(f"ordmoe-pretrain: {err}") from None
    trainer = setup(args, config, build_model_chunks(args, config), stream_factory(args, data_info))
    if _is_last_rank():
        cfg = args.ordmoe_config
        print((cfg.describe(args.num_experts, args.moe_router_topk) if cfg else f"{label}: plain top-K routing")
              + (f"; resuming at iteration {trainer.iteration}" if trainer.iteration else ""), flush=True)
    train(trainer, run_meta(args))
    if args.plot_out and args.metrics_out and _is_last_rank() and os.path.exists(args.metrics_out):
        from ordmoe_megatron.plotting import plot_metrics

        plot_metrics(args.metrics_out, args.plot_out, title=label)
    return trainer


def evaluate_run(args, config, data_info, trainer, tasks) -> dict:
    """Held-out perplexity of every path, tier ordering, and path-1 exact match on the tasks."""
    from ordmoe_megatron.evaluation import evaluate_paths, exact_match_accuracy

    result = evaluate_paths(trainer, trainer.data("valid"), max(args.eval_iters, 1))
    single_model = (args.tensor_model_parallel_size == args.pipeline_model_parallel_size
                    == args.expert_model_parallel_size == 1)
    if tasks and single_model:
        result["exact_match"] = exact_match_accuracy(trainer.chunks[0], data_info["tokenizer"], tasks)
    return result


def main(argv=None) -> int:
    # Megatron warns at import about every missing GPU library (TE, Apex); not news on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    if args.dry_run:
        print(describe(args))
        return 0
    data_info = prepare_data(args)
    try:
        config = build_config(args)
    except ValueError as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    init_distributed(args)
    try:
        run(args, config, data_info)
    finally:
        # An orderly shutdown: a process group left to interpreter exit can abort the process
        # ("terminate called without an active exception") after a successful run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def run(args, config, data_info) -> None:
    """Train, then for a preset: evaluate, optionally train and evaluate the baseline, report."""
    trainer = run_training(args, config, data_info, "OrdMoE" if args.ordmoe_config else "top-K")
    if not args.preset:
        return

    from ordmoe_megatron.data import read_jsonl
    from ordmoe_megatron.evaluation import format_eval_table

    tasks = list(read_jsonl(data_info["heldout_tasks"]))
    label = f"OrdMoE (C={args.ordmoe_num_tiers})" if args.ordmoe_config else "top-K"
    rows = {label: evaluate_run(args, config, data_info, trainer, tasks)}
    if args.compare_baseline:
        baseline = baseline_args(args)
        base_config = build_config(baseline)
        run_training(baseline, base_config, data_info, "top-K baseline")
        # Evaluate the baseline's weights with the same tier paths, to compare tier ordering too.
        probe = argparse.Namespace(**{**vars(args), "load": baseline.save, "finetune": True, "train_iters": 0})
        probe_config = build_config(probe)  # a fresh config: the trainer stores process-group hooks in it
        probe_trainer = _setup_only(probe, probe_config, data_info)
        rows["top-K baseline"] = evaluate_run(probe, probe_config, data_info, probe_trainer, tasks)
    if _is_last_rank():
        table = format_eval_table(rows)
        print("\nheld-out evaluation (valid split; exact match of path 1 on held-out synthetic tasks)\n" + table)
        with open(os.path.join(args.work_dir, "eval.json"), "w") as f:
            json.dump(rows, f, indent=2)
        print(f"\nwrote {os.path.join(args.work_dir, 'eval.json')}, {args.metrics_out}, {args.plot_out}; "
              f"checkpoint in {args.save}")


def baseline_args(args) -> argparse.Namespace:
    root = os.path.join(args.work_dir, "baseline")
    values = dict(vars(args), ordmoe=False, ordmoe_config=None, save=os.path.join(root, "checkpoints"),
                  load=os.path.join(root, "checkpoints"), metrics_out=os.path.join(root, "metrics.jsonl"),
                  plot_out=os.path.join(root, "metrics.png"))
    baseline = argparse.Namespace(**values)
    _check_outputs(baseline)
    return baseline


def _setup_only(args, config, data_info):
    from ordmoe_megatron.trainer import setup

    return setup(args, config, build_model_chunks(args, config), stream_factory(args, data_info))


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


if __name__ == "__main__":
    sys.exit(main())
