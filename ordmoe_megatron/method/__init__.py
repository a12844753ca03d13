"""The OrdMoE method in plain PyTorch: tiers, the objective, the configuration. No Megatron import."""

from ordmoe_megatron.method.config import PATH_SCHEDULES, RANKINGS, OrdMoEConfig, parse_layer_scope
from ordmoe_megatron.method.layers import moe_layer_numbers, moe_layer_pattern, parse_moe_layer_freq
from ordmoe_megatron.method.objective import (
    ADVANTAGE_MODES,
    OBJECTIVES,
    Objective,
    default_rewards,
    expert_rank_loss,
    pairwise_logistic_loss,
    plackett_luce_loss,
    rank_advantages,
    rank_loss,
    rank_loss_weights,
    response_logprobs,
    sequence_logprobs,
    tier_order_correct,
)
from ordmoe_megatron.method.ranges import format_ranges, parse_ranges
from ordmoe_megatron.method.tiers import (
    GROUPINGS,
    SCORE_FUNCTIONS,
    Grouping,
    format_tiers,
    parse_rank_spec,
    rank_order,
    ranked_keys,
    ranking_scores,
    route_to_experts,
    routing_scores,
    select_tier,
    tier_experts,
    tier_gating,
    tier_ranks,
)
