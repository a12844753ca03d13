"""One ``ordmoe-pretrain`` run from a checked ``RunConfig``: data, model, training, and for a
preset the held-out evaluation, the optional baseline and the closing table."""
from __future__ import annotations

import json
import os

from ordmoe_megatron.data import read_jsonl
from ordmoe_megatron.runtime import checkpointing, distributed
from ordmoe_megatron.train import build
from ordmoe_megatron.train.config import RunConfig, baseline_config
from ordmoe_megatron.train.evaluation import exact_match_accuracy, format_eval_table
from ordmoe_megatron.train.plotting import plot_metrics
from ordmoe_megatron.train.trainer import Trainer, evaluate_paths, setup, train


class RunError(RuntimeError):
    """A run that cannot go on; the message names the cause and the fix."""


def run_meta(config: RunConfig) -> dict:
    """What a checkpoint records to be resumed and checked against the next run."""
    cfg = config.ordmoe
    return {
        "model_flags": config.model_flags,
        "ordmoe": None if cfg is None else {k: v for k, v in vars(cfg).items() if k != "scope_layers"},
        "tokenizer_model": config.tokenizer_model,
        "global_batch_size": config.global_batch_size,
        "seed": config.seed,
    }


def build_trainer(config: RunConfig, sources: build.DataSources) -> Trainer:
    tconfig = build.transformer_config(config)  # a fresh one per model: the trainer stores hooks in it
    return setup(config, tconfig, build.model_chunks(config, tconfig), build.stream_factory(config, sources))


def run_training(config: RunConfig, sources: build.DataSources, label: str) -> Trainer:
    if checkpointing.has_checkpoint(config.load):
        try:
            checkpointing.check_compatible(config.load, config.model_flags)
        except checkpointing.CheckpointError as err:
            raise RunError(str(err)) from None
    trainer = build_trainer(config, sources)
    flags = config.model_flags
    if distributed.is_last_rank():
        cfg = config.ordmoe
        print((cfg.describe(flags["num_experts"], flags["moe_router_topk"]) if cfg else f"{label}: plain top-K routing")
              + (f"; resuming at iteration {trainer.iteration}" if trainer.iteration else ""), flush=True)
    train(trainer, run_meta(config))
    if config.plot_out and config.metrics_out and distributed.is_last_rank() and os.path.exists(config.metrics_out):
        plot_metrics(config.metrics_out, config.plot_out, title=label)
    return trainer


def evaluate_run(config: RunConfig, sources: build.DataSources, trainer: Trainer, tasks: list) -> dict:
    """Held-out perplexity of every path, tier ordering, and path-1 exact match on the tasks."""
    result = evaluate_paths(trainer, trainer.data("valid"), max(config.eval_iters, 1))
    layout = config.layout
    if tasks and layout.tensor == layout.pipeline == layout.expert == 1:
        result["exact_match"] = exact_match_accuracy(trainer.chunks[0], sources.tokenizer, tasks)
    return result


def run(config: RunConfig, sources: build.DataSources) -> None:
    """Train, then for a preset: evaluate, optionally train and evaluate the baseline, report."""
    trainer = run_training(config, sources, "OrdMoE" if config.ordmoe else "top-K")
    if not config.preset:
        return
    tasks = list(read_jsonl(sources.heldout_tasks))
    label = f"OrdMoE (C={config.num_paths})" if config.ordmoe else "top-K"
    rows = {label: evaluate_run(config, sources, trainer, tasks)}
    if config.compare_baseline:
        baseline = baseline_config(config)
        run_training(baseline, sources, "top-K baseline")
        # Evaluate the baseline's weights with the same tier paths, to compare tier ordering too.
        probe = config.replace(load=baseline.save, finetune=True, train_iters=0)
        rows["top-K baseline"] = evaluate_run(probe, sources, build_trainer(probe, sources), tasks)
    if distributed.is_last_rank():
        print("\nheld-out evaluation (valid split; exact match of path 1 on held-out synthetic tasks)\n"
              + format_eval_table(rows))
        with open(os.path.join(config.work_dir, "eval.json"), "w") as f:
            json.dump(rows, f, indent=2)
        print(f"\nwrote {os.path.join(config.work_dir, 'eval.json')}, {config.metrics_out}, {config.plot_out}; "
              f"checkpoint in {config.save}")


def main(config: RunConfig) -> int:
    try:
        config, sources = build.prepare_data(config)
        build.transformer_config(config)  # refuses what the model cannot honour before any process starts
    except (build.DataError, ValueError) as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    distributed.init_distributed(config.layout, config.seed)
    try:
        run(config, sources)
    except RunError as err:
        raise SystemExit(f"ordmoe-pretrain: {err}") from None
    finally:
        distributed.shutdown()
    return 0
