"""The tier router: Megatron's ``TopKRouter`` on path 1, tier-constrained routing on paths 2..C.

Plugged in through ``MoESubmodules.router`` (see ``specs.py``). The model stacks its ``C`` paths
along the batch dimension (``[s, b + (C-1)*m, h]``, path-major; ``m = b`` unless the lower paths
are sub-sampled), so one router call routes every path and the MoE layer does one dispatch and
one combine for all of them.

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

from ordmoe_megatron.method import OrdMoEConfig, rank_order, ranking_scores, route_to_experts, routing_scores
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
        # Rows each lower path has in a stacked batch (sub-sampled lower paths); None: as many as
        # path 1. The model sets it per micro-batch.
        self.lower_path_rows: Optional[int] = None
        self._positions_cache: dict = {}
        self._tier_load: dict[int, torch.Tensor] = {}  # tier -> tokens per expert; see pop_tier_load
        self.count_tier_load = True  # off while a forward must not count (mcore.metrics.tier_load_paused)
        # (token, expert) pairs the last call routed, known on the host: what the all-to-all
        # dispatcher sizes its permutation buffer with (mcore.dispatcher).
        self.routed_slots: Optional[int] = None
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
            self.routed_slots = input.shape[0] * input.shape[1] * self.topk
            probs, routing_map = super().forward(input, padding_mask=padding_mask)
            self._count_load(routing_map.view(*input.shape[:2], -1), padding_mask, [input.shape[1]])
            return probs, routing_map

        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        seq, stacked, n = logits.shape
        sizes = self.path_rows(stacked)
        self.routed_slots = seq * sum(rows * width for rows, width in zip(sizes, self.path_widths()))
        if self.path_tiers[0] == 0:
            first = sizes[0]
            path0_logits = logits[:, :first].contiguous()
            path0_padding = None if padding_mask is None else padding_mask[:, :first]
            # Exactly TopKRouter: z-loss, aux losses and expert-bias counts.
            probs0, map0 = self.routing(path0_logits, padding_mask=path0_padding)
            # Evaluation and activation recomputation do not count towards the means.
            if self.ordmoe.ranking == "average" and self.training and torch.is_grad_enabled():
                self._update_score_mean(path0_logits.view(-1, n))
            lower_probs, lower_map = self._route_lower(logits[:, first:], self.path_tiers[1:])
            probs = torch.cat([probs0.view(seq, first, n), lower_probs], dim=1)
            routing_map = torch.cat([map0.view(seq, first, n), lower_map], dim=1)
        else:  # one lower path alone (the sequential path schedule)
            probs, routing_map = self._route_lower(logits, self.path_tiers)
        self._count_load(routing_map, padding_mask, sizes)
        return probs.view(-1, n), routing_map.view(-1, n)

    def path_rows(self, stacked: int) -> list[int]:
        """The rows of a stacked batch of ``stacked`` rows that each path has: the lower paths
        ``lower_path_rows`` each (all equal when None), path 1 the rest."""
        paths = len(self.path_tiers)
        if paths == 1:
            return [stacked]
        m = self.lower_path_rows
        if m is None:
            if stacked % paths:
                raise ValueError(f"a batch of {stacked} rows does not split into {paths} equal paths")
            return [stacked // paths] * paths
        return [stacked - (paths - 1) * m] + [m] * (paths - 1)

    def _route_lower(self, logits: torch.Tensor, tiers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Route the lower paths' rows ``logits`` ``[s, rows, n]`` (``len(tiers)`` paths of equal
        rows, path-major) to their tiers: one ranking of all their tokens, and for tiers of one
        width one gather of every path's tier positions and one gating (no per-path loop, no host
        sync). Outside the layer scope, Megatron's top-K without auxiliary losses."""
        seq, rows, n = logits.shape
        flat = logits.reshape(-1, n)
        if not self.tier_routing_active or all(t == 0 for t in tiers):
            probs, routing_map = topk_routing_with_score_function(
                flat,
                self.topk,
                use_pre_softmax=self.config.moe_router_pre_softmax,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
                score_function=self.score_function,
                expert_bias=self.expert_bias,
                fused=self.config.moe_router_fusion,
            )
            return probs.view(seq, rows, n), routing_map.view(seq, rows, n)
        order = self._tier_order(flat)
        if order is None:
            order = rank_order(
                ranking_scores(
                    flat,
                    self.score_function,
                    self.config.moe_router_pre_softmax,
                    self.expert_bias,
                    compat.ROUTER_SCORES_IN_FP32,
                )
            )
        widths = {len(self.tiers[t]) for t in tiers}
        if len(widths) == 1:  # one gather and one gating for every lower path
            return self._route_rows(logits, order, self._row_positions(tuple(tiers), rows, logits.device))
        # Tiers of different widths (explicit uneven tiers): the same ranking, one gating per path.
        per_path = rows // len(tiers)
        parts = [
            self._route_rows(
                logits[:, p * per_path : (p + 1) * per_path],
                order if order.dim() == 1 else order.view(seq, rows, n)[:, p * per_path : (p + 1) * per_path],
                self._row_positions((tier,), per_path, logits.device),
            )
            for p, tier in enumerate(tiers)
        ]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _route_rows(self, logits: torch.Tensor, order: torch.Tensor, positions: torch.Tensor):
        """``logits`` ``[s, rows, n]`` to the experts at ``positions`` ``[rows, w]`` of ``order``
        (``[n]``, or the tokens' own ``[s * rows, n]`` / ``[s, rows, n]``)."""
        seq, rows, n = logits.shape
        if order.dim() == 1:  # one layer-wide ranking
            experts = order[positions].unsqueeze(0).expand(seq, -1, -1)
        else:
            experts = order.reshape(seq, rows, n).gather(2, positions.unsqueeze(0).expand(seq, -1, -1))
        probs, routing_map = route_to_experts(
            logits.reshape(-1, n),
            experts.reshape(-1, positions.shape[1]),
            self.topk,
            score_function=self.score_function,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            fp32_scores=compat.ROUTER_SCORES_IN_FP32,
        )
        return probs.view(seq, rows, n), routing_map.view(seq, rows, n)

    def _row_positions(self, tiers: tuple, rows: int, device) -> torch.Tensor:
        """``[rows, w]``: the 0-based rank positions of each row's tier, for ``rows`` rows split
        evenly over ``tiers`` of one width (cached per shape: built on the host once, so routing
        makes no host-to-device copy per step)."""
        key = (tiers, rows, str(device))
        cached = self._positions_cache.get(key)
        if cached is None:
            per_path = torch.tensor([[r - 1 for r in self.tiers[t]] for t in tiers])
            cached = per_path.repeat_interleave(rows // len(tiers), dim=0).to(device)
            if len(self._positions_cache) > 8:  # shapes change rarely (training, evaluation)
                self._positions_cache.clear()
            self._positions_cache[key] = cached
        return cached

    def path_widths(self) -> list[int]:
        """Experts each stacked path routes a token to (tier widths; top-K outside the scope)."""
        return [len(self.tiers[t]) if t > 0 and self.tier_routing_active else self.topk for t in self.path_tiers]

    def pop_tier_load(self) -> Optional[torch.Tensor]:
        """Tokens routed to each expert by each tier since the last call, ``[tiers, experts]``
        (one row on a layer before the fan-out, which runs once for all paths); padding tokens
        (``padding_mask``) do not count. None when nothing was routed. Resets the count."""
        load, self._tier_load = self._tier_load, {}
        return torch.stack([load[tier] for tier in sorted(load)]) if load else None

    def _count_load(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor], sizes: list[int]) -> None:
        """``routing_map`` ``[seq, stacked, experts]``; ``padding_mask`` (True on padding)
        ``[seq, stacked]``; ``sizes`` the rows of each path."""
        if not self.count_tier_load:
            return
        with torch.no_grad():
            if padding_mask is not None:
                routing_map = routing_map & ~padding_mask.bool().unsqueeze(-1)
            per_row = routing_map.sum(0)  # [stacked, experts]
            for tier, rows in zip(self.path_tiers, per_row.split(sizes)):
                load = rows.sum(0).float()
                self._tier_load[tier] = self._tier_load[tier] + load if tier in self._tier_load else load

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
        stats = torch.cat(
            [scores.sum(0).double(), torch.tensor([scores.shape[0]], dtype=torch.float64, device=scores.device)]
        )
        if dist.is_initialized() and self.tp_dp_cp_group is not None and dist.get_world_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(stats, group=self.tp_dp_cp_group)
        self.score_sum += stats[:-1]
        self.score_count += stats[-1]
