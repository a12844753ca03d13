"""``ordmoe-pretrain``: train a small GPT-MoE with OrdMoE using megatron-core's own pieces.

One process on CPU (gloo, through ``cpu_emulation``) or on a GPU, or several under ``torchrun``.
The embedded default needs no download: synthetic token streams with learnable structure.
Flags follow Megatron-LM's names; ``--ordmoe`` switches OrdMoE on.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import warnings
from typing import Iterator, Optional

import torch

from ordmoe_megatron.arguments import add_ordmoe_args, ordmoe_config_from_args
from ordmoe_megatron.config import OrdMoEConfig

TINY_MODEL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_experts=8, moe_router_topk=2,
    moe_ffn_hidden_size=64, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
    disable_bias_linear=True, untie_embeddings_and_output_weights=True, vocab_size=256,
    make_vocab_size_divisible_by=128, seq_length=64, max_position_embeddings=64,
)


def build_parser() -> argparse.ArgumentParser:
    from ordmoe_megatron.model_flags import add_model_args

    parser = argparse.ArgumentParser(
        prog="ordmoe-pretrain", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(parser)
    parser.set_defaults(**TINY_MODEL)
    add_ordmoe_args(parser)
    parser.set_defaults(ordmoe=True)
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
    train.add_argument("--log-interval", type=int, default=5)
    par = parser.add_argument_group("parallelism (data-parallel size = world size / (TP x PP))")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    par.add_argument("--expert-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--load", type=str, default=None, help="Start from the model weights of this checkpoint directory.")
    ckpt.add_argument("--save", type=str, default=None, help="Save the model weights here at the end.")
    ckpt.add_argument("--save-grads", type=str, default=None,
                      help="Save the first iteration's gradients as a checkpoint (to compare parallel layouts).")
    train.add_argument("--metrics-out", type=str, default=None, help="JSON lines, one object per iteration.")
    train.add_argument("--overwrite", action="store_true", help="Replace an existing --metrics-out file.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    _check_layout(args)
    if args.metrics_out and os.path.exists(args.metrics_out) and not args.overwrite:
        raise SystemExit(f"ordmoe-pretrain: {args.metrics_out} exists; pass --overwrite to replace it")
    try:
        args.ordmoe_config = ordmoe_config_from_args(args)
    except ValueError as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    return args


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


def data_parallel_size(args) -> int:
    return int(os.environ.get("WORLD_SIZE", 1)) // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)


def virtual_pipeline_size(args) -> Optional[int]:
    vstage = args.num_layers_per_virtual_pipeline_stage
    return None if vstage is None else args.num_layers // args.pipeline_model_parallel_size // vstage


def init_distributed(args) -> None:
    """torch.distributed (gloo on CPU with the emulation, NCCL on GPU) and Megatron's state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron import cpu_emulation

    cpu_emulation.enable()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        )
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_config(args):
    """The model's ``TransformerConfig``; refuses OrdMoE settings the model cannot honour."""
    from ordmoe_megatron import cpu_emulation
    from ordmoe_megatron.model import moe_layer_numbers
    from ordmoe_megatron.model_flags import flags_from_args, transformer_config_from_flags

    config = transformer_config_from_flags(
        flags_from_args(args),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type, calculate_per_token_loss=args.calculate_per_token_loss,
        tensor_model_parallel_size=args.tensor_model_parallel_size, sequence_parallel=args.sequence_parallel,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size, pipeline_dtype=torch.float32,
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


def checkpoint_dir(root: str, iteration: int) -> str:
    """Megatron-LM's layout: ``<root>/iter_0000010`` (``release`` for converted checkpoints)."""
    return os.path.join(root, "release" if iteration < 0 else f"iter_{iteration:07d}")


def save_model(root: str, chunks: list, iteration: int) -> str:
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(root, iteration)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(_model_sharded_state_dict(chunks), path)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("release" if iteration < 0 else str(iteration))
    torch.distributed.barrier()
    return path


def load_model(root: str, chunks: list) -> None:
    from megatron.core import dist_checkpointing

    tracker = os.path.join(root, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        raise SystemExit(f"ordmoe-pretrain: --load {root}: no latest_checkpointed_iteration.txt; is it a checkpoint directory?")
    tag = open(tracker).read().strip()
    path = checkpoint_dir(root, -1 if tag == "release" else int(tag))
    state = dist_checkpointing.load(_model_sharded_state_dict(chunks), path)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"])


def _model_sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def synthetic_batches(seed: int, vocab: int, seq: int, batch: int) -> Iterator[dict]:
    """Endless deterministic batches of three learnable patterns (no download needed): counting
    with a small stride, a short repeated motif, and copy-after-separator (an induction task)."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq + 1)
    while True:
        rows = []
        for _ in range(batch):
            kind = int(torch.randint(3, (1,), generator=g))
            if kind == 0:
                start, step = torch.randint(vocab, (1,), generator=g), torch.randint(1, 3, (1,), generator=g)
                row = (start + step * positions) % vocab
            elif kind == 1:
                motif = torch.randint(vocab, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
                row = motif.repeat(seq // len(motif) + 2)[: seq + 1]
            else:
                half = seq // 2
                segment = torch.randint(1, vocab, (half,), generator=g)
                row = torch.cat([segment, torch.zeros(1, dtype=torch.long), segment])[: seq + 1]
            rows.append(row.long())
        tokens = torch.stack(rows)
        yield dict(
            tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
            loss_mask=torch.ones(batch, seq), position_ids=positions[:seq].unsqueeze(0).expand(batch, -1).contiguous(),
        )


def forward_step(data_iterator, model, *, loss_func):
    """Megatron ``forward_step``: one micro-batch through the model, loss bound to its mask."""
    batch = {k: v.to(_device()) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def moe_metrics(model_chunks: list, num_microbatches: int) -> dict:
    """Load-balancing loss (path 1, mean over MoE layers) and per-tier expert load, then reset."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    from ordmoe_megatron.router import TierRouter

    reduce_aux_losses_tracker_across_ranks()
    metrics = {}
    for name, entry in get_moe_layer_wise_logging_tracker().items():
        values = entry["values"].float()
        metrics[name] = (values[values != 0].mean() / num_microbatches).item() if (values != 0).any() else 0.0
    clear_aux_losses_tracker()
    routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TierRouter)]
    loads = [r.tier_load for r in routers if r.tier_load is not None]
    if loads and all(l.shape == loads[0].shape for l in loads):
        load = torch.stack(loads)  # [layers, paths, experts]
        metrics["tier_load_max_over_mean"] = (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean(0).tolist()
    for router in routers:
        router.tier_load = None
    return metrics


def format_log_line(iteration: int, train_iters: int, values: dict, elapsed_ms: float, tokens_per_s: float, lr: float) -> str:
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"throughput (tokens/s, all paths): {tokens_per_s:.0f}",
        f"learning rate: {lr:.3E}",
        f"lm loss: {values['lm_loss']:.6E}",
    ]
    if values.get("rank_loss") is not None:
        parts.append(f"rank loss: {values['rank_loss']:.6E}")
    parts.append(f"aux loss: {values['aux_loss']:.6E}")
    if values.get("path_logprob"):
        parts.append("path logprob: " + " / ".join(f"{v:.4f}" for v in values["path_logprob"]))
        parts.append(f"tier order acc: {values['tier_order_acc']:.3f}")
    if values.get("tier_load_max_over_mean"):
        parts.append("tier load max/mean: " + " / ".join(f"{v:.2f}" for v in values["tier_load_max_over_mean"]))
    return " | ".join(parts) + " |"


@dataclasses.dataclass
class Trainer:
    """Everything a training step needs, built by ``setup``."""

    args: argparse.Namespace
    config: object
    model: list  # DDP-wrapped chunks, one per virtual pipeline stage
    optimizer: object
    scheduler: object
    forward_backward: object
    data: list  # one micro-batch iterator per chunk
    num_paths: int
    num_microbatches: int


def setup(args, config) -> Trainer:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ordmoe_megatron.objective import ordmoe_loss
    from ordmoe_megatron.schedules import get_ordmoe_forward_backward_func

    init_distributed(args)
    ordmoe = args.ordmoe_config
    chunks = build_model_chunks(args, config)
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    if args.load:
        load_model(args.load, chunks)
    model = [DistributedDataParallel(config, DistributedDataParallelConfig(), chunk) for chunk in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        clip_grad=args.clip_grad, bf16=False, fp16=False),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style="cosine", start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    vocab_size = chunks[0].vocab_size
    if ordmoe is not None and ordmoe.enabled:
        forward_backward = get_ordmoe_forward_backward_func(ordmoe, vocab_size, args.calculate_per_token_loss)
        num_paths = ordmoe.num_tiers
    else:
        forward_backward, num_paths = get_forward_backward_func(), 1
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    data = [
        _shard(synthetic_batches(args.seed, args.vocab_size, args.seq_length, args.micro_batch_size), dp_rank, dp_size)
        for _ in chunks
    ]
    return Trainer(args, config, model, optimizer, scheduler, forward_backward, data, num_paths,
                   args.global_batch_size // (args.micro_batch_size * dp_size))


def _shard(batches: Iterator[dict], rank: int, size: int) -> Iterator[dict]:
    """Data-parallel rank ``rank`` takes micro-batches ``rank, rank + size, ...`` of the stream,
    so every layout averages the same micro-batches as the single-process run."""
    for index, batch in enumerate(batches):
        if index % size == rank:
            yield batch


def train_step(trainer: Trainer, before_optimizer_step=None) -> dict:
    """One optimizer step over a global batch; returns the reduced metrics (on every rank)."""
    from megatron.core import parallel_state

    from ordmoe_megatron.objective import ordmoe_loss, reduce_reports

    args = trainer.args
    ordmoe = args.ordmoe_config or OrdMoEConfig(num_tiers=1)
    loss_func = functools.partial(ordmoe_loss, ordmoe=ordmoe, num_paths=trainer.num_paths,
                                  vocab_size=trainer.model[0].module.vocab_size,
                                  per_token_loss=args.calculate_per_token_loss)
    start = time.perf_counter()
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    reports = trainer.forward_backward(
        forward_step_func=functools.partial(forward_step, loss_func=loss_func),
        data_iterator=trainer.data if len(trainer.data) > 1 else trainer.data[0],
        model=trainer.model, num_microbatches=trainer.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False,
    )
    if before_optimizer_step is not None:
        before_optimizer_step(trainer)
    _, grad_norm, _ = trainer.optimizer.step()
    trainer.scheduler.step(increment=1)
    reduced = _broadcast_from_last_stage(reduce_reports(reports, parallel_state.get_data_parallel_group()))
    moe = moe_metrics(trainer.model, trainer.num_microbatches)
    paths = trainer.num_paths
    return {
        "lm_loss": reduced["lm loss"],
        "rank_loss": reduced.get("rank loss"),
        "aux_loss": moe.get("load_balancing_loss", 0.0),
        "path_logprob": [reduced[f"path{j + 1} logprob"] for j in range(paths)] if paths > 1 else [],
        "tier_order_acc": reduced.get("tier order acc"),
        "tier_load_max_over_mean": moe.get("tier_load_max_over_mean"),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "tokens": args.global_batch_size * args.seq_length * paths,
        "time_s": time.perf_counter() - start,
    }


def _save_grads_hook(path: str):
    """Save the reduced gradients in the model's own sharded layout, so that a checkpoint of
    gradients from any parallel layout loads into any other (e.g. a single-process model)."""

    def save(trainer: Trainer) -> None:
        chunks = [m.module for m in trainer.model]
        params = [p for chunk in chunks for p in chunk.parameters()]
        weights = [p.data for p in params]
        for p in params:
            p.data = p.main_grad.view_as(p.data).to(p.dtype)
        try:
            save_model(path, chunks, 1)
        finally:
            for p, w in zip(params, weights):
                p.data = w

    return save


def _broadcast_from_last_stage(values: dict) -> dict:
    """Loss reports exist on the last pipeline stage only; give every rank the same numbers."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    box = [values]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast_object_list(box, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def train(args, config) -> list[dict]:
    trainer = setup(args, config)
    ordmoe = args.ordmoe_config
    is_logging_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    if ordmoe is not None and is_logging_rank:
        print(ordmoe.describe(config.num_moe_experts, config.moe_router_topk), flush=True)
    metrics_file = open(args.metrics_out, "w") if args.metrics_out and is_logging_rank else None
    history, window = [], []
    try:
        for iteration in range(1, args.train_iters + 1):
            hook = _save_grads_hook(args.save_grads) if iteration == 1 and args.save_grads else None
            record = {"iteration": iteration, **train_step(trainer, before_optimizer_step=hook)}
            history.append(record)
            window.append(record)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if (iteration % args.log_interval == 0 or iteration == args.train_iters) and is_logging_rank:
                print(format_log_line(iteration, args.train_iters, _mean_record(window),
                                      1000 * sum(r["time_s"] for r in window) / len(window),
                                      sum(r["tokens"] for r in window) / sum(r["time_s"] for r in window),
                                      record["lr"]), flush=True)
                window = []
    finally:
        if metrics_file:
            metrics_file.close()
    if args.save:
        save_model(args.save, [m.module for m in trainer.model], args.train_iters)
    return history


def _mean_record(records: list[dict]) -> dict:
    out = {}
    for key, first in records[0].items():
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = sum(r[key] for r in records) / len(records)
        elif isinstance(first, list) and first:
            out[key] = [sum(r[key][i] for r in records) / len(records) for i in range(len(first))]
        else:
            out[key] = first
    return out


def main(argv=None) -> int:
    # Megatron warns at import about every missing GPU library (TE, Apex); not news on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ValueError as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    train(args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
