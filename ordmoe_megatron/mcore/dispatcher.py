"""The all-to-all dispatcher for stacked OrdMoE paths.

All ``C`` paths are stacked on the batch dimension and routed by one router call, so Megatron's
all-to-all dispatcher already moves every path's tokens in one all-to-all per direction (the
same number of collectives as plain top-K). One thing it assumes does not hold: dropless
dispatch sizes its permutation buffer as ``tokens x top-K``, while a path whose tier is not K
wide (an explicit, uneven layout) selects another number of experts, and sub-sampled lower paths
have fewer tokens than path 1. The size is still known without a device sync: each path's
tokens times its tier width, which the router records (``TierRouter.routed_slots``). The fused
permutation of Transformer Engine trusts that size, so it is checked where that is free: the
routing map must have the rows the router recorded it for (a shape, no sync), and on the CPU its
routed pairs must be that many.

FP8 padding (``--moe-router-padding-for-quantization``, set by ``--fp8-format`` on GPU) works on
the stacked routing map, so each expert's token count is padded for all paths together.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from ordmoe_megatron.mcore.router import TierRouter


class OrdMoEAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    def __init__(self, *args, router: TierRouter, **kwargs):
        super().__init__(*args, **kwargs)
        self.router = router

    def preprocess(self, routing_map):
        tokens_per_expert = super().preprocess(routing_map)
        dynamic = (
            self.drop_and_pad
            or self.config.moe_expert_capacity_factor is not None
            or self.config.moe_router_padding_for_quantization
        )
        if not dynamic:
            self.num_out_tokens = self._checked_slots(routing_map)
        return tokens_per_expert

    def _checked_slots(self, routing_map) -> int:
        """``TierRouter.routed_slots``, if it is this routing map's (else a loud error, not a
        permutation buffer of the wrong size)."""
        router = self.router
        stale = routing_map.shape[0] != router.routed_rows
        if not stale and routing_map.device.type == "cpu":
            stale = int(routing_map.sum()) != router.routed_slots
        if stale:
            raise RuntimeError(
                f"OrdMoE dispatcher: the router recorded {router.routed_slots} routed (token, expert) pairs for "
                f"{router.routed_rows} tokens, but the routing map has {routing_map.shape[0]} tokens"
                + (f" and {int(routing_map.sum())} pairs" if routing_map.device.type == "cpu" else "")
                + ": the recorded size is stale (the MoE layer must call its router before each dispatch)"
            )
        return router.routed_slots


def use_ordmoe_dispatcher(moe_layer: MoELayer) -> None:
    """Give a ``MoELayer`` routed by a ``TierRouter`` the OrdMoE all-to-all dispatcher.

    Done on the built layer, not through the spec: Megatron's ``TransformerLayer`` only passes
    process groups to the exact ``MoELayer`` class. The router holds the same process groups.
    """
    router = moe_layer.router
    if not isinstance(router, TierRouter) or type(moe_layer.token_dispatcher) is not MoEAlltoAllTokenDispatcher:
        return  # the all-gather dispatcher sizes its buffers from the routing map already
    moe_layer.token_dispatcher = OrdMoEAlltoAllTokenDispatcher(
        moe_layer.num_local_experts,
        moe_layer.local_expert_indices,
        config=moe_layer.config,
        pg_collection=router.pg_collection,
        router=router,
    )
    if moe_layer.use_shared_expert and moe_layer.shared_expert_overlap:
        moe_layer.token_dispatcher.set_shared_experts(moe_layer.shared_experts)
