"""Layer-spec wiring: put the tier router into every MoE layer of a Megatron layer spec.

Works on any spec Megatron builds (local, Transformer Engine, decoder-block specs with dense and
MoE layers): it looks for ``MoESubmodules`` and swaps only the router, so parameter names and the
rest of the layer stay exactly Megatron's.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.method import OrdMoEConfig


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
    if isinstance(node, (list, tuple)):
        return sum(_swap_routers(x, router_builder) for x in node)
    if isinstance(node, ModuleSpec):
        return _swap_routers(node.submodules, router_builder)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return sum(_swap_routers(getattr(node, f.name), router_builder) for f in dataclasses.fields(node))
    return 0
