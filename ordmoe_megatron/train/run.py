"""One ``ordmoe-pretrain`` run from a checked ``RunConfig``: data, model, training, and for a
preset the held-out evaluation, the optional baseline and the closing table."""

from __future__ import annotations

import json
import os
import shutil

import megatron.core
import torch

from ordmoe_megatron.data import read_jsonl
from ordmoe_megatron.mcore.tiny_vl import answer_accuracy
from ordmoe_megatron.runtime import checkpointing, distributed
from ordmoe_megatron.runtime.outputs import RunLock
from ordmoe_megatron.train import build, checks
from ordmoe_megatron.train.checks import ResumePlan
from ordmoe_megatron.train.config import RunConfig, baseline_config, run_record
from ordmoe_megatron.train.evaluation import exact_match_accuracy, format_eval_table
from ordmoe_megatron.train.plotting import plot_metrics
from ordmoe_megatron.train.trainer import Trainer, evaluate_paths, setup, train


def run_meta(config: RunConfig) -> dict:
    """What a checkpoint records besides the weights: the model flags and what defines the run
    (the next run compares against it), the world it was saved by, the megatron-core it ran on."""
    return {
        "model_flags": config.model_flags,
        "run": run_record(config),
        "world_size": distributed.world_size_from_env(),
        # The optimizer state does not reshard across expert-parallel sizes (the weights do).
        "expert_model_parallel_size": config.layout.expert,
        "megatron_core": megatron.core.__version__,
    }


def build_trainer(config: RunConfig, sources: build.DataSources, plan: ResumePlan) -> Trainer:
    tconfig = build.transformer_config(config)  # a fresh one per model: the trainer stores hooks in it
    trainer = setup(config, tconfig, build.model_chunks(config, tconfig), build.stream_factory(config, sources), plan)
    if sources.vl is not None:
        trainer.extra_eval = lambda t: {
            f"{kind} acc": value for kind, value in answer_accuracy(t.chunks[0], sources.vl).items()
        }
    return trainer


def start_afresh(config: RunConfig) -> None:
    """--overwrite on its own outputs: the old run's checkpoints (the tracker first, so that a
    crash from here on cannot resume it), metrics and plot go before the new run starts."""
    if config.save and os.path.isdir(config.save):
        tracker = os.path.join(config.save, checkpointing.TRACKER)
        if os.path.exists(tracker):
            os.remove(tracker)
        for name in os.listdir(config.save):
            if name.startswith(("iter_", "release")):
                shutil.rmtree(os.path.join(config.save, name), ignore_errors=True)
    for path in (config.metrics_out, config.plot_out, config.eval_out):
        if path and os.path.exists(path):
            os.remove(path)


def run_training(config: RunConfig, sources: build.DataSources, plan: ResumePlan, label: str) -> Trainer:
    if plan.kind == "new" and config.overwrite and distributed.is_last_rank():
        start_afresh(config)
    torch.distributed.barrier()
    trainer = build_trainer(config, sources, plan)
    flags = config.model_flags
    if distributed.is_last_rank():
        cfg = config.ordmoe
        for note in plan.notes:
            print(f" {note}", flush=True)
        print(
            (cfg.describe(flags["num_experts"], flags["moe_router_topk"]) if cfg else f"{label}: plain top-K routing")
            + (f"; resuming at iteration {trainer.iteration}" if trainer.iteration else ""),
            flush=True,
        )
    history = train(trainer, run_meta(config))
    if history and config.plot_out and config.metrics_out and distributed.is_last_rank():
        plot_metrics(config.metrics_out, config.plot_out, title=label)
    return trainer


def evaluate_run(config: RunConfig, sources: build.DataSources, trainer: Trainer, tasks: list) -> dict:
    """Held-out perplexity of every path, tier ordering, and path-1 exact match on the tasks; with
    the iteration and the training FLOPs per step (all paths) it was reached with."""
    result = evaluate_paths(trainer, trainer.data("valid"), max(config.eval_iters, 1))
    result.update(iteration=trainer.iteration, step_flops=trainer.step_flops)
    layout = config.layout
    if sources.vl is not None:
        result["answer_accuracy"] = answer_accuracy(trainer.chunks[0], sources.vl)
    if tasks and layout.tensor == layout.pipeline == layout.expert == 1:
        result["exact_match"] = exact_match_accuracy(trainer.chunks[0], sources.tokenizer, tasks)
    return result


def run(config: RunConfig, sources: build.DataSources, plan: ResumePlan) -> None:
    """Train; then with --eval-out (a preset's default): evaluate, optionally train and evaluate
    the baseline, report."""
    trainer = run_training(config, sources, plan, "OrdMoE" if config.ordmoe else "top-K")
    if trainer.stopped_by_signal or not config.eval_out:
        return
    tasks = list(read_jsonl(sources.heldout_tasks)) if sources.heldout_tasks else (sources.sft_tasks or [])
    label = f"OrdMoE (C={config.num_paths})" if config.ordmoe else "top-K"
    rows = {label: evaluate_run(config, sources, trainer, tasks)}
    if config.compare_baseline:
        baseline = baseline_config(config)
        baseline_trainer = run_training(
            baseline, sources, checks.plan_resume(baseline, distributed.world_size_from_env()), "top-K baseline"
        )
        if baseline_trainer.stopped_by_signal:
            return
        # Evaluate the baseline's weights with the same tier paths, to compare tier ordering too.
        probe = config.replace(load=baseline.save, finetune=True, train_iters=0)
        rows["top-K baseline"] = evaluate_run(
            probe, sources, build_trainer(probe, sources, ResumePlan("weights")), tasks
        )
    if distributed.is_last_rank():
        print(
            "\nheld-out evaluation (valid split"
            + (
                "; exact match of path 1 on held-out synthetic tasks)"
                if tasks
                else "; path 1's answers on held-out images, argmax over each question's answer set, "
                "and caption perplexity per path)"
                if sources.vl is not None
                else ")"
            )
            + "\n"
            + format_eval_table(rows)
        )
        with open(config.eval_out, "w") as f:
            json.dump(rows, f, indent=2)
        written = ", ".join(p for p in (config.eval_out, config.metrics_out, config.plot_out) if p)
        print(f"\nwrote {written}" + (f"; checkpoint in {config.save}" if config.save else ""))


def _lock(config: RunConfig):
    """Rank 0 holds the run's outputs for the whole run; a second run on them is refused."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    where = config.save or (os.path.dirname(os.path.abspath(config.metrics_out)) if config.metrics_out else None)
    if where is None:
        return None
    flag = "--save" if config.save else "--metrics-out"
    return RunLock(where, flag)


def main(config: RunConfig, plan: ResumePlan) -> int:
    """The run; its refusals (``OrdMoEError``) reach ``cli.main``, which ends with the message."""
    lock = _lock(config)
    config, sources = build.prepare_data(config)
    if config.preset:  # the preset's data are known now: check them, and a resume against them
        checks.check_data(config)
        plan = checks.plan_resume(config, distributed.world_size_from_env())
    build.transformer_config(config)  # refuses what the model cannot honour before any process starts
    distributed.init_distributed(config.layout, config.seed)
    try:
        run(config, sources, plan)
    finally:
        distributed.shutdown()
        if lock is not None:
            lock.release()
    return 0
