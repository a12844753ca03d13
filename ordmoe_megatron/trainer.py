"""The training loop of ``ordmoe-pretrain``, built from megatron-core's own pieces.

``setup`` builds the model chunks (one per virtual pipeline stage), Megatron's
``DistributedDataParallel``, optimizer and LR scheduler, the schedule (through the OrdMoE hook)
and the data streams, and resumes from ``--load``. ``train_step`` is one optimizer step;
``train`` is the loop with Megatron-style log lines, metrics JSON lines, evaluation and saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from typing import Callable, Iterator, Optional

import torch

from ordmoe_megatron.config import OrdMoEConfig


@dataclasses.dataclass
class Trainer:
    args: argparse.Namespace
    config: object
    model: list  # DDP-wrapped chunks, one per virtual pipeline stage
    optimizer: object
    scheduler: object
    forward_backward: Callable
    num_paths: int
    num_microbatches: int  # per data-parallel rank and step
    iteration: int = 0
    make_stream: Optional[Callable[[str, int], Iterator[dict]]] = None  # (split, first micro-batch)

    @property
    def chunks(self) -> list:
        """The GPT models themselves, without the DDP and BF16 wrappers."""
        from megatron.core.transformer.module import Float16Module

        inner = [m.module for m in self.model]
        return [c.module if isinstance(c, Float16Module) else c for c in inner]

    def data(self, split: str, start_microbatch: int = 0):
        """One stream of this rank's micro-batches per model chunk, as the schedules want it."""
        from megatron.core import parallel_state

        from ordmoe_megatron.data.batches import shard_micro_batches

        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        streams = [shard_micro_batches(self.make_stream(split, start_microbatch), dp_rank, dp_size) for _ in self.model]
        return streams if len(streams) > 1 else streams[0]


def forward_step(data_iterator, model, *, loss_func):
    """Megatron ``forward_step``: one micro-batch through the model, loss bound to its mask."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


def loss_function(trainer: Trainer):
    from ordmoe_megatron.objective import ordmoe_loss

    return functools.partial(
        ordmoe_loss, ordmoe=trainer.args.ordmoe_config or OrdMoEConfig(num_tiers=1), num_paths=trainer.num_paths,
        vocab_size=trainer.chunks[0].vocab_size, per_token_loss=trainer.args.calculate_per_token_loss,
    )


def setup(args, config, chunks: list, make_stream) -> Trainer:
    """Everything a step needs around the model ``chunks``; resumes model, optimizer, scheduler,
    RNG and data position from ``args.load`` when it holds a checkpoint."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from ordmoe_megatron import checkpointing
    from ordmoe_megatron.schedules import get_ordmoe_forward_backward_func

    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    vocab_size = chunks[0].vocab_size
    wrapped = [Float16Module(config, chunk) for chunk in chunks] if config.bf16 else chunks
    model = [DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=config.bf16), chunk)
             for chunk in wrapped]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        clip_grad=args.clip_grad, bf16=config.bf16, fp16=False),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=max(args.train_iters, args.lr_warmup_iters + 1), lr_decay_style="cosine",
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=max(args.train_iters, 1),
        wd_incr_style="constant",
    )
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    ordmoe = args.ordmoe_config
    if ordmoe is not None and ordmoe.enabled:
        forward_backward = get_ordmoe_forward_backward_func(ordmoe, vocab_size, args.calculate_per_token_loss)
        num_paths = ordmoe.num_tiers
    else:
        forward_backward, num_paths = get_forward_backward_func(), 1
    trainer = Trainer(args, config, model, optimizer, scheduler, forward_backward, num_paths,
                      args.global_batch_size // (args.micro_batch_size * parallel_state.get_data_parallel_world_size()),
                      make_stream=make_stream)
    if checkpointing.has_checkpoint(args.load):
        # A converted ('release') checkpoint holds weights only; --finetune starts afresh from weights.
        resume = not args.finetune and checkpointing.latest_iteration(args.load) is not None
        run = checkpointing.load_checkpoint(args.load, chunks, optimizer if resume else None, load_rng=resume)
        if resume:
            trainer.iteration = run["iteration"]
            scheduler.load_state_dict(run["scheduler"])
    return trainer


def train_step(trainer: Trainer, data, before_optimizer_step=None) -> dict:
    """One optimizer step over a global batch; the reduced metrics, on every rank."""
    from megatron.core import parallel_state

    from ordmoe_megatron.objective import reduce_reports

    args = trainer.args
    start = time.perf_counter()
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    reports = trainer.forward_backward(
        forward_step_func=functools.partial(forward_step, loss_func=loss_function(trainer)),
        data_iterator=data, model=trainer.model, num_microbatches=trainer.num_microbatches,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False,
    )
    if before_optimizer_step is not None:
        before_optimizer_step(trainer)
    _, grad_norm, _ = trainer.optimizer.step()
    trainer.scheduler.step(increment=1)
    trainer.iteration += 1
    reduced = broadcast_from_last_stage(reduce_reports(reports, parallel_state.get_data_parallel_group()))
    moe = moe_metrics(trainer.chunks, trainer.num_microbatches)
    paths = trainer.num_paths
    return {
        "iteration": trainer.iteration,
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


def broadcast_from_last_stage(values: dict) -> dict:
    """Loss reports exist on the last pipeline stage only; give every rank the same numbers."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    box = [values]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast_object_list(box, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def moe_metrics(chunks: list, num_microbatches: int) -> dict:
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
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TierRouter)]
    loads = [r.tier_load for r in routers if r.tier_load is not None]
    if loads and all(l.shape == loads[0].shape for l in loads):
        load = torch.stack(loads)  # [layers, paths, experts]
        metrics["tier_load_max_over_mean"] = (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean(0).tolist()
    for router in routers:
        router.tier_load = None
    return metrics


def format_log_line(iteration: int, train_iters: int, values: dict, elapsed_ms: float, tokens_per_s: float) -> str:
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"throughput (tokens/s, all paths): {tokens_per_s:.0f}",
        f"learning rate: {values['lr']:.3E}",
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


def mean_record(records: list[dict]) -> dict:
    out = {}
    for key, first in records[-1].items():
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = sum(r[key] for r in records) / len(records)
        elif isinstance(first, list) and first:
            out[key] = [sum(r[key][i] for r in records) / len(records) for i in range(len(first))]
        else:
            out[key] = first
    return out


def save_grads_hook(path: str):
    """Save the reduced gradients in the model's own sharded layout, so that gradients from any
    parallel layout load into any other (e.g. one process) for comparison."""
    from ordmoe_megatron import checkpointing

    def save(trainer: Trainer) -> None:
        params = [p for chunk in trainer.chunks for p in chunk.parameters()]
        weights = [p.data for p in params]
        for p in params:
            p.data = p.main_grad.view_as(p.data).to(p.dtype)
        try:
            state = checkpointing.sharded_model_state(trainer.chunks)
            checkpointing.save_checkpoint(path, trainer.iteration + 1, state, include_rng=False)
        finally:
            for p, w in zip(params, weights):
                p.data = w

    return save


def is_logging_rank() -> bool:
    """Megatron-LM logs from the last rank, which holds the last pipeline stage."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def train(trainer: Trainer, run_meta: dict) -> list[dict]:
    """The loop: steps, log lines, metrics JSON lines, evaluation, checkpoints."""
    from ordmoe_megatron import checkpointing
    from ordmoe_megatron.evaluation import evaluate_paths

    args = trainer.args
    logging = is_logging_rank()
    metrics_file = _open_metrics(args.metrics_out, trainer.iteration) if args.metrics_out and logging else None
    data = trainer.data("train", trainer.iteration * trainer.num_microbatches * _dp())
    history, window = [], []

    def save():
        checkpointing.save_checkpoint(args.save, trainer.iteration, checkpointing.sharded_model_state(trainer.chunks),
                                      trainer.optimizer, {**run_meta, "scheduler": trainer.scheduler.state_dict()})
        if logging:
            print(f" saved checkpoint at iteration {trainer.iteration:8d} to {args.save}", flush=True)

    try:
        while trainer.iteration < args.train_iters:
            hook = save_grads_hook(args.save_grads) if args.save_grads and not history else None
            record = train_step(trainer, data, before_optimizer_step=hook)
            history.append(record)
            window.append(record)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            it = trainer.iteration
            if logging and (it % args.log_interval == 0 or it == args.train_iters):
                seconds = sum(r["time_s"] for r in window)
                print(format_log_line(it, args.train_iters, mean_record(window), 1000 * seconds / len(window),
                                      sum(r["tokens"] for r in window) / seconds), flush=True)
                window = []
            if args.eval_interval and args.eval_iters and it % args.eval_interval == 0 and trainer.make_stream:
                result = evaluate_paths(trainer, trainer.data("valid"), args.eval_iters)
                if logging:
                    print(f" validation at iteration {it:8d} | lm loss: {result['lm_loss']:.6E} | path ppl: "
                          + " / ".join(f"{p:.2f}" for p in result["path_perplexity"]) + " |", flush=True)
            if args.save and args.save_interval and it % args.save_interval == 0:
                save()
    finally:
        if metrics_file:
            metrics_file.close()
    if args.save and history and not (args.save_interval and trainer.iteration % args.save_interval == 0):
        save()
    return history


def _dp() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def _open_metrics(path: str, resumed_at: int):
    """Append after a resume (dropping lines past the checkpoint); otherwise start the file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if resumed_at and os.path.exists(path):
        kept = [line for line in open(path) if line.strip() and json.loads(line)["iteration"] <= resumed_at]
        f = open(path, "w")
        f.writelines(kept)
        return f
    return open(path, "w")
