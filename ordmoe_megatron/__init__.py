"""OrdMoE for Megatron-Core: routing-score tiers, fused multi-path forward, expert-rank loss.

The method's math (``tiers``, ``loss``, ``config``) is plain PyTorch and imports no Megatron;
the Megatron glue (router, model, objective, trainer) is imported on demand.
"""
from ordmoe_megatron.config import OrdMoEConfig, parse_layer_scope
from ordmoe_megatron.loss import (
    default_rewards,
    expert_rank_loss,
    rank_advantages,
    sequence_logprobs,
    tier_order_correct,
)
from ordmoe_megatron.tiers import (
    format_tiers,
    parse_rank_spec,
    rank_order,
    ranking_scores,
    select_tier,
    tier_gating,
    tier_ranks,
)

__version__ = "0.1.0"
