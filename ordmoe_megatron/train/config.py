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
    plot_out: Optional[str] = None
    overwrite: bool = False
    # the embedded default
    preset: Optional[str] = None
    work_dir: Optional[str] = None
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

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_model_flags(self, **flags) -> "RunConfig":
        return dataclasses.replace(self, model_flags={**self.model_flags, **flags})


def flag_name(field: str) -> str:
    """``'lr_warmup_iters'`` -> ``'--lr-warmup-iters'``."""
    return "--" + field.replace("_", "-")


def baseline_config(config: RunConfig) -> RunConfig:
    """The preset's plain top-K baseline: same data and steps, its own outputs in ``baseline/``."""
    root = os.path.join(config.work_dir, "baseline")
    return config.replace(ordmoe=None, save=os.path.join(root, "checkpoints"), load=os.path.join(root, "checkpoints"),
                          metrics_out=os.path.join(root, "metrics.jsonl"), plot_out=os.path.join(root, "metrics.png"))
