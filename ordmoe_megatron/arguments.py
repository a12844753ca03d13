"""The OrdMoE command-line flags, in Megatron-LM's naming style.

``add_ordmoe_args`` is what ``ordmoe-pretrain`` and Megatron-LM's ``extra_args_provider`` use;
``ordmoe_config_from_args`` turns the parsed flags into a validated ``OrdMoEConfig``.
"""
from __future__ import annotations

import argparse
from typing import Optional

from ordmoe_megatron.config import RANKINGS, OrdMoEConfig
from ordmoe_megatron.loss import ADVANTAGE_MODES
from ordmoe_megatron.tiers import GROUPINGS


def add_ordmoe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("OrdMoE")
    group.add_argument("--ordmoe", action=argparse.BooleanOptionalAction, default=False,
                       help="Train with OrdMoE tier paths and the expert rank loss (--no-ordmoe: plain top-K).")
    group.add_argument("--ordmoe-num-tiers", type=int, default=3,
                       help="Number of expert tiers C (paths per sequence); 1 is plain top-K training.")
    group.add_argument("--ordmoe-grouping", choices=GROUPINGS, default="uniform",
                       help="How tiers are cut from the ranked experts (uniform is the paper's).")
    group.add_argument("--ordmoe-tier-ranks", type=str, default=None,
                       help="Explicit tier ranks with --ordmoe-grouping explicit, e.g. '1-6,25-27,59-61'.")
    group.add_argument("--ordmoe-rewards", type=float, nargs="+", default=None,
                       help="Fixed, strictly decreasing reward per tier (default evenly spaced 1..0).")
    group.add_argument("--ordmoe-advantage", choices=ADVANTAGE_MODES, default="zscore",
                       help="Advantage of the rewards: zscore (Eq. 8), center or raw.")
    group.add_argument("--ordmoe-rank-loss-coeff", type=float, default=1.0,
                       help="Weight of the expert rank loss (lambda_ERL).")
    group.add_argument("--ordmoe-layer-scope", type=str, default=None,
                       help="1-based layers whose MoE routes paths by tier: 'all' (default), '1-4', '7,14,21,28'.")
    group.add_argument("--ordmoe-logprob-floor", type=str, default=None,
                       help="Stop pushing a low tier down once its mean log-likelihood is below this "
                            "(a number, 'vocab' for -log(vocab size), or 'none'). Off by default.")
    group.add_argument("--ordmoe-ranking", choices=RANKINGS, default="token",
                       help="Rank experts per token (default) or by each layer's running mean score.")
    group.add_argument("--ordmoe-lazy-fanout", action=argparse.BooleanOptionalAction, default=True,
                       help="Run the layers before the first tier-routed layer once, not C times.")
    return parser


def ordmoe_config_from_args(args: argparse.Namespace) -> Optional[OrdMoEConfig]:
    """The validated OrdMoE configuration, or None with ``--no-ordmoe``."""
    if not args.ordmoe:
        return None
    return OrdMoEConfig(
        num_tiers=args.ordmoe_num_tiers,
        grouping=args.ordmoe_grouping,
        tier_ranks=args.ordmoe_tier_ranks,
        rewards=args.ordmoe_rewards,
        advantage=args.ordmoe_advantage,
        rank_loss_coeff=args.ordmoe_rank_loss_coeff,
        layer_scope=args.ordmoe_layer_scope,
        logprob_floor=args.ordmoe_logprob_floor,
        ranking=args.ordmoe_ranking,
        lazy_fanout=args.ordmoe_lazy_fanout,
    )
