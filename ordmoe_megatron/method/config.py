"""OrdMoE configuration, validated when it is built (method page §1-§3).

No Megatron import: ``validate_for_model`` reads a Megatron ``TransformerConfig`` by attribute
name, so this file stays testable on its own. Every message names the flag and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ordmoe_megatron.method.layers import moe_layer_numbers
from ordmoe_megatron.method.objective import ADVANTAGE_MODES, default_rewards
from ordmoe_megatron.method.ranges import format_ranges, parse_ranges
from ordmoe_megatron.method.tiers import GROUPINGS, format_tiers, tier_ranks

RANKINGS = ("token", "average")


def parse_layer_scope(scope: Optional[str]) -> Optional[list[int]]:
    """``None``/``'all'`` -> every MoE layer; ``'1-4,25-28'`` or ``'7,14,21,28'`` -> 1-based layers."""
    if scope is None or scope.strip().lower() == "all":
        return None
    return sorted(set(parse_ranges(scope, "--ordmoe-layer-scope", "1-4,25-28' or '7,14,21,28")))


@dataclass
class OrdMoEConfig:
    """What OrdMoE does on top of a Megatron MoE model.

    ``num_tiers=1`` is plain top-K training (no extra paths, no rank loss).
    """

    num_tiers: int = 3
    grouping: str = "uniform"
    tier_ranks: Optional[str] = None
    rewards: Optional[list[float]] = None
    advantage: str = "zscore"
    rank_loss_coeff: float = 1.0
    layer_scope: Optional[str] = None
    logprob_floor: Union[None, float, str] = None  # a float, or "vocab" for -log(vocab size)
    ranking: str = "token"
    lazy_fanout: bool = True
    scope_layers: Optional[list[int]] = field(init=False, default=None)

    def __post_init__(self):
        if not isinstance(self.num_tiers, int) or self.num_tiers < 1:
            raise ValueError(f"--ordmoe-num-tiers={self.num_tiers} must be an integer >= 1 (1 = plain top-K)")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"--ordmoe-grouping='{self.grouping}' is not one of {', '.join(GROUPINGS)}")
        if self.tier_ranks is not None and self.grouping != "explicit":
            raise ValueError("--ordmoe-tier-ranks needs --ordmoe-grouping=explicit")
        if self.grouping == "explicit" and not self.tier_ranks:
            raise ValueError("--ordmoe-grouping=explicit needs --ordmoe-tier-ranks, e.g. '1-6,25-27,59-61'")
        if self.rewards is None:
            self.rewards = default_rewards(self.num_tiers)
        self.rewards = [float(r) for r in self.rewards]
        if len(self.rewards) != self.num_tiers:
            raise ValueError(
                f"--ordmoe-rewards gives {len(self.rewards)} rewards for --ordmoe-num-tiers={self.num_tiers}; "
                "give one reward per tier"
            )
        if not all(math.isfinite(r) for r in self.rewards):
            raise ValueError(f"--ordmoe-rewards {self.rewards} must be finite numbers (tier 1 highest)")
        if any(a <= b for a, b in zip(self.rewards, self.rewards[1:])):
            raise ValueError(f"--ordmoe-rewards {self.rewards} must be strictly decreasing (tier 1 best)")
        if self.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"--ordmoe-advantage='{self.advantage}' is not one of {', '.join(ADVANTAGE_MODES)}")
        if not math.isfinite(self.rank_loss_coeff) or self.rank_loss_coeff < 0:
            raise ValueError(f"--ordmoe-rank-loss-coeff={self.rank_loss_coeff} must be a finite number >= 0")
        if self.ranking not in RANKINGS:
            raise ValueError(f"--ordmoe-ranking='{self.ranking}' is not one of {', '.join(RANKINGS)}")
        if self.ranking == "average" and self.grouping == "random":
            raise ValueError("--ordmoe-ranking=average ranks by routing scores; --ordmoe-grouping=random ignores them: pick one")
        if isinstance(self.logprob_floor, str) and self.logprob_floor.lower() == "none":
            self.logprob_floor = None
        if isinstance(self.logprob_floor, str) and self.logprob_floor != "vocab":
            try:
                self.logprob_floor = float(self.logprob_floor)
            except ValueError:
                raise ValueError(
                    f"--ordmoe-logprob-floor='{self.logprob_floor}' must be a number (a log-likelihood, <= 0), 'vocab' or 'none'"
                ) from None
        if isinstance(self.logprob_floor, float) and self.logprob_floor > 0:
            raise ValueError(f"--ordmoe-logprob-floor={self.logprob_floor} is a log-likelihood and must be <= 0")
        self.scope_layers = parse_layer_scope(self.layer_scope)

    @property
    def enabled(self) -> bool:
        """More than one path: the model fans out and the rank loss is on."""
        return self.num_tiers > 1

    def floor_value(self, vocab_size: int) -> Optional[float]:
        return -math.log(vocab_size) if self.logprob_floor == "vocab" else self.logprob_floor

    def tiers(self, num_experts: int, topk: int) -> list[list[int]]:
        return tier_ranks(num_experts, topk, self.num_tiers, self.grouping, self.tier_ranks)

    def in_scope(self, layer_number: int) -> bool:
        """Whether the (1-based, global) layer routes its paths by tier."""
        return self.scope_layers is None or layer_number in self.scope_layers

    def shared_prefix_layers(self, num_layers: int, moe_layer_freq, pipelined: bool = False,
                             full_recompute: bool = False) -> int:
        """The lazy fan-out rule: how many leading layers run once for all paths.

        The paths are identical until the first tier-routed MoE layer, so the layers before it
        run once and the hidden states fan out just before it. Not with pipeline parallelism
        (every stage must exchange the same activation shape) nor with full recompute (the
        recomputed block calls its layers without keywords): there the fan-out is at the embedding.
        """
        if not self.enabled or not self.lazy_fanout or pipelined or full_recompute:
            return 0
        scoped = [l for l in moe_layer_numbers(num_layers, moe_layer_freq) if self.in_scope(l)]
        return min(scoped) - 1 if scoped else 0

    def describe(self, num_experts: int, topk: int) -> str:
        """One line: the tiers and the objective's settings."""
        return (
            f"OrdMoE: {self.num_tiers} tiers ({self.grouping}: {format_tiers(self.tiers(num_experts, topk))}), "
            f"rewards {self.rewards}, advantage {self.advantage}, rank-loss coeff {self.rank_loss_coeff}, "
            f"ranking {self.ranking}, layers {self.layer_scope or 'all'}"
        )

    def describe_layout(self, num_experts: int, topk: int, num_layers: int, moe_layer_freq=1,
                        shared_prefix: int = 0) -> list[str]:
        """The dry runs' tier layout: tiers, rewards, tier-routed layers, fan-out and loss."""
        tiers = self.tiers(num_experts, topk)
        lines = [self.describe(num_experts, topk), f"tiers (routing ranks): {format_tiers(tiers)}"]
        for j, (ranks, reward) in enumerate(zip(tiers, self.rewards), start=1):
            lines.append(f"  tier {j}: ranks {format_tiers([ranks])} ({len(ranks)} experts), reward {reward:g}")
        scoped = [l for l in moe_layer_numbers(num_layers, moe_layer_freq) if self.in_scope(l)]
        fanout = "at the embedding"
        if shared_prefix:
            runs = f"layer {shared_prefix} runs" if shared_prefix == 1 else f"layers 1-{shared_prefix} run"
            fanout = f"before layer {shared_prefix + 1} ({runs} once)"
        lines += [
            f"tier-routed MoE layers: {format_ranges(scoped)}",
            f"paths per sequence: {self.num_tiers}; fan-out {fanout}",
            f"loss: lm loss (path 1) + {self.rank_loss_coeff:g} x rank loss ({self.advantage} advantages)"
            + ("" if self.logprob_floor is None else f", log-likelihood floor {self.logprob_floor}"),
        ]
        return lines

    def validate_for_model(self, model_config) -> None:
        """Refuse model settings the tier router cannot honour; call before building the model.

        ``model_config`` is a Megatron ``TransformerConfig`` (read by attribute name; its
        ``moe_layer_freq`` says which layers are MoE layers).
        """
        c = model_config
        n = getattr(c, "num_moe_experts", None)
        if not n:
            raise ValueError("--ordmoe needs a MoE model: set --num-experts (and --moe-router-topk)")
        self.tiers(n, c.moe_router_topk)
        num_layers = c.num_layers
        if self.scope_layers is not None:
            bad = [l for l in self.scope_layers if l < 1 or l > num_layers]
            if bad:
                raise ValueError(f"--ordmoe-layer-scope names layers {bad}; the model has layers 1-{num_layers}")
            moe = moe_layer_numbers(num_layers, getattr(c, "moe_layer_freq", 1))
            if not set(moe).intersection(self.scope_layers):
                raise ValueError(
                    f"--ordmoe-layer-scope {self.layer_scope} contains no MoE layer (MoE layers: {moe})"
                )
        if not self.enabled:
            return  # one tier is plain top-K routing: every Megatron MoE option works unchanged
        balancing = getattr(c, "moe_router_load_balancing_type", "aux_loss")
        balancing = list(balancing) if isinstance(balancing, (list, tuple)) else [balancing]
        refusals = [
            (getattr(c, "moe_expert_capacity_factor", None) is not None,
             "--moe-expert-capacity-factor (token dropping) would drop tokens by the load of all paths; "
             "OrdMoE needs dropless routing: remove the flag"),
            (bool(getattr(c, "moe_router_num_groups", None)) or bool(getattr(c, "moe_router_group_topk", None)),
             "--moe-router-num-groups/--moe-router-group-topk (group-limited routing) has no tier analogue: remove them"),
            (bool({"sinkhorn", "quantile_balancing"} & set(balancing)),
             f"--moe-router-load-balancing-type={'/'.join(balancing)} is not supported with OrdMoE (it picks "
             "experts by its own rule, which lower tiers cannot follow): use aux_loss, seq_aux_loss, "
             "global_aux_loss or none"),
            (getattr(c, "moe_router_force_biased", None) is not None,
             "--moe-router-force-biased (biased random routing for benchmarks) is not supported with OrdMoE: "
             "remove it"),
            (getattr(c, "transformer_impl", None) == "inference_optimized",
             "--transformer-impl inference_optimized swaps the MoE dispatcher at every forward; OrdMoE trains "
             "with the local or transformer_engine implementation"),
            (bool(getattr(c, "moe_enable_routing_replay", False)),
             "--moe-enable-routing-replay replays recorded top-K choices and cannot replay tiers: remove it"),
            (bool(getattr(c, "mtp_num_layers", None)),
             "--mtp-num-layers (multi-token prediction) is not supported with OrdMoE: remove it"),
            (getattr(c, "moe_token_dispatcher_type", "alltoall") == "flex",
             "--moe-token-dispatcher-type=flex (DeepEP/HybridEP) is not supported with OrdMoE: use alltoall or allgather"),
            (getattr(c, "context_parallel_size", 1) > 1,
             "--context-parallel-size > 1 is not supported with OrdMoE (paths are stacked on the batch dimension and "
             "the per-sequence log-likelihood would need a context-parallel reduction): use 1"),
        ]
        for refused, message in refusals:
            if refused:
                raise ValueError(message)
