"""``SweepConfig``: what an ``ordmoe-sweep`` runs, typed (the command line is in ``sweep/cli.py``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.sweep.grids import Grid

# pretrain: every cell from scratch on the tiny corpus; finetune: every cell from one base
# checkpoint per seed; sft: every cell fine-tunes on the tiny-sft chat tasks (from scratch, docs/sft.md);
# vl: every cell trains the tiny-vl vision-language model, captions then questions (docs/multimodal.md).
SETTINGS = ("pretrain", "finetune", "sft", "vl")
# The preset each setting's cells run (the user's run flags may name another).
SETTING_PRESETS = {"pretrain": "tiny", "finetune": "tiny", "sft": "tiny-sft", "vl": "tiny-vl"}


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    grid: Grid
    out: str  # the sweep's directory: cells/, base/, data/, results.*
    seeds: tuple = (1, 2, 3)
    setting: str = "pretrain"  # one of SETTINGS
    steps: int = 200  # training steps of every OrdMoE cell and of the same-steps baseline
    base_steps: int = 600  # finetune: plain top-K steps of the base checkpoint the sweep trains per seed
    base: Optional[str] = None  # finetune: the user's base checkpoint (shared by every seed) instead
    finetune_lr: float = 1e-3
    run_flags: tuple = ()  # ordmoe-pretrain flags every cell gets (data, model, ...): default the tiny preset
    jobs: int = 1  # cells run at once
    threads_per_job: int = 1
    gpus: int = 0  # one GPU per running cell, round-robin

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise OrdMoEError(f"--setting {self.setting} is not one of {', '.join(SETTINGS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise OrdMoEError(f"--seeds {' '.join(map(str, self.seeds))}: give distinct seeds")
        if self.steps < 1 or self.base_steps < 1:
            raise OrdMoEError("--steps and --base-steps must be at least 1")
        if self.jobs < 1 or self.threads_per_job < 1:
            raise OrdMoEError("--jobs and --threads-per-job must be at least 1")
        if self.base and self.setting != "finetune":
            raise OrdMoEError("--base is the fine-tuning setting's shared checkpoint: add --setting finetune")
        if any(flag in self.run_flags for flag in RESERVED_FLAGS):
            used = sorted(set(self.run_flags) & set(RESERVED_FLAGS))
            raise OrdMoEError(
                f"{', '.join(used)} after '--' would fight the sweep, which sets them per cell: "
                "drop them (use --seeds, --steps, --out)"
            )

    @property
    def uses_preset(self) -> bool:
        return not any(f in self.run_flags for f in ("--data-path", "--mock-data"))


# Flags the sweep sets for each cell itself.
RESERVED_FLAGS = (
    "--seed",
    "--train-iters",
    "--work-dir",
    "--save",
    "--load",
    "--metrics-out",
    "--plot-out",
    "--eval-out",
    "--finetune",
    "--preset-data-dir",
    "--overwrite",
    "--compare-baseline",
)
