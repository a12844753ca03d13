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
    """All layers, the shallow half, the deep half, the even layers; a scope that names no layer
    or the same layers as one before it is left out (at 2 layers "even" is "deep")."""
    half = max(num_layers // 2, 1)
    even = range(2, num_layers + 1, 2)
    candidates = (
        ("scope all", None, range(1, num_layers + 1)),
        (f"scope shallow (1-{half})", f"1-{half}", range(1, half + 1)),
        (f"scope deep ({half + 1}-{num_layers})", f"{half + 1}-{num_layers}", range(half + 1, num_layers + 1)),
        (f"scope even ({','.join(map(str, even))})", ",".join(map(str, even)), even),
    )
    settings, seen = [], []
    for name, scope, layers in candidates:
        if not layers or set(layers) in seen:
            continue
        seen.append(set(layers))
        settings.append(Setting(name, ("--ordmoe-layer-scope", scope) if scope else ()))
    return tuple(settings)


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
