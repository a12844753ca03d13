"""The tier router: Megatron's ``TopKRouter`` on path 1, tier-constrained routing on paths 2..C.

Plugged in through ``MoESubmodules.router`` (see ``specs.py``). The model stacks its ``C`` paths
along the batch dimension (``[s, C*b, h]``, path-major), so one router call routes every path
and the MoE layer does one dispatch and one combine for all of them.

Path 1 goes through ``TopKRouter.routing`` untouched: its probabilities and routing map are bit
for bit the standard ones, and it alone feeds the load-balancing losses, the z-loss and the
expert-bias token counts. Paths 2..C get tier ``j`` of their own scores with the model's gating
rule, and carry no auxiliary loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import apply_random_logits, topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter

from ordmoe_megatron.method import OrdMoEConfig, rank_order, routing_scores, select_tier
from ordmoe_megatron.runtime import compat


class TierRouter(TopKRouter):
    """``TopKRouter`` that also routes the lower tiers of an OrdMoE model."""

    # The running means of average ranking: state that checkpoints of other rankings (and
    # converted models) lack; loading them keeps the fresh zeros.
    RUNNING_MEANS = ("score_sum", "score_count")

    @classmethod
    def is_running_mean(cls, state_dict_name: str) -> bool:
        return any(state_dict_name.endswith(f"router.{name}") for name in cls.RUNNING_MEANS)

    def __init__(self, config, pg_collection=None, *, ordmoe: OrdMoEConfig, **router_kwargs):
        # router_kwargs: what this megatron-core's MoELayer passes besides (is_mtp_layer from 0.17).
        super().__init__(config=config, pg_collection=pg_collection, **router_kwargs)
        self.pg_collection = pg_collection  # the MoE layer's process groups, for its dispatcher
        self.ordmoe = ordmoe
        self.tiers = ordmoe.tiers(config.num_moe_experts, config.moe_router_topk)
        # The tier each path stacked on this layer's batch dimension runs (0 = standard top-K);
        # the model sets it: [0] is plain top-K, [0, 1, .., C-1] the fused OrdMoE forward.
        self.path_tiers = [0]
        self._tier_load: Optional[torch.Tensor] = None  # see pop_tier_load
        if ordmoe.ranking == "average":
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            # Running mean of routing scores: training state, saved with the model.
            self.register_buffer("score_sum", torch.zeros(config.num_moe_experts, dtype=torch.float64, device=device))
            self.register_buffer("score_count", torch.zeros((), dtype=torch.float64, device=device))

    @property
    def tier_routing_active(self) -> bool:
        return self.layer_number is None or self.ordmoe.in_scope(self.layer_number)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self.path_tiers == [0]:
            probs, routing_map = super().forward(input, padding_mask=padding_mask)
            self._count_load(routing_map.view(-1, 1, routing_map.shape[-1]), padding_mask)
            return probs, routing_map

        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        seq, stacked, n = logits.shape
        paths = len(self.path_tiers)
        batch = stacked // paths
        per_path = logits.view(seq, paths, batch, n)
        path0_padding = None if padding_mask is None else padding_mask.reshape(seq, paths, batch)[:, 0]

        probs, maps = [], []
        for p, tier in enumerate(self.path_tiers):
            path_logits = per_path[:, p].contiguous()
            if tier == 0 or not self.tier_routing_active:
                if p == 0:  # exactly TopKRouter: z-loss, aux losses and expert-bias counts
                    path_probs, path_map = self.routing(path_logits, padding_mask=path0_padding)
                    # Evaluation and activation recomputation do not count towards the means.
                    if self.ordmoe.ranking == "average" and self.training and torch.is_grad_enabled():
                        self._update_score_mean(path_logits.view(-1, n))
                else:  # the standard top-K on another path: no auxiliary losses
                    path_probs, path_map = topk_routing_with_score_function(
                        path_logits.view(-1, n),
                        self.topk,
                        use_pre_softmax=self.config.moe_router_pre_softmax,
                        scaling_factor=self.config.moe_router_topk_scaling_factor,
                        score_function=self.score_function,
                        expert_bias=self.expert_bias,
                        fused=self.config.moe_router_fusion,
                    )
            else:
                tier_logits = path_logits.view(-1, n)
                path_probs, path_map = select_tier(
                    tier_logits,
                    self.tiers[tier],
                    self.topk,
                    score_function=self.score_function,
                    use_pre_softmax=self.config.moe_router_pre_softmax,
                    scaling_factor=self.config.moe_router_topk_scaling_factor,
                    expert_bias=self.expert_bias,
                    order=self._tier_order(tier_logits),
                    fp32_scores=compat.ROUTER_SCORES_IN_FP32,
                )
            probs.append(path_probs.view(seq, batch, n))
            maps.append(path_map.view(seq, batch, n))
        routing_map = torch.stack(maps, dim=1).view(-1, n)
        self._count_load(routing_map.view(seq, paths, batch, n).transpose(1, 2).reshape(-1, paths, n), padding_mask)
        return torch.stack(probs, dim=1).view(-1, n), routing_map

    def path_widths(self) -> list[int]:
        """Experts each stacked path routes a token to (tier widths; top-K outside the scope)."""
        return [
            len(self.tiers[t]) if t > 0 and self.tier_routing_active else self.topk for t in self.path_tiers
        ]

    def pop_tier_load(self) -> Optional[torch.Tensor]:
        """Tokens routed to each expert on each path since the last call, ``[paths, experts]``
        (one row on a layer before the fan-out, which runs once for all paths); padding tokens
        (``padding_mask``) do not count. None when nothing was routed. Resets the count."""
        load, self._tier_load = self._tier_load, None
        return load

    @torch.no_grad()
    def _count_load(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        """``routing_map`` as ``[tokens, paths, experts]``; ``padding_mask`` (True on padding)
        ``[seq, paths * batch]`` in the router's token order."""
        routed = routing_map.float()
        if padding_mask is not None:
            paths = routed.shape[1]
            seq, stacked = padding_mask.shape
            real = ~padding_mask.bool().view(seq, paths, stacked // paths)
            routed = routed * real.transpose(1, 2).reshape(-1, paths, 1)
        load = routed.sum(0)
        self._tier_load = load if self._tier_load is None or self._tier_load.shape != load.shape else self._tier_load + load

    def _tier_order(self, tier_logits: torch.Tensor) -> Optional[torch.Tensor]:
        """The expert order that tiers are cut from, where it is not the token's own scores."""
        if self.ordmoe.grouping == "random":
            # Default generator: identical on all tensor-parallel ranks of the same data.
            keys = torch.rand(tier_logits.shape, device=tier_logits.device)
            return rank_order(keys)
        if self.ordmoe.ranking == "average":
            return rank_order(self.score_sum / self.score_count.clamp(min=1))
        return None

    @torch.no_grad()
    def _update_score_mean(self, logits: torch.Tensor) -> None:
        scores = routing_scores(logits, self.score_function)
        stats = torch.cat([scores.sum(0).double(), torch.tensor([scores.shape[0]], dtype=torch.float64, device=scores.device)])
        if dist.is_initialized() and self.tp_dp_cp_group is not None and dist.get_world_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(stats, group=self.tp_dp_cp_group)
        self.score_sum += stats[:-1]
        self.score_count += stats[-1]
