"""The MoE layer and all-to-all dispatcher for stacked OrdMoE paths.

All ``C`` paths are stacked on the batch dimension and routed by one router call, so Megatron's
all-to-all dispatcher already moves every path's tokens in one all-to-all per direction (the
same number of collectives as plain top-K). One thing it assumes does not hold: dropless
dispatch sizes its permutation buffer as ``tokens x top-K``, while a path whose tier is not K
wide (an explicit, uneven layout) selects another number of experts. The size is still known
without a device sync: tokens per path times the sum of the paths' tier widths.

FP8 padding (``--moe-router-padding-for-quantization``, set by ``--fp8-format`` on GPU) works on
the stacked routing map, so each expert's token count is padded for all paths together.
"""
from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from ordmoe_megatron.router import TierRouter


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
            widths = self.router.path_widths()
            self.num_out_tokens = routing_map.size(0) // len(widths) * sum(widths)
        return tokens_per_expert


class OrdMoELayer(MoELayer):
    """``MoELayer`` whose all-to-all dispatcher knows the width of each path's tier."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if isinstance(self.router, TierRouter) and type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            self.token_dispatcher = OrdMoEAlltoAllTokenDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection, router=self.router,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
