"""What a training step logs beyond its loss reports: Megatron's MoE auxiliary losses and the
per-tier expert load that ``TierRouter.pop_tier_load`` counts.

Both are read and reset here, once per logged step.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.runtime import compat


def tier_routers(chunks: Iterable[torch.nn.Module]) -> list[TierRouter]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, TierRouter)]


def pop_tier_load_by_layer(chunks: Iterable[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """``{layer number: [paths, experts]}`` counted since the last pop (layers that routed nothing
    are left out); resets the counts."""
    out = {}
    for router in tier_routers(chunks):
        load = router.pop_tier_load()
        if load is not None:
            out[router.layer_number] = load
    return out


@contextlib.contextmanager
def tier_load_paused(chunks: Iterable[torch.nn.Module]):
    """Forwards inside do not count towards the per-tier load (evaluation between training steps,
    the sequential schedule's forward-only pre-pass)."""
    routers = tier_routers(chunks)
    saved = [r.count_tier_load for r in routers]
    for router in routers:
        router.count_tier_load = False
    try:
        yield
    finally:
        for router, value in zip(routers, saved):
            router.count_tier_load = value


def tier_load_max_over_mean(loads: dict[int, torch.Tensor]) -> Optional[list[float]]:
    """Per path: the most loaded expert's tokens over the mean, averaged over the MoE layers
    (None unless every layer routed all paths)."""
    values = list(loads.values())
    if not values or any(v.shape != values[0].shape for v in values):
        return None
    load = torch.stack(values)  # [layers, paths, experts]
    return (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean(0).tolist()


def pop_moe_metrics(chunks: list, num_microbatches: int) -> dict:
    """The load-balancing loss (path 1, mean over MoE layers and micro-batches) and the per-tier
    expert load of the step; resets both trackers."""
    metrics = compat.pop_moe_aux_losses(chunks[0].config, num_microbatches)
    load = tier_load_max_over_mean(pop_tier_load_by_layer(chunks))
    if load is not None:
        metrics["tier_load_max_over_mean"] = load
    return metrics
