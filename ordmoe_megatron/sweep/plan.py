"""The cells of a sweep and the ``ordmoe-pretrain`` command of each.

Every cell is one run in its own directory ``<out>/cells/<setting>/seed<k>``. The phases:

1. ``finetune`` without ``--base``: a plain top-K base run of ``--base-steps`` per seed;
2. every OrdMoE setting, and the plain top-K baseline at the same steps, per seed;
3. the plain top-K baselines at matched compute: the OrdMoE cells' reported training FLOPs per
   step over the same-steps baseline's, times the steps (one baseline per distinct step count).

With the tiny preset every cell of a seed shares the seed's corpus (``<out>/data/seed<k>``), as a
seed builds its own corpus.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Optional

from ordmoe_megatron.sweep.config import SETTING_PRESETS, SweepConfig

KINDS = ("base", "ordmoe", "baseline", "matched")
BASELINE = "baseline, same steps"


@dataclasses.dataclass(frozen=True)
class Cell:
    label: str  # the row of the tables
    kind: str  # KINDS
    seed: int
    steps: int
    flags: tuple = ()

    @property
    def key(self) -> str:
        return f"{slug(self.label)}/seed{self.seed}"

    def directory(self, out: str) -> str:
        return os.path.join(out, "base" if self.kind == "base" else "cells", self.key)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.=-]+", "-", text.lower()).strip("-")


def base_cells(config: SweepConfig) -> list[Cell]:
    if config.setting != "finetune" or config.base:
        return []
    return [Cell("base", "base", seed, config.base_steps, ("--no-ordmoe",)) for seed in config.seeds]


def first_cells(config: SweepConfig) -> list[Cell]:
    cells = []
    for seed in config.seeds:
        cells.append(Cell(BASELINE, "baseline", seed, config.steps, ("--no-ordmoe",)))
        cells += [Cell(s.name, "ordmoe", seed, config.steps, s.flags) for s in config.grid.settings]
    return cells


def matched_cells(config: SweepConfig, flops_ratio: dict[str, float]) -> list[Cell]:
    """``flops_ratio``: each OrdMoE setting's training FLOPs per step over the baseline's."""
    by_steps: dict[int, list[str]] = {}
    for name, ratio in flops_ratio.items():
        steps = round(config.steps * ratio)
        if steps != config.steps:
            by_steps.setdefault(steps, []).append(name)
    cells = []
    for steps in sorted(by_steps):
        label = f"baseline, matched compute ({steps} steps)"
        cells += [Cell(label, "matched", seed, steps, ("--no-ordmoe",)) for seed in config.seeds]
    return cells


def base_checkpoint(config: SweepConfig, seed: int) -> str:
    if config.base:
        return config.base
    return os.path.join(Cell("base", "base", seed, config.base_steps).directory(config.out), "checkpoints")


def cell_command(config: SweepConfig, cell: Cell) -> list[str]:
    """The cell's ``ordmoe-pretrain`` command; its outputs all in its directory."""
    where = cell.directory(config.out)
    argv = [sys.executable, "-m", "ordmoe_megatron.train"]
    preset = SETTING_PRESETS[config.setting]
    argv += ["--preset", preset] if config.uses_preset and "--preset" not in config.run_flags else []
    argv += [
        *config.run_flags,
        *cell.flags,
        "--seed",
        str(cell.seed),
        "--train-iters",
        str(cell.steps),
        "--save",
        os.path.join(where, "checkpoints"),
        "--metrics-out",
        os.path.join(where, "metrics.jsonl"),
        "--plot-out",
        os.path.join(where, "metrics.png"),
        "--eval-out",
        os.path.join(where, "eval.json"),
    ]
    if config.uses_preset:
        argv += ["--work-dir", where, "--preset-data-dir", os.path.join(config.out, "data", f"seed{cell.seed}")]
    if config.setting == "finetune" and cell.kind != "base":
        argv += [
            "--load",
            base_checkpoint(config, cell.seed),
            "--finetune",
            "--lr",
            str(config.finetune_lr),
            "--min-lr",
            str(config.finetune_lr / 10),
        ]
    elif config.uses_preset:
        argv += ["--load", os.path.join(where, "checkpoints")]
    return argv


def spec(config: SweepConfig) -> dict:
    """What a sweep directory's cells were made with; a later sweep on it must agree."""
    return {
        "grid": config.grid.name,
        "settings": [[s.name, list(s.flags)] for s in config.grid.settings],
        "setting": config.setting,
        "steps": config.steps,
        "base_steps": config.base_steps,
        "base": config.base,
        "finetune_lr": config.finetune_lr,
        "run_flags": list(config.run_flags),
    }


def spec_difference(saved: dict, config: SweepConfig) -> Optional[str]:
    here = spec(config)
    for key in here:
        if saved.get(key) != here[key]:
            return f"{key} was {saved.get(key)!r}, here {here[key]!r}"
    return None
