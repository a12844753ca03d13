"""The tier router: Megatron's ``TopKRouter`` on path 1, tier-constrained routing on paths 2..C.

Plugged in through ``MoESubmodules.router`` (see ``specs.py``). The model stacks its ``C`` paths
along the batch dimension (``[s, b + (C-1)*m, h]``, path-major; ``m = b`` unless the lower paths
are sub-sampled), so one router call routes every path and the MoE layer does one dispatch and
one combine for all of them.

Path 1 goes through ``TopKRouter.routing`` untouched: its probabilities and routing map are bit
for bit the standard ones, and it alone feeds the load-balancing losses, the z-loss and the
expert-bias token counts. Paths 2..C get tier ``j`` of their own ranked list (method page §1):
the experts Megatron's own top-K selects for the token's logits first (group limits, expert bias,
score function and all), then every other expert by the score the router ranks with; the tier's
experts get the model's gating rule, and the paths carry no auxiliary loss. The same rule serves
every grouping: ``random`` shuffles the experts after the token's own top-K, ``average`` ranks
them by the layer's running mean scores.

Average ranking under activation recompute: Megatron runs a checkpointed forward without
gradients and recomputes it in the backward. Each training forward folds path 1's scores into
the running means exactly once, and its recomputation ranks with the very means the forward
used (see ``_layer_means``).
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import apply_random_logits, topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.method import (
    GROUPINGS,
    OrdMoEConfig,
    ranked_keys,
    ranking_scores,
    route_to_experts,
    routing_scores,
    tier_experts,
)
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
        # Packed sequences (THD): the paths are stacked along the tokens, [C*t, 1, h], not the
        # batch; the model sets it per forward.
        self.token_stacked = False
        self._tier_load: dict[int, torch.Tensor] = {}  # tier -> tokens per expert; see pop_tier_load
        self.count_tier_load = True  # off while a forward must not count (mcore.metrics.tier_load_paused)
        # (token, expert) pairs the last call routed, known on the host: what the all-to-all
        # dispatcher sizes its permutation buffer with (mcore.dispatcher), and the rows of the
        # routing map they are for (its guard against a stale value).
        self.routed_slots: Optional[int] = None
        self.routed_rows: Optional[int] = None
        if ordmoe.ranking == "average":
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            # Running mean of routing scores: training state, saved with the model, float64 always.
            self.register_buffer("score_sum", torch.zeros(config.num_moe_experts, dtype=torch.float64, device=device))
            self.register_buffer("score_count", torch.zeros((), dtype=torch.float64, device=device))
        # Average ranking: path-1 statistics of training forwards without gradients whose
        # recomputation (or, in the sequential schedule, whose training pass) is still to come,
        # each with the means it ranked with (see _layer_means); the means the latest path-1
        # forward ranked with, for the lower paths that run alone after it (sequential schedule).
        self._previews: collections.deque = collections.deque()
        self._latest_means: Optional[torch.Tensor] = None

    @property
    def tier_routing_active(self) -> bool:
        return self.layer_number is None or self.ordmoe.in_scope(self.layer_number)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        paths = len(self.path_tiers)
        # Megatron's TransformerLayer may un-flatten the packed row before the MoE layer
        # (megatron-core 0.19: ``packed_seq_params.tokens_per_sample``, the samples of the row on
        # the batch, ``[tokens_per_sample, C * samples, h]``): the stack is path-major in whole
        # samples, so the paths are then stacked on the batch already.
        if not (self.token_stacked and paths > 1) or input.shape[1] > 1:
            return self._forward(input, padding_mask)
        # Paths stacked along the tokens (THD): view them as stacked on the batch, [t, C, h],
        # route, and give the routing back in the tokens' order (path-major).
        hidden = input.shape[-1]
        by_batch = input.reshape(paths, -1, hidden).transpose(0, 1).contiguous()
        mask = None if padding_mask is None else padding_mask.reshape(paths, -1).transpose(0, 1)
        probs, routing_map = self._forward(by_batch, mask)
        n = probs.shape[-1]
        return tuple(t.view(-1, paths, n).transpose(0, 1).reshape(-1, n) for t in (probs, routing_map))

    def _forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq, stacked = input.shape[:2]
        if self.path_tiers == [0] and not self._tracks_means():  # Megatron's router, untouched
            self._record_slots(seq * stacked, seq * stacked * self.topk)
            probs, routing_map = super().forward(input, padding_mask=padding_mask)
            self._count_load(routing_map.view(seq, stacked, -1), padding_mask, [stacked])
            return probs, routing_map

        # TopKRouter.forward's steps, on the stacked paths.
        self._maintain_float32_expert_bias()
        sizes = self.path_rows(stacked)
        logits = self.gating(self._jitter(input, sizes))
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        n = logits.shape[-1]
        self._record_slots(seq * stacked, seq * sum(rows * width for rows, width in zip(sizes, self.path_widths())))
        if self.path_tiers[0] == 0:
            first = sizes[0]
            # One split (its backward is one concatenation, not a zero-filled copy per part).
            path0_logits, lower_logits = logits.split([first, stacked - first], dim=1)
            path0_logits = path0_logits.contiguous()
            path0_padding = None if padding_mask is None else padding_mask[:, :first]
            # Exactly TopKRouter: z-loss, aux losses and expert-bias counts.
            probs, routing_map = self.routing(path0_logits, padding_mask=path0_padding)
            means = self._layer_means(path0_logits) if self.ordmoe.ranking == "average" else None
            if len(sizes) > 1:
                lower_probs, lower_map = self._route_lower(lower_logits, self.path_tiers[1:], means)
                probs = torch.cat([probs.view(seq, first, n), lower_probs], dim=1)
                routing_map = torch.cat([routing_map.view(seq, first, n), lower_map], dim=1)
        else:  # one lower path alone (the sequential path schedule)
            means = None
            if self.ordmoe.ranking == "average":
                means = self._latest_means if self.training and self._latest_means is not None else self._means()
            probs, routing_map = self._route_lower(logits, self.path_tiers, means)
        self._count_load(routing_map.view(seq, stacked, n), padding_mask, sizes)
        return probs.view(-1, n), routing_map.view(-1, n)

    def _jitter(self, input: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """``--moe-input-jitter-eps``: every path's copy of a token gets path 1's jitter, drawn
        as ``TopKRouter`` draws it for path 1's rows, so the paths rank one jittered input."""
        if self.config.moe_input_jitter_eps is None or len(sizes) == 1:
            return self.apply_input_jitter(input)
        if len(set(sizes)) != 1:
            raise OrdMoEError(
                "--moe-input-jitter-eps with --ordmoe-lower-path-fraction below 1: the lower paths' rows "
                "cannot be given path 1's jitter; use a fraction of 1 or no input jitter"
            )
        noise = self.apply_input_jitter(torch.ones_like(input[:, : sizes[0]]))  # 1 x the noise, exactly
        return input * noise.repeat(1, len(sizes), 1)

    def _record_slots(self, rows: int, slots: int) -> None:
        self.routed_rows, self.routed_slots = rows, slots

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

    def _route_lower(
        self, logits: torch.Tensor, tiers: list[int], means: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route the lower paths' rows ``logits`` ``[s, rows, n]`` (``len(tiers)`` paths of equal
        rows, path-major) to their tiers: Megatron's top-K of every row heads its ranked list, each
        path selects its tier's ranks from it, and tiers of one width share one gating (no host
        sync). Outside the layer scope, Megatron's top-K without auxiliary losses."""
        seq, rows, n = logits.shape
        flat = logits.reshape(-1, n)
        if not self.tier_routing_active or all(t == 0 for t in tiers):
            probs, routing_map = self._megatron_top_k(flat)
            return probs.view(seq, rows, n), routing_map.view(seq, rows, n)
        with torch.no_grad():
            _, selected = self._megatron_top_k(flat)
            keys = ranked_keys(self._order_scores(flat, means), selected)
        per_path = rows // len(tiers)
        keys = keys.view(seq, len(tiers), per_path, n)
        experts = [tier_experts(keys[:, p], self.tiers[t]) for p, t in enumerate(tiers)]  # [s, m, w] each
        if len({e.shape[-1] for e in experts}) == 1:  # one gating for every lower path
            chosen = torch.stack(experts, dim=1).reshape(-1, experts[0].shape[-1])
            probs, routing_map = self._gate(flat, chosen)
            return probs.view(seq, rows, n), routing_map.view(seq, rows, n)
        # Tiers of different widths (explicit uneven tiers): one gating per path.
        parts = [
            self._gate(logits[:, p * per_path : (p + 1) * per_path].reshape(-1, n), e.reshape(-1, e.shape[-1]))
            for p, e in enumerate(experts)
        ]
        return (
            torch.cat([probs.view(seq, per_path, n) for probs, _ in parts], dim=1),
            torch.cat([routing_map.view(seq, per_path, n) for _, routing_map in parts], dim=1),
        )

    def _megatron_top_k(self, flat_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's top-K routing of ``[tokens, n]`` logits, as ``TopKRouter.routing`` selects
        (group limits, expert bias, score function, fusion), without its auxiliary losses."""
        return topk_routing_with_score_function(
            flat_logits,
            self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            fused=self.config.moe_router_fusion,
        )

    def _order_scores(self, flat_logits: torch.Tensor, means: Optional[torch.Tensor]) -> torch.Tensor:
        """What ranks the experts after a token's own top-K: a uniform shuffle (random grouping;
        Megatron's default generator, identical on the tensor-parallel ranks of the same data),
        the layer's mean scores (average ranking), or the scores the router ranks with."""
        if GROUPINGS[self.ordmoe.grouping].shuffled:
            return torch.rand(flat_logits.shape, device=flat_logits.device)
        if means is not None:
            return means
        return ranking_scores(
            flat_logits,
            self.score_function,
            self.config.moe_router_pre_softmax,
            self.expert_bias,
            compat.ROUTER_SCORES_IN_FP32,
        )

    def _gate(self, flat_logits: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's gating rule on each token's ``experts`` ([tokens, w])."""
        return route_to_experts(
            flat_logits,
            experts,
            self.topk,
            score_function=self.score_function,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            fp32_scores=compat.ROUTER_SCORES_IN_FP32,
        )

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
        ``[seq, stacked]``; ``sizes`` the rows of each path. A training forward without gradients
        (a checkpointed forward, recomputed in the backward) is counted in its recomputation."""
        if not self.count_tier_load or (self.training and not torch.is_grad_enabled()):
            return
        with torch.no_grad():
            if padding_mask is not None:
                routing_map = routing_map & ~padding_mask.bool().unsqueeze(-1)
            if len(set(sizes)) == 1:  # paths of equal rows: one reduction
                loads = routing_map.view(routing_map.shape[0], len(sizes), sizes[0], -1).sum((0, 2)).float()
            else:
                loads = torch.stack([rows.sum((0, 1)) for rows in routing_map.split(sizes, dim=1)]).float()
            for tier, load in zip(self.path_tiers, loads):
                self._tier_load[tier] = self._tier_load[tier] + load if tier in self._tier_load else load

    # ---------------------------------------------------------------------------------------
    # average ranking: the running means
    # ---------------------------------------------------------------------------------------
    def _tracks_means(self) -> bool:
        """Whether a forward of path 1 alone must still fold its scores into the running means
        (a training forward of a C > 1 model with average ranking: the sequential schedule)."""
        return self.ordmoe.ranking == "average" and self.ordmoe.enabled and self.training and self.tier_routing_active

    def _means(self) -> torch.Tensor:
        return self.score_sum / self.score_count.clamp(min=1)

    def _layer_means(self, path0_logits: torch.Tensor) -> torch.Tensor:
        """The mean scores this forward ranks the lower paths with; folds path 1's scores into
        the running means exactly once per training forward.

        A training forward with gradients folds them in and ranks with the result. One without
        gradients under activation recompute (or the sequential schedule's forward-only pass)
        ranks with the means plus every preview not yet folded in plus its own scores, and
        queues them; its recomputation (or training pass), which comes in the same order, takes
        them from the queue, folds them in and ranks with the same means. Evaluation ranks with
        the running means and changes nothing.
        """
        if not self.training:
            return self._means()
        if torch.is_grad_enabled() and self._previews:
            stats, means = self._previews.popleft()
        else:
            stats = self._path_one_stats(path0_logits)
            total = torch.stack([s for s, _ in self._previews] + [stats]).sum(0) if self._previews else stats
            means = (self.score_sum + total[:-1]) / (self.score_count + total[-1]).clamp(min=1)
            if not torch.is_grad_enabled():
                if self._recomputed() or self.ordmoe.path_schedule == "sequential":
                    self._previews.append((stats, means))
                self._latest_means = means
                return means  # (a stray forward without gradients counts nothing)
        with torch.no_grad():
            self.score_sum += stats[:-1]
            self.score_count += stats[-1]
        self._latest_means = means
        return means

    def _recomputed(self) -> bool:
        """Whether Megatron checkpoints this router's forward (and recomputes it in the backward)."""
        c = self.config
        return c.recompute_granularity == "full" or (
            c.recompute_granularity == "selective" and "moe" in (c.recompute_modules or [])
        )

    @torch.no_grad()
    def _path_one_stats(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n + 1]`` float64: path 1's routing scores summed over its tokens, and their count,
        summed over the tensor-, data- and context-parallel ranks."""
        scores = routing_scores(logits.view(-1, logits.shape[-1]), self.score_function)
        count = torch.full((1,), scores.shape[0], dtype=torch.float64, device=scores.device)
        stats = torch.cat([scores.sum(0).double(), count])
        if dist.is_initialized() and self.tp_dp_cp_group is not None and dist.get_world_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(stats, group=self.tp_dp_cp_group)
        return stats

    def train(self, mode: bool = True):
        # Previews belong to the training pass in flight; a switch of mode ends it.
        self._previews.clear()
        self._latest_means = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        """Keep the running means float64 through ``.bfloat16()``/``.half()`` (Megatron's
        ``Float16Module`` casts the whole model): the count would stop growing at 2^20 tokens in
        bf16. Device moves apply; the values never pass through the cast."""
        kept = {name: self._buffers[name] for name in self.RUNNING_MEANS if self._buffers.get(name) is not None}
        module = super()._apply(fn, *args, **kwargs)
        for name, value in kept.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float64:
                self._buffers[name] = value.to(device=moved.device)
        return module
