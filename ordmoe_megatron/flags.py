"""The ``--ordmoe-*`` flags, in Megatron-LM's naming style, for every front end.

``add_ordmoe_args`` adds them to a parser (``ordmoe-pretrain``, Megatron-LM's
``extra_args_provider``, the tier report, which takes the tier flags only);
``ordmoe_config_from_args`` turns the parsed flags into a validated ``OrdMoEConfig``.
"""

from __future__ import annotations

import argparse
from typing import Optional

from ordmoe_megatron.method import ADVANTAGE_MODES, GROUPINGS, OBJECTIVES, PATH_SCHEDULES, RANKINGS, OrdMoEConfig

# The flags that choose the tier paths (what the tier report takes); the rest shape the loss.
TIER_FLAGS = ("ordmoe_num_tiers", "ordmoe_grouping", "ordmoe_tier_ranks", "ordmoe_layer_scope", "ordmoe_ranking")


def add_ordmoe_args(parser: argparse.ArgumentParser, tier_flags_only: bool = False) -> argparse.ArgumentParser:
    group = parser.add_argument_group("OrdMoE")
    if not tier_flags_only:
        group.add_argument(
            "--ordmoe",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="Train with OrdMoE tier paths and the expert rank loss (--no-ordmoe: plain top-K).",
        )
    group.add_argument(
        "--ordmoe-num-tiers",
        type=int,
        default=3,
        help="Number of expert tiers C (paths per sequence); 1 is plain top-K.",
    )
    group.add_argument(
        "--ordmoe-grouping",
        choices=GROUPINGS,
        default="uniform",
        help="How tiers are cut from the ranked experts (uniform is the paper's).",
    )
    group.add_argument(
        "--ordmoe-tier-ranks",
        type=str,
        default=None,
        help="Explicit tier ranks with --ordmoe-grouping explicit, e.g. '1-6,25-27,59-61'.",
    )
    group.add_argument(
        "--ordmoe-layer-scope",
        type=str,
        default=None,
        help="1-based layers whose MoE routes paths by tier: 'all' (default), '1-4', '7,14,21,28'.",
    )
    group.add_argument(
        "--ordmoe-ranking",
        choices=RANKINGS,
        default="token",
        help="Rank experts per token (default) or by each layer's running mean score (saved with the model).",
    )
    if tier_flags_only:
        return parser
    group.add_argument(
        "--ordmoe-rewards",
        type=float,
        nargs="+",
        default=None,
        help="Fixed, strictly decreasing reward per tier (default evenly spaced 1..0).",
    )
    group.add_argument(
        "--ordmoe-advantage",
        choices=ADVANTAGE_MODES,
        default="zscore",
        help="Advantage of the rewards: zscore (Eq. 8), center or raw.",
    )
    group.add_argument(
        "--ordmoe-rank-loss-coeff", type=float, default=1.0, help="Weight of the expert rank loss (lambda_ERL)."
    )
    group.add_argument(
        "--ordmoe-logprob-floor",
        type=str,
        default=None,
        help="Stop pushing a low tier down once its mean log-likelihood is below this "
        "(a number, 'vocab' for -log(vocab size), or 'none'). Off by default.",
    )
    group.add_argument(
        "--ordmoe-lazy-fanout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Run the layers before the first tier-routed layer once, not C times.",
    )
    group.add_argument(
        "--ordmoe-objective",
        choices=OBJECTIVES,
        default="advantage",
        help="Tier-ranking objective: advantage (the paper's Eq. 9), pairwise-logistic or "
        "plackett-luce (bounded preference objectives over the tier order).",
    )
    group.add_argument(
        "--ordmoe-beta",
        type=float,
        default=1.0,
        help="Scale of log-likelihood differences in the preference objectives.",
    )
    group.add_argument(
        "--ordmoe-path-schedule",
        choices=PATH_SCHEDULES,
        default="fused",
        help="fused: all paths of a micro-batch in one forward (fastest, C x activations); "
        "sequential: one path after another (the plain model's activation memory).",
    )
    group.add_argument(
        "--ordmoe-lower-path-fraction",
        type=float,
        default=1.0,
        help="Run paths 2..C on this random share of each micro-batch's sequences (an unbiased "
        "estimate of the rank loss's gradient; 1.0 is the paper's).",
    )
    return parser


def ordmoe_config_from_args(args: argparse.Namespace) -> Optional[OrdMoEConfig]:
    """The validated OrdMoE configuration, or None with ``--no-ordmoe``. Flags a parser did not
    add (the tier report's) keep ``OrdMoEConfig``'s defaults."""
    if not getattr(args, "ordmoe", True):
        return None
    names = {
        "num_tiers",
        "grouping",
        "tier_ranks",
        "layer_scope",
        "ranking",
        "rewards",
        "advantage",
        "rank_loss_coeff",
        "logprob_floor",
        "lazy_fanout",
        "objective",
        "beta",
        "path_schedule",
        "lower_path_fraction",
    }
    given = {name: getattr(args, "ordmoe_" + name) for name in names if hasattr(args, "ordmoe_" + name)}
    return OrdMoEConfig(**given)
