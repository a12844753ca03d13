"""The training loop of ``ordmoe-pretrain``, built from megatron-core's own pieces.

``setup`` wraps the model chunks (one per virtual pipeline stage) in Megatron's
``DistributedDataParallel``, builds the optimizer, the LR scheduler and the schedule (through the
OrdMoE hook), and resumes from ``--load``. ``train_step`` is one optimizer step; ``train`` is the
loop with Megatron-style log lines, metrics JSON lines, evaluation and saves; ``evaluate_paths``
runs the schedules forward-only over held-out data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from ordmoe_megatron.data.batches import shard_micro_batches
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore import tiny_vl
from ordmoe_megatron.mcore.flops import ordmoe_run_step_flops
from ordmoe_megatron.mcore.loss import lm_loss, reduce_reports
from ordmoe_megatron.mcore.metrics import pop_moe_metrics, tier_load_paused
from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func
from ordmoe_megatron.runtime import checkpointing
from ordmoe_megatron.runtime.distributed import (
    broadcast_from_last_stage,
    data_parallel_rank_and_size,
    device,
    is_last_rank,
)
from ordmoe_megatron.runtime.outputs import read_json_lines
from ordmoe_megatron.train.checks import ResumePlan
from ordmoe_megatron.train.config import RunConfig


@dataclasses.dataclass
class Trainer:
    config: RunConfig
    tconfig: object  # the model's TransformerConfig
    model: list  # DDP-wrapped chunks, one per virtual pipeline stage
    optimizer: object
    scheduler: object
    forward_backward: Callable
    num_microbatches: int  # per data-parallel rank and step
    iteration: int = 0
    make_stream: Optional[Callable[[str, int], Iterator[dict]]] = None  # (split, first micro-batch)
    run_id: str = ""  # the run's identity: in its checkpoints and in every metrics line
    stopped_by_signal: bool = False
    step_flops: float = 0.0  # training FLOPs of one step, all paths (mcore.flops)
    # more held-out scores for the validation lines: (trainer) -> {name: value} (--preset tiny-vl's
    # answer accuracy per question kind)
    extra_eval: Optional[Callable[["Trainer"], dict]] = None

    @property
    def num_paths(self) -> int:
        return self.config.num_paths

    @property
    def chunks(self) -> list:
        """The GPT models themselves, without the DDP and BF16 wrappers."""
        inner = [m.module for m in self.model]
        return [c.module if isinstance(c, Float16Module) else c for c in inner]

    def data(self, split: str, start_microbatch: int = 0):
        """One stream of this rank's micro-batches per model chunk, as the schedules want it."""
        dp_rank, dp_size = data_parallel_rank_and_size()
        streams = [shard_micro_batches(self.make_stream(split, start_microbatch), dp_rank, dp_size) for _ in self.model]
        return streams if len(streams) > 1 else streams[0]

    def run_schedule(self, data, forward_only: bool) -> list[dict]:
        """One global batch through Megatron's schedule; the last stage's loss reports."""
        return self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=data,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.config.seq_length,
            micro_batch_size=self.config.micro_batch_size,
            forward_only=forward_only,
        )


def forward_step(data_iterator, model):
    """Megatron ``forward_step``: one micro-batch through the model, the LM loss bound to its mask
    (the OrdMoE schedules put the OrdMoE loss in its place)."""
    batch = {k: v.to(device()) for k, v in next(data_iterator).items()}
    packed = None
    if "cu_seqlens" in batch:  # --sft-pack: the micro-batch's conversations in one THD row
        cu = batch["cu_seqlens"]
        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
    if "images" in batch:  # --preset tiny-vl: LLaVAModel returns the mask over its combined positions
        output, loss_mask = tiny_vl.vl_forward(model, batch)
        return output, functools.partial(lm_loss, loss_mask)
    # The loss mask goes in as Megatron-LM's pretrain_gpt passes it: the MTP loss is masked by it.
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        packed_seq_params=packed,
    )
    return output, functools.partial(lm_loss, batch["loss_mask"])


def setup(config: RunConfig, tconfig, chunks: list, make_stream, plan: ResumePlan) -> Trainer:
    """Everything a step needs around the model ``chunks``; loads what ``plan`` says from
    ``config.load``: the weights, or for a resume also the optimizer, the LR scheduler, the random
    states and the data position."""
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    vocab_size = getattr(chunks[0], "language_model", chunks[0]).vocab_size  # a LLaVAModel's is inside
    wrapped = [Float16Module(tconfig, chunk) for chunk in chunks] if tconfig.bf16 else chunks
    model = [
        DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=tconfig.bf16), chunk)
        for chunk in wrapped
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=config.lr,
            min_lr=config.min_lr,
            weight_decay=config.weight_decay,
            clip_grad=config.clip_grad,
            bf16=tconfig.bf16,
            fp16=False,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.lr_warmup_iters,
        lr_decay_steps=max(config.train_iters, config.lr_warmup_iters + 1),
        lr_decay_style="cosine",
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=max(config.train_iters, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=config.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not config.override_opt_param_scheduler,
    )
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss

    if config.ordmoe is not None:
        # step_fn: sub-sampled lower paths are drawn per (seed, step), so a resumed run draws alike.
        forward_backward = get_ordmoe_forward_backward_func(
            config.ordmoe,
            vocab_size,
            config.calculate_per_token_loss,
            seed=config.seed,
            step_fn=lambda: trainer.iteration,
        )
    else:
        forward_backward = get_forward_backward_func()
    _, dp_size = data_parallel_rank_and_size()
    shared = config.ordmoe.shared_prefix_layers_of(tconfig) if config.ordmoe is not None else 0
    trainer = Trainer(
        config,
        tconfig,
        model,
        optimizer,
        scheduler,
        forward_backward,
        config.global_batch_size // (config.micro_batch_size * dp_size),
        make_stream=make_stream,
        run_id=plan.run_id or uuid.uuid4().hex,
        step_flops=(tiny_vl.vl_step_flops if config.preset == "tiny-vl" else ordmoe_run_step_flops)(
            tconfig,
            vocab_size,
            config.global_batch_size,
            config.seq_length,
            config.ordmoe,
            shared,
            config.micro_batch_size,
        ),
    )
    if plan.kind == "weights":
        checkpointing.load_checkpoint(config.load, chunks, None, load_rng=False, optional=TierRouter.is_running_mean)
    elif plan.loads:
        run = checkpointing.load_checkpoint(config.load, chunks, optimizer, load_rng=plan.load_rng)
        trainer.iteration = run["iteration"]
        scheduler.load_state_dict(run["scheduler"])
    return trainer


def train_step(trainer: Trainer, data, before_optimizer_step=None) -> dict:
    """One optimizer step over a global batch; the reduced metrics, on every rank."""
    start = time.perf_counter()
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    reports = trainer.run_schedule(data, forward_only=False)
    if before_optimizer_step is not None:
        before_optimizer_step(trainer)
    _, grad_norm, _ = trainer.optimizer.step()
    trainer.scheduler.step(increment=1)
    trainer.iteration += 1
    reduced = _reduced(reports)
    moe = pop_moe_metrics(trainer.chunks, trainer.num_microbatches)
    paths = trainer.num_paths
    return {
        "run_id": trainer.run_id,
        "iteration": trainer.iteration,
        "lm_loss": reduced["lm loss"],
        "rank_loss": reduced.get("rank loss"),
        "aux_loss": _balancing_loss(moe),
        "path_logprob": [reduced[f"path{j + 1} logprob"] for j in range(paths)] if paths > 1 else [],
        "tier_order_acc": reduced.get("tier order acc"),
        "tier_load_max_over_mean": moe.get("tier_load_max_over_mean"),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "tokens": round(
            trainer.config.global_batch_size * trainer.config.seq_length * trainer.config.paths_per_sequence
        ),
        "flops": trainer.step_flops,
        "time_s": time.perf_counter() - start,
    }


def evaluate_paths(trainer: Trainer, data, iterations: int) -> dict:
    """Forward-only over ``iterations`` global batches: LM loss, each path's mean target
    log-likelihood and perplexity, and the tier-ordering accuracy (reduced like training)."""
    for chunk in trainer.model:
        chunk.eval()
    reports = []
    try:
        with torch.no_grad(), tier_load_paused(trainer.chunks):
            for _ in range(iterations):
                reports += trainer.run_schedule(data, forward_only=True)
    finally:
        for chunk in trainer.model:
            chunk.train()
    reduced = _reduced(reports)
    paths = trainer.num_paths
    logprobs = [reduced[f"path{j + 1} logprob"] for j in range(paths)] if paths > 1 else [-reduced["lm loss"]]
    return {
        "lm_loss": reduced["lm loss"],
        "path_logprob": logprobs,
        "path_perplexity": [math.exp(-lp) for lp in logprobs],
        "tier_order_acc": reduced.get("tier order acc"),
    }


def _reduced(reports: list[dict]) -> dict:
    return broadcast_from_last_stage(reduce_reports(reports, parallel_state.get_data_parallel_group()))


# Megatron's names of its load-balancing losses (compat.moe_aux_loss_names); a model may use several.
_BALANCING_LOSSES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")


def _balancing_loss(moe: dict) -> Optional[float]:
    """The step's load-balancing losses summed (aux_loss, seq_aux_loss, global_aux_loss as the
    model uses them); None for a model without one (aux-loss-free balancing, sinkhorn)."""
    present = [moe[name] for name in _BALANCING_LOSSES if name in moe]
    return sum(present) if present else None


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
    if values.get("aux_loss") is not None:
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


class DivergedError(OrdMoEError):
    """A non-finite loss, gradient norm or weight: the run stops without saving it."""


def non_finite(record: dict) -> list[str]:
    """What is not finite in a step's metrics: the losses and the gradient norm."""
    values = {"lm loss": record["lm_loss"], "rank loss": record["rank_loss"], "grad norm": record["grad_norm"]}
    return [f"{name} {value}" for name, value in values.items() if value is not None and not math.isfinite(value)]


def check_finite_weights(trainer: Trainer) -> None:
    """Every rank's weights are finite (all ranks agree); a ``DivergedError`` otherwise: no
    checkpoint is ever saved with a NaN or an infinity in it."""
    bad = checkpointing.non_finite_parameters(trainer.chunks)
    flag = torch.tensor([int(bool(bad))], device=device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        raise DivergedError(
            f"iteration {trainer.iteration}: the weights are not finite"
            + (f" ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else " on another rank")
            + "; nothing was saved. "
            + _diverged_advice(trainer.config)
        )


def _diverged_advice(config: RunConfig) -> str:
    where = (
        f"--save {config.save} keeps its last finite checkpoint; resume from it, or from an earlier one "
        f"(write its iteration into {checkpointing.TRACKER}), with --load and a lower --lr (with "
        "--override-opt-param-scheduler)"
        if config.save
        else "lower --lr, or keep --clip-grad above 0"
    )
    return "The run diverged: " + where


class StopSignal:
    """SIGTERM (the usual end of a SLURM job or a preempted pod) or SIGINT (Ctrl-C) while
    training: the handler only sets a flag, so a step or a save in progress finishes; at the end
    of each step the ranks agree on it (one all-reduce), save, and stop, as Megatron-LM's
    exit-signal handler does. A second signal of the same kind ends the process at once."""

    def __init__(self, signums: tuple = (signal.SIGTERM, signal.SIGINT)):
        self.signum, self.received = None, False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in signums}

    def _handle(self, signum, frame):
        if self.received and signum == self.signum:  # asked twice: the default action now
            self.restore()
            signal.raise_signal(signum)
            return
        self.received, self.signum = True, signum

    def agreed(self) -> bool:
        flag = torch.tensor([int(self.received)], device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def train(trainer: Trainer, run_meta: dict) -> list[dict]:
    """The loop: steps, log lines, metrics JSON lines, evaluation, checkpoints. On SIGTERM it saves
    (with --save) and stops after the step; ``trainer.stopped_by_signal`` says so."""
    config = trainer.config
    logging = is_last_rank()
    metrics_file = (
        _open_metrics(config.metrics_out, trainer.iteration, trainer.run_id) if config.metrics_out and logging else None
    )
    _, dp_size = data_parallel_rank_and_size()
    data = trainer.data("train", trainer.iteration * trainer.num_microbatches * dp_size)
    history, window = [], []
    stop = StopSignal()

    def save():
        check_finite_weights(trainer)
        checkpointing.save_checkpoint(
            config.save,
            trainer.iteration,
            checkpointing.sharded_model_state(trainer.chunks),
            trainer.optimizer,
            {**run_meta, "run_id": trainer.run_id, "scheduler": trainer.scheduler.state_dict()},
        )
        if logging:
            print(f" saved checkpoint at iteration {trainer.iteration:8d} to {config.save}", flush=True)

    saved_at = None
    try:
        while trainer.iteration < config.train_iters:
            hook = save_grads_hook(config.save_grads) if config.save_grads and not history else None
            record = train_step(trainer, data, before_optimizer_step=hook)
            history.append(record)
            window.append(record)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            it = trainer.iteration
            bad = non_finite(record)  # the same on every rank: reduced and broadcast
            if bad:
                raise DivergedError(
                    f"iteration {it}: {', '.join(bad)}: not finite; stopped without saving this step. "
                    + _diverged_advice(config)
                )
            if logging and (it % config.log_interval == 0 or it == config.train_iters):
                seconds = sum(r["time_s"] for r in window)
                print(
                    format_log_line(
                        it,
                        config.train_iters,
                        mean_record(window),
                        1000 * seconds / len(window),
                        sum(r["tokens"] for r in window) / seconds,
                    ),
                    flush=True,
                )
                window = []
            if stop.agreed():
                trainer.stopped_by_signal = True
                break
            if config.eval_interval and config.eval_iters and it % config.eval_interval == 0 and trainer.make_stream:
                result = evaluate_paths(trainer, trainer.data("valid"), config.eval_iters)
                extra = trainer.extra_eval(trainer) if trainer.extra_eval else {}
                if logging:
                    print(
                        f" validation at iteration {it:8d} | lm loss: {result['lm_loss']:.6E} | path ppl: "
                        + " / ".join(f"{p:.2f}" for p in result["path_perplexity"])
                        + " |"
                        + "".join(f" {name}: {value:.3f} |" for name, value in extra.items()),
                        flush=True,
                    )
            if config.save and config.save_interval and it % config.save_interval == 0:
                save()
                saved_at = it
        if config.save and history and saved_at != trainer.iteration:
            save()  # still under the signal handler: a Ctrl-C now lets the save finish
    finally:
        stop.restore()
        if metrics_file:
            metrics_file.close()
    if trainer.stopped_by_signal and logging:
        print(
            f" stopped by signal {int(stop.signum)} at iteration {trainer.iteration}: "
            + (
                f"saved to {config.save}; run the same command to resume"
                if config.save
                else "no --save was given, so nothing was saved"
            ),
            flush=True,
        )
    return history


def _open_metrics(path: str, resumed_at: int, run_id: str):
    """Keep this run's lines up to the checkpoint (a resume appends after them); start the file
    for a new run."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = []
    if resumed_at and os.path.exists(path):
        records = read_json_lines(path, "--metrics-out")  # a torn last line (a killed run) is dropped
        kept = [json.dumps(r) + "\n" for r in records if r.get("run_id") == run_id and r["iteration"] <= resumed_at]
    f = open(path, "w")
    f.writelines(kept)
    return f
