"""What ``ordmoe-pretrain`` refuses before any work, each with the flag and the fix.

The CLI and ``--dry-run`` run the same checks.
"""
from __future__ import annotations

from typing import Optional

from ordmoe_megatron.runtime.checkpointing import has_checkpoint
from ordmoe_megatron.runtime.outputs import OutputError, check_output
from ordmoe_megatron.train.config import RunConfig, baseline_config


class CheckError(ValueError):
    """A run that must not start; the message names the flag and the way out."""


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
    if num_layers % pp:
        problems.append(f"--num-layers={num_layers} is not a multiple of --pipeline-model-parallel-size={pp}")
    if layers_per_virtual_stage is not None and (
            pp == 1 or layers_per_virtual_stage <= 0 or (num_layers // pp) % layers_per_virtual_stage):
        problems.append("--num-layers-per-virtual-pipeline-stage needs pipeline parallelism and must divide "
                        f"the {num_layers // pp} layers of each pipeline stage")
    if config.global_batch_size % (config.micro_batch_size * dp):
        problems.append(f"--global-batch-size={config.global_batch_size} must be a multiple of "
                        f"--micro-batch-size x data-parallel size = {config.micro_batch_size} x {dp}")
    return problems


def check_precision(config: RunConfig) -> None:
    if config.fp8_format is None:
        return
    if not config.bf16:
        raise CheckError("--fp8-format needs --bf16 (FP8 GEMMs inside a BF16 model)")
    try:
        import transformer_engine  # noqa: F401  (only probed: FP8 needs it)
    except ImportError:
        raise CheckError("--fp8-format needs Transformer Engine on a GPU (pip install '.[te]' on the cluster); "
                         "drop the flag on this machine") from None


def resuming(config: RunConfig) -> bool:
    return has_checkpoint(config.load) and config.load == config.save


def check_outputs(config: RunConfig) -> None:
    """Never overwrite results without --overwrite; resuming from --save itself is fine. With
    --compare-baseline the baseline's outputs too."""
    if config.compare_baseline and config.work_dir:
        check_outputs(baseline_config(config).replace(compare_baseline=False))
    if config.save and has_checkpoint(config.save) and not resuming(config) and not config.overwrite:
        raise CheckError(f"--save {config.save} already holds a checkpoint; pass --overwrite, "
                         "or --load the same directory to resume")
    for name in ("metrics_out", "plot_out"):
        path = getattr(config, name)
        if path and not resuming(config):
            try:
                check_output(path, config.overwrite, "--overwrite")
            except OutputError as err:
                raise CheckError(str(err)) from None
