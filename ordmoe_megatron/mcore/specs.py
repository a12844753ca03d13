"""Layer-spec wiring: put the tier router into every MoE layer of a Megatron layer spec.

Works on any spec Megatron builds (local, Transformer Engine, decoder-block specs with dense and
MoE layers; ``ModuleSpec`` nodes, or the ``functools.partial`` nodes of megatron-core 0.18 on):
it looks for ``MoESubmodules`` and swaps only the router, so parameter names and the rest of the
layer stay exactly Megatron's.
"""

from __future__ import annotations

import copy
import functools

from megatron.core.transformer.moe.moe_layer import MoESubmodules

from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.runtime import compat


def ordmoe_layer_spec(spec, ordmoe: OrdMoEConfig):
    """A copy of ``spec`` whose MoE layers route with ``TierRouter``; raises if it has none."""
    spec = copy.deepcopy(spec)
    found = _swap_routers(spec, functools.partial(TierRouter, ordmoe=ordmoe))
    if not found:
        raise ValueError("--ordmoe: the layer spec has no MoE layer (MoESubmodules); build it with --num-experts")
    return spec


def _swap_routers(node, router_builder) -> int:
    if isinstance(node, MoESubmodules):
        node.router = router_builder
        return 1
    return sum(_swap_routers(child, router_builder) for child in compat.spec_children(node))
