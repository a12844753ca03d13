"""``RunConfig``: everything that defines an ``ordmoe-pretrain`` run, typed.

The command line (``train/cli.py``) is the only place that reads flags; everything below it takes
a ``RunConfig``. Field names are the flags' destinations (``lr`` is ``--lr``), so a message about
a field can always name its flag (``flag_name``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.runtime.distributed import ParallelLayout


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # the model: architecture flags (runtime.model_flags) and what OrdMoE does on top
    model_flags: dict
    ordmoe: Optional[OrdMoEConfig]  # None: --no-ordmoe (plain top-K)
    layout: ParallelLayout
    moe_aux_loss_coeff: float = 1e-2
    moe_router_load_balancing_type: str = "aux_loss"
    moe_token_dispatcher_type: str = "alltoall"
    calculate_per_token_loss: bool = False
    bf16: bool = False
    fp8_format: Optional[str] = None
    # data
    data_path: Optional[str] = None
    valid_data_path: Optional[str] = None
    split: str = "969,30,1"
    tokenizer_model: Optional[str] = None
    mock_data: bool = False
    # supervised fine-tuning on chat data (data/sft.py): JSONL with "messages", answer-only loss
    sft_data: Optional[str] = None
    sft_valid_data: Optional[str] = None  # else the last 5% of --sft-data
    sft_pack: bool = False  # pack each micro-batch's conversations into one THD row
    # --preset tiny-vl: the share of the steps on captions before the questions (train/vision_language.py)
    vl_caption_fraction: float = 0.5
    # optimizer and schedule
    train_iters: int = 200
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 5
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    seed: int = 1234
    # logging and evaluation
    log_interval: int = 5
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    # checkpoints and outputs
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    save_grads: Optional[str] = None
    metrics_out: Optional[str] = None
    eval_out: Optional[str] = None  # the final held-out evaluation, JSON
    plot_out: Optional[str] = None
    overwrite: bool = False
    override_opt_param_scheduler: bool = False  # a resume may take a new learning-rate schedule
    # the embedded default
    preset: Optional[str] = None
    work_dir: Optional[str] = None
    preset_data_dir: Optional[str] = None  # where the preset builds its corpus (default <work_dir>/data)
    compare_baseline: bool = False

    @property
    def seq_length(self) -> int:
        return self.model_flags["seq_length"]

    @property
    def vocab_size(self) -> Optional[int]:
        return self.model_flags["vocab_size"]

    @property
    def num_paths(self) -> int:
        return self.ordmoe.num_tiers if self.ordmoe is not None else 1

    @property
    def paths_per_sequence(self) -> float:
        """Forward paths a training sequence takes on average (``1 + (C-1) m / b``)."""
        return self.ordmoe.paths_per_sequence(self.micro_batch_size) if self.ordmoe is not None else 1.0

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_model_flags(self, **flags) -> "RunConfig":
        return dataclasses.replace(self, model_flags={**self.model_flags, **flags})


def flag_name(field: str) -> str:
    """``'lr_warmup_iters'`` -> ``'--lr-warmup-iters'``."""
    return "--" + field.replace("_", "-")


# What defines a run: a resumed run must have the same (checks.check_resume names a difference).
# The parallel layout is not among them: a checkpoint loads under any layout, and every layout
# takes the same micro-batches in the same steps.
RUN_FIELDS = (
    "ordmoe",
    "moe_aux_loss_coeff",
    "moe_router_load_balancing_type",
    "moe_token_dispatcher_type",
    "calculate_per_token_loss",
    "bf16",
    "fp8_format",
    "data_path",
    "valid_data_path",
    "split",
    "tokenizer_model",
    "mock_data",
    "sft_data",
    "sft_valid_data",
    "sft_pack",
    "vl_caption_fraction",
    "micro_batch_size",
    "global_batch_size",
    "weight_decay",
    "clip_grad",
    "seed",
) + ("lr", "min_lr", "lr_warmup_iters", "train_iters")
# The learning-rate schedule, which --override-opt-param-scheduler lets a resume change on purpose.
SCHEDULE_FIELDS = ("lr", "min_lr", "lr_warmup_iters", "train_iters")
# How the paths run, not what they compute (the same gradients): a resume may change them, e.g.
# to the sequential schedule when memory runs short.
ORDMOE_EXECUTION_FIELDS = ("path_schedule", "lazy_fanout")
# Data paths are compared once known (the preset resolves its own when it builds its data).
DATA_FIELDS = ("data_path", "valid_data_path", "tokenizer_model", "sft_data", "sft_valid_data")


def run_record(config: RunConfig) -> dict:
    """The values that define the run besides the model (whose flags the checkpoint records
    too, and ``checkpointing.check_compatible`` compares), JSON-ready."""
    record = {}
    for name in RUN_FIELDS:
        value = getattr(config, name)
        if name == "ordmoe":
            value = None if value is None else {k: v for k, v in vars(value).items() if k != "scope_layers"}
        elif name in DATA_FIELDS and value is not None:
            value = os.path.abspath(value)
        record[name] = value
    return record


def run_differences(saved: dict, config: RunConfig) -> list[tuple[str, object, object]]:
    """``(flag, value in the checkpoint, value here)`` for every run-defining value that differs."""
    here = run_record(config)
    out = []
    for name in RUN_FIELDS:
        if name not in saved:
            continue
        if name in DATA_FIELDS and here[name] is None and not config.mock_data:
            continue  # not known yet: the preset's data are resolved when they are built
        if name == "ordmoe":
            out += _ordmoe_differences(saved[name], here[name])
        elif saved[name] != here[name]:
            out.append((flag_name(name), saved[name], here[name]))
    return out


def _ordmoe_differences(saved: Optional[dict], here: Optional[dict]) -> list:
    if saved is None or here is None:
        on_off = lambda v: "off (--no-ordmoe)" if v is None else "on (--ordmoe)"  # noqa: E731
        return [] if saved is here else [("--ordmoe", on_off(saved), on_off(here))]
    # A setting a checkpoint does not record (saved before it existed) had its default.
    defaults = {f.name: f.default for f in dataclasses.fields(OrdMoEConfig) if f.init}
    return [
        (flag_name("ordmoe_" + k), saved.get(k, defaults.get(k)), here.get(k))
        for k in sorted(set(saved) | set(here))
        if k not in ORDMOE_EXECUTION_FIELDS and saved.get(k, defaults.get(k)) != here.get(k)
    ]


def baseline_config(config: RunConfig) -> RunConfig:
    """The preset's plain top-K baseline: same data and steps, its own outputs in ``baseline/``."""
    root = os.path.join(config.work_dir, "baseline")
    return config.replace(
        ordmoe=None,
        save=os.path.join(root, "checkpoints"),
        load=os.path.join(root, "checkpoints"),
        metrics_out=os.path.join(root, "metrics.jsonl"),
        plot_out=os.path.join(root, "metrics.png"),
        eval_out=None,
    )  # the OrdMoE run's --eval-out holds both
