"""What ``ordmoe-pretrain`` refuses before any work, each with the flag and the way out.

The CLI and ``--dry-run`` run the same checks; ``run.main`` repeats those that depend on data the
preset builds first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Optional

import torch

from ordmoe_megatron.data import check_data_files, check_split_sizes
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.runtime import checkpointing
from ordmoe_megatron.runtime.checkpointing import has_checkpoint
from ordmoe_megatron.runtime.outputs import check_output, check_writable, read_json_lines
from ordmoe_megatron.train import vision_language
from ordmoe_megatron.train.build import transformer_config
from ordmoe_megatron.train.config import SCHEDULE_FIELDS, RunConfig, baseline_config, flag_name, run_differences


def layout_problems(config: RunConfig, world: int, layers_per_virtual_stage: Optional[int]) -> list[str]:
    """Why the parallel layout cannot run on ``world`` processes (empty when it can)."""
    layout, flags = config.layout, config.model_flags
    tp, pp, ep = layout.tensor, layout.pipeline, layout.expert
    num_layers, num_experts = flags["num_layers"], flags["num_experts"]
    problems = []
    if world % (tp * pp):
        problems.append(f"world size {world} is not a multiple of TP x PP = {tp} x {pp}")
    dp = layout.data_parallel_size(world)
    if num_experts and num_experts % ep:
        problems.append(f"--num-experts={num_experts} is not a multiple of --expert-model-parallel-size={ep}")
    if (dp * tp) % (ep * (layout.expert_tensor or tp)):
        problems.append(f"--expert-model-parallel-size={ep} (x expert TP) must divide data-parallel x TP = {dp * tp}")
    if tp > 1 and num_experts and not layout.sequence_parallel:
        problems.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
    if tp > 1 and gpu_without_fused_norms():
        problems.append(
            "--tensor-model-parallel-size > 1 on a GPU needs Transformer Engine or Apex (their "
            "sequence-parallel norms; the bridge for them runs on the CPU only): install one, or use TP 1"
        )
    if layout.sequence_parallel and tp == 1:
        problems.append(
            "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits sequences over "
            "the tensor-parallel ranks)"
        )
    if num_layers % pp:
        problems.append(f"--num-layers={num_layers} is not a multiple of --pipeline-model-parallel-size={pp}")
    if layers_per_virtual_stage is not None and (
        pp == 1 or layers_per_virtual_stage <= 0 or (num_layers // pp) % layers_per_virtual_stage
    ):
        problems.append(
            "--num-layers-per-virtual-pipeline-stage needs pipeline parallelism and must divide "
            f"the {num_layers // pp} layers of each pipeline stage"
        )
    if config.global_batch_size % (config.micro_batch_size * dp):
        problems.append(
            f"--global-batch-size={config.global_batch_size} must be a multiple of "
            f"--micro-batch-size x data-parallel size = {config.micro_batch_size} x {dp}"
        )
    elif layout.virtual_pipeline and (config.global_batch_size // (config.micro_batch_size * dp)) % pp:
        # Megatron's interleaved schedule runs the micro-batches in groups of one per stage.
        problems.append(
            f"with virtual pipeline stages the micro-batches per step (--global-batch-size / "
            f"(--micro-batch-size x data-parallel size) = "
            f"{config.global_batch_size // (config.micro_batch_size * dp)}) must be a multiple of "
            f"--pipeline-model-parallel-size={pp}"
        )
    return problems


def gpu_without_fused_norms() -> bool:
    """A GPU run with neither Transformer Engine nor Apex: Megatron's torch norm refuses
    sequence parallelism there."""
    if not torch.cuda.is_available():
        return False
    return all(importlib.util.find_spec(name) is None for name in ("transformer_engine", "apex"))


def check_values(config: RunConfig) -> None:
    """What no single flag's parser can see: values that must fit each other."""
    if config.min_lr > config.lr:
        raise OrdMoEError(
            f"--min-lr={config.min_lr} is above --lr={config.lr}; the schedule decays from --lr down to --min-lr"
        )
    if config.sft_pack:
        check_packing(config)
    if config.micro_batch_size > config.global_batch_size:
        raise OrdMoEError(
            f"--micro-batch-size={config.micro_batch_size} is larger than "
            f"--global-batch-size={config.global_batch_size}"
        )
    if config.ordmoe is not None:
        config.ordmoe.check_pipeline(
            config.micro_batch_size, config.layout.pipeline, bool(config.layout.virtual_pipeline)
        )


def check_model(config: RunConfig) -> None:
    """What the model refuses (a layer scope beyond the model, options OrdMoE cannot honour), from
    its ``TransformerConfig``: built, not the weights."""
    transformer_config(config)


def check_precision(config: RunConfig) -> None:
    """``--fp8-format`` is refused: the built-in trainer builds the local layer spec (no
    Transformer Engine layers), so it would train in BF16 and say nothing."""
    if config.fp8_format is not None:
        raise OrdMoEError(
            f"--fp8-format {config.fp8_format}: ordmoe-pretrain builds no Transformer Engine layers, so it "
            "cannot train in FP8; drop the flag (--bf16 trains in BF16), or train FP8 with Megatron-LM's "
            "pretrain_gpt.py --ordmoe (docs/megatron_lm.md)"
        )


# --------------------------------------------------------------------------------------------
# what --load means for this run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What the run does with ``--load``: ``new`` (nothing to load), ``weights`` (a converted
    checkpoint, or ``--finetune``: weights only, from iteration 0), ``resume`` (the same run from
    ``iteration``), or ``done`` (the run is already at ``--train-iters``)."""

    kind: str
    iteration: int = 0
    run_id: Optional[str] = None
    load_rng: bool = True
    notes: tuple = ()  # what the log says about it

    @property
    def loads(self) -> bool:
        return self.kind in ("weights", "resume", "done")


def _iteration_dir(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    return bool(re.fullmatch(r"iter_\d{7}|release", name)) or os.path.isfile(os.path.join(path, "metadata.json"))


def plan_resume(config: RunConfig, world: int, dry_run: bool = False) -> ResumePlan:
    """Check ``--load`` against this run before any work and say what the run will do with it.
    ``dry_run``: the checkpoint's pickled metadata (``.metadata``) is not read."""
    load, save = config.load, config.save
    if not load or (config.overwrite and load == save):
        return ResumePlan("new")  # --overwrite on its own outputs starts afresh
    if not has_checkpoint(load):
        if os.path.isdir(load) and _iteration_dir(load):
            raise OrdMoEError(
                f"--load {load} is one iteration of a checkpoint; point --load at "
                f"{os.path.dirname(os.path.normpath(load))}, the directory that holds "
                f"{checkpointing.TRACKER}"
            )
        if load == save:
            return ResumePlan("new", notes=(f"no checkpoint in {load} yet: a new run",))
        raise OrdMoEError(
            f"--load {load} holds no checkpoint (no {checkpointing.TRACKER}); point --load at the "
            "directory --save wrote, or leave --load out to start a new run"
        )
    info = checkpointing.inspect_checkpoint(load, "--load", read_tensors=not dry_run)
    checkpointing.check_compatible(load, config.model_flags, "--load")
    if info.iteration is None or config.finetune:
        notes = [f"starting from the weights in {info.path}"]
        means = any(TierRouter.is_running_mean(key) for key in info.tensors)
        average = config.ordmoe is not None and config.ordmoe.ranking == "average"
        if dry_run:
            pass  # whether it holds running means is in .metadata, which a dry run does not read
        elif average and not means:
            notes.append("the checkpoint has no running means of --ordmoe-ranking average: they start afresh")
        if means and not average:
            notes.append("the checkpoint's running means of --ordmoe-ranking average are not used here")
        return ResumePlan("weights", notes=tuple(notes))
    run = info.run.get("run")
    if run is None or "run_id" not in info.run:
        raise OrdMoEError(
            f"--load {load}: {info.path} records no run (its run.json has none); pass --finetune to "
            "start a new run from its weights"
        )
    differences = run_differences(run, config)
    notes = []
    if config.override_opt_param_scheduler:
        changed = [d for d in differences if d[0] in map(flag_name, SCHEDULE_FIELDS)]
        differences = [d for d in differences if d not in changed]
        notes += [
            f"learning-rate schedule overridden (--override-opt-param-scheduler): {flag} {saved} -> {here}"
            for flag, saved, here in changed
        ]
    if differences:
        detail = "; ".join(f"{flag} is {saved!r} there but {here!r} here" for flag, saved, here in differences)
        schedule = any(d[0] in map(flag_name, SCHEDULE_FIELDS) for d in differences)
        raise OrdMoEError(
            f"--load {load} holds another run ({detail}). To continue it, use its settings"
            + (" (a new learning-rate schedule on purpose: --override-opt-param-scheduler)" if schedule else "")
            + "; to start a new run, use a fresh --save, or --overwrite to replace it"
        )
    saved_ep = info.run.get("expert_model_parallel_size")
    if saved_ep is not None and saved_ep != config.layout.expert:
        raise OrdMoEError(
            f"--load {load} was saved with --expert-model-parallel-size {saved_ep}, this run has "
            f"{config.layout.expert}: the optimizer state does not reshard across expert-parallel sizes. "
            f"Resume with --expert-model-parallel-size {saved_ep}, or pass --finetune to start from its "
            "weights (they do reshard)"
        )
    saved_world = info.run.get("world_size")
    load_rng = saved_world == world
    if load_rng:
        for rank in range(world):
            if not os.path.isfile(checkpointing.rng_path(info.path, rank)):
                raise OrdMoEError(
                    f"--load {load}: {checkpointing.rng_path(info.path, rank)} is missing (the random "
                    "states of that rank); restore it or load an earlier checkpoint"
                )
    else:
        notes.append(f"random states not restored: saved by {saved_world} processes, resumed on {world}")
    kind = "done" if info.iteration >= config.train_iters else "resume"
    if kind == "done":
        notes.append(
            f"{load} is at iteration {info.iteration} and --train-iters is {config.train_iters}: nothing to "
            "train (raise --train-iters, with --override-opt-param-scheduler, to train on)"
        )
    return ResumePlan(kind, iteration=info.iteration, run_id=info.run["run_id"], load_rng=load_rng, notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# outputs and data
# --------------------------------------------------------------------------------------------
def check_run(
    config: RunConfig, world: int, layers_per_virtual_stage: Optional[int], dry_run: bool = False
) -> ResumePlan:
    """Every check a run makes before any work (``--dry-run`` makes the same, but leaves the
    checkpoint's pickled ``.metadata`` unread); what it will do with ``--load``."""
    if config.preset == "tiny-vl":
        vision_language.check_tiny_vl(config, world)
    problems = layout_problems(config, world, layers_per_virtual_stage)
    if problems:
        raise OrdMoEError("impossible parallel layout: " + "; ".join(problems))
    check_values(config)
    check_precision(config)
    check_model(config)
    plan = plan_resume(config, world, dry_run)
    check_outputs(config, plan, world)
    check_data(config)
    return plan


def check_packing(config: RunConfig) -> None:
    """--sft-pack: chat data, one process per model replica, every path on every conversation."""
    if not (config.sft_data or config.preset == "tiny-sft"):
        raise OrdMoEError("--sft-pack packs chat conversations: give --sft-data (or --no-sft-pack)")
    layout = config.layout
    if layout.tensor > 1 or layout.pipeline > 1 or layout.sequence_parallel:
        raise OrdMoEError(
            "--sft-pack with tensor or pipeline parallelism: packed rows are tested on data parallelism only "
            "(their length varies per micro-batch); use --no-sft-pack"
        )
    if config.ordmoe is not None and config.ordmoe.lower_path_fraction < 1:
        raise OrdMoEError(
            "--sft-pack with --ordmoe-lower-path-fraction below 1: a packed micro-batch is one row, with no "
            "rows to sub-sample; use a fraction of 1 or --no-sft-pack"
        )


def check_outputs(config: RunConfig, plan: ResumePlan, world: int) -> None:
    """Outputs can be written, and are replaced only with --overwrite; a resume appends to its own
    run's metrics. With --compare-baseline the baseline's outputs too."""
    resuming = plan.kind in ("resume", "done")
    for flag, path, is_dir in (
        ("--save", config.save, True),
        ("--metrics-out", config.metrics_out, False),
        ("--plot-out", config.plot_out, False),
        ("--eval-out", config.eval_out, False),
        ("--save-grads", config.save_grads, True),
        ("--work-dir", config.work_dir, True),
        ("--preset-data-dir", config.preset_data_dir, True),
    ):
        if path:
            check_writable(path, flag, is_dir)
    checkpointing.check_stale_saves(config.save, "--save")
    if (
        config.save
        and has_checkpoint(config.save)
        and not config.overwrite
        and not (resuming and config.load == config.save)
    ):
        raise OrdMoEError(
            f"--save {config.save} already holds a checkpoint; pass --overwrite to replace it, "
            "or --load the same directory to resume it"
        )
    for path in (config.metrics_out, config.plot_out, config.eval_out):
        if path and not resuming:
            check_output(path, config.overwrite, "--overwrite")
    if resuming and config.metrics_out and os.path.isfile(config.metrics_out) and not config.overwrite:
        others = metrics_of_other_runs(config.metrics_out, plan.run_id)
        if others:
            raise OrdMoEError(
                f"--metrics-out {config.metrics_out} holds metrics of another run ({others}); pass "
                "--overwrite to replace it, or give this run another --metrics-out"
            )
    if config.compare_baseline and config.work_dir:
        baseline = baseline_config(config).replace(compare_baseline=False)
        check_outputs(baseline, plan_resume(baseline, world), world)


def metrics_of_other_runs(path: str, run_id: Optional[str]) -> str:
    """How the metrics file's lines that are not this run's are described ('' when there are none)."""
    other = sum(1 for record in read_json_lines(path, "--metrics-out") if record.get("run_id") != run_id)
    return f"{other} lines" if other else ""


def check_data(config: RunConfig) -> None:
    """The data files (when named) are there, whole, and every split of --split has data."""
    if config.mock_data or not config.data_path:
        return
    for flag, prefix in (("--data-path", config.data_path), ("--valid-data-path", config.valid_data_path)):
        if prefix:
            check_data_files(prefix, flag)
    if not config.valid_data_path:
        check_split_sizes(config.data_path, config.split, config.seq_length)
