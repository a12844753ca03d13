"""The ready-made grids: the paper's ablation axes, each a list of OrdMoE settings.

A setting is a name and the ``ordmoe-pretrain`` flags that make it, on top of the run's own flags
(the tiny preset's: C = 3, the ``vocab`` log-likelihood floor, all layers). The sweep adds the
plain top-K baselines to every grid itself (``sweep.plan``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    flags: tuple = ()


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    title: str
    settings: tuple


def _rewards_grid() -> tuple:
    out = []
    for rewards in ("1 .5 0", "2 1 0", ".5 .25 0"):
        for mode in ("zscore", "center", "raw"):
            out.append(
                Setting(
                    f"rewards [{rewards.replace(' ', ',')}] {mode}",
                    ("--ordmoe-rewards", *rewards.split(), "--ordmoe-advantage", mode),
                )
            )
    return tuple(out)


def _scope_grid(num_layers: int) -> tuple:
    half = max(num_layers // 2, 1)
    even = ",".join(str(layer) for layer in range(2, num_layers + 1, 2)) or "1"
    return (
        Setting("scope all"),
        Setting(f"scope shallow (1-{half})", ("--ordmoe-layer-scope", f"1-{half}")),
        Setting(f"scope deep ({half + 1}-{num_layers})", ("--ordmoe-layer-scope", f"{half + 1}-{num_layers}")),
        Setting(f"scope even ({even})", ("--ordmoe-layer-scope", even)),
    )


def ready_grids(num_layers: int = 4) -> dict[str, Grid]:
    """The grids by name; the layer-scope grid's layers depend on the model's depth."""
    grids = [
        Grid(
            "tiers", "number of tiers C", tuple(Setting(f"C={c}", ("--ordmoe-num-tiers", str(c))) for c in (1, 2, 3, 4))
        ),
        Grid(
            "grouping",
            "tier grouping",
            tuple(Setting(f"grouping {g}", ("--ordmoe-grouping", g)) for g in ("uniform", "high-only", "random")),
        ),
        Grid("rewards", "rewards under each advantage mode", _rewards_grid()),
        Grid("scope", "layer scope", _scope_grid(num_layers)),
        Grid(
            "floor",
            "log-likelihood floor",
            (
                Setting("floor vocab", ("--ordmoe-logprob-floor", "vocab")),
                Setting("floor none (paper)", ("--ordmoe-logprob-floor", "none")),
            ),
        ),
        # The paper's objective with and without the preset's floor, and the preference objectives.
        Grid(
            "objective",
            "tier-ranking objective",
            (
                Setting(
                    "advantage, floor vocab (preset)",
                    ("--ordmoe-objective", "advantage", "--ordmoe-logprob-floor", "vocab"),
                ),
                Setting(
                    "advantage, no floor (paper)", ("--ordmoe-objective", "advantage", "--ordmoe-logprob-floor", "none")
                ),
                Setting(
                    "pairwise-logistic", ("--ordmoe-objective", "pairwise-logistic", "--ordmoe-logprob-floor", "none")
                ),
                Setting("plackett-luce", ("--ordmoe-objective", "plackett-luce", "--ordmoe-logprob-floor", "none")),
            ),
        ),
    ]
    return {g.name: g for g in grids}


GRID_NAMES = tuple(ready_grids())
