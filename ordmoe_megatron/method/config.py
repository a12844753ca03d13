"""OrdMoE configuration, validated when it is built (method page §1-§3).

No Megatron import: ``validate_for_model`` reads a Megatron ``TransformerConfig`` by attribute
name, so this file stays testable on its own. Every message names the flag and the fix.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.method.layers import moe_layer_numbers
from ordmoe_megatron.method.objective import ADVANTAGE_MODES, OBJECTIVES, default_rewards
from ordmoe_megatron.method.ranges import format_ranges, parse_ranges
from ordmoe_megatron.method.tiers import GROUPINGS, SCORE_FUNCTIONS, format_tiers, tier_ranks

RANKINGS = ("token", "average")
# fused: all paths of a micro-batch in one forward ([s, C*b, h]); sequential: each path its own
# forward and backward, one after another (plain activation memory and p2p shapes).
PATH_SCHEDULES = ("fused", "sequential")


def parse_layer_scope(scope: Optional[str]) -> Optional[list[int]]:
    """``None``/``'all'`` -> every MoE layer; ``'1-4,25-28'`` or ``'7,14,21,28'`` -> 1-based layers."""
    if scope is None or scope.strip().lower() == "all":
        return None
    return sorted(set(parse_ranges(scope, "--ordmoe-layer-scope", "1-4,25-28' or '7,14,21,28")))


def option(name: str) -> str:
    """The command-line flag of an ``OrdMoEConfig`` field: ``num_tiers`` -> ``--ordmoe-num-tiers``."""
    return "--ordmoe-" + name.replace("_", "-")


# Field metadata: the field is one of the flags that choose the tier paths (what the tier report
# takes); the rest shape the loss.
TIER_FLAG = {"tier_flag": True}


@functools.cache
def literal_choices() -> dict[str, tuple]:
    """``{field: choices}`` for the ``OrdMoEConfig`` fields typed ``Literal[...]``."""
    hints = typing.get_type_hints(OrdMoEConfig)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in OrdMoEConfig.settings()
        if typing.get_origin(hints[f.name]) is Literal
    }


@dataclass
class OrdMoEConfig:
    """What OrdMoE does on top of a Megatron MoE model.

    Each field is one ``--ordmoe-*`` flag (``option``): ``flags.add_ordmoe_args`` makes the flag's
    type, default, choices (a ``Literal`` field) and help (the field's docstring) from the field.
    ``num_tiers=1`` is plain top-K training (no extra paths, no rank loss).
    """

    num_tiers: int = field(default=3, metadata=TIER_FLAG)
    """Number of expert tiers C (paths per sequence); 1 is plain top-K."""
    grouping: Literal[tuple(GROUPINGS)] = field(default="uniform", metadata=TIER_FLAG)
    """How tiers are cut from the ranked experts (uniform is the paper's)."""
    tier_ranks: Optional[str] = field(default=None, metadata=TIER_FLAG)
    """Explicit tier ranks with --ordmoe-grouping explicit, e.g. '1-6,25-27,59-61'."""
    layer_scope: Optional[str] = field(default=None, metadata=TIER_FLAG)
    """1-based layers whose MoE routes paths by tier: 'all' (default), '1-4', '7,14,21,28'."""
    ranking: Literal[RANKINGS] = field(default="token", metadata=TIER_FLAG)
    """Rank experts per token (default) or by each layer's running mean score (saved with the model)."""
    rewards: Optional[list[float]] = None
    """Fixed, strictly decreasing reward per tier (default evenly spaced 1..0)."""
    advantage: Literal[tuple(ADVANTAGE_MODES)] = "zscore"
    """Advantage of the rewards: zscore (Eq. 8), center or raw."""
    rank_loss_coeff: float = 1.0
    """Weight of the expert rank loss (lambda_ERL)."""
    logprob_floor: Union[None, float, str] = field(default=None, metadata={"argparse_type": str})
    """Stop pushing a low tier down once its mean log-likelihood is below this (a number, 'vocab' for
    -log(vocab size), or 'none'). Off by default."""
    lazy_fanout: bool = True
    """Run the layers before the first tier-routed layer once, not C times."""
    objective: Literal[tuple(OBJECTIVES)] = "advantage"
    """Tier-ranking objective: advantage (the paper's Eq. 9), pairwise-logistic or plackett-luce
    (bounded preference objectives over the tier order)."""
    beta: float = 1.0
    """Scale of log-likelihood differences in the preference objectives."""
    path_schedule: Literal[PATH_SCHEDULES] = "fused"
    """fused: all paths of a micro-batch in one forward (fastest, C x activations); sequential: one
    path after another (the plain model's activation memory)."""
    lower_path_fraction: float = 1.0
    """Run paths 2..C on this random share of each micro-batch's sequences (an unbiased estimate of
    the rank loss's gradient; 1.0 is the paper's)."""
    scope_layers: Optional[list[int]] = field(init=False, default=None)
    """The layers ``layer_scope`` names (None: every MoE layer); derived, not a flag."""

    def __post_init__(self):
        if not isinstance(self.num_tiers, int) or self.num_tiers < 1:
            raise OrdMoEError(f"--ordmoe-num-tiers={self.num_tiers} must be an integer >= 1 (1 = plain top-K)")
        for name, choices in literal_choices().items():
            if getattr(self, name) not in choices:
                raise OrdMoEError(f"{option(name)}='{getattr(self, name)}' is not one of {', '.join(choices)}")
        explicit = GROUPINGS[self.grouping].ranks is None
        if self.tier_ranks is not None and not explicit:
            raise OrdMoEError("--ordmoe-tier-ranks needs --ordmoe-grouping=explicit")
        if explicit and not self.tier_ranks:
            raise OrdMoEError("--ordmoe-grouping=explicit needs --ordmoe-tier-ranks, e.g. '1-6,25-27,59-61'")
        if self.rewards is None:
            self.rewards = default_rewards(self.num_tiers)
        self.rewards = [float(r) for r in self.rewards]
        if len(self.rewards) != self.num_tiers:
            raise OrdMoEError(
                f"--ordmoe-rewards gives {len(self.rewards)} rewards for --ordmoe-num-tiers={self.num_tiers}; "
                "give one reward per tier"
            )
        if not all(math.isfinite(r) for r in self.rewards):
            raise OrdMoEError(f"--ordmoe-rewards {self.rewards} must be finite numbers (tier 1 highest)")
        if any(a <= b for a, b in zip(self.rewards, self.rewards[1:])):
            raise OrdMoEError(f"--ordmoe-rewards {self.rewards} must be strictly decreasing (tier 1 best)")
        if not math.isfinite(self.rank_loss_coeff) or self.rank_loss_coeff < 0:
            raise OrdMoEError(f"--ordmoe-rank-loss-coeff={self.rank_loss_coeff} must be a finite number >= 0")
        if self.ranking == "average" and GROUPINGS[self.grouping].shuffled:
            raise OrdMoEError(
                "--ordmoe-ranking=average ranks by routing scores; --ordmoe-grouping=random ignores them: pick one"
            )
        if isinstance(self.logprob_floor, str) and self.logprob_floor.lower() == "none":
            self.logprob_floor = None
        if isinstance(self.logprob_floor, str) and self.logprob_floor != "vocab":
            try:
                self.logprob_floor = float(self.logprob_floor)
            except ValueError:
                raise OrdMoEError(
                    f"--ordmoe-logprob-floor='{self.logprob_floor}' must be a number (a log-likelihood, <= 0), "
                    "'vocab' or 'none'"
                ) from None
        if isinstance(self.logprob_floor, (int, float)) and not -math.inf < self.logprob_floor <= 0:
            raise OrdMoEError(
                f"--ordmoe-logprob-floor={self.logprob_floor} must be a finite log-likelihood <= 0, 'vocab' or 'none'"
            )
        if self.logprob_floor is not None and not OBJECTIVES[self.objective].rewards:
            raise OrdMoEError(
                f"--ordmoe-logprob-floor is for the advantage objective; --ordmoe-objective "
                f"{self.objective} is bounded already: drop the floor"
            )
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise OrdMoEError(f"--ordmoe-beta={self.beta} must be a finite number above 0")
        if self.beta != 1.0 and OBJECTIVES[self.objective].rewards:
            raise OrdMoEError(
                f"--ordmoe-beta={self.beta} scales the preference objectives only; --ordmoe-objective advantage "
                "ignores it: drop --ordmoe-beta, or choose pairwise-logistic or plackett-luce"
            )
        if self.num_tiers == 1 and (self.objective != "advantage" or self.lower_path_fraction != 1):
            what = "--ordmoe-objective " + self.objective if self.objective != "advantage" else ""
            what = what or f"--ordmoe-lower-path-fraction={self.lower_path_fraction}"
            raise OrdMoEError(
                f"--ordmoe-num-tiers=1 is plain top-K (no lower paths, no rank loss), so {what} would be ignored: "
                "drop it, or use --ordmoe-num-tiers 2 or more"
            )
        if not (isinstance(self.lower_path_fraction, (int, float)) and 0 < self.lower_path_fraction <= 1):
            raise OrdMoEError(
                f"--ordmoe-lower-path-fraction={self.lower_path_fraction} must be in (0, 1]: the share "
                "of each micro-batch's sequences the lower paths run on"
            )
        self.scope_layers = parse_layer_scope(self.layer_scope)

    @classmethod
    def settings(cls, tier_flags_only: bool = False) -> list:
        """The fields that are settings (one ``--ordmoe-*`` flag each), in order; with
        ``tier_flags_only`` those marked ``TIER_FLAG`` (the ones that choose the tier paths)."""
        return [f for f in fields(cls) if f.init and (not tier_flags_only or f.metadata.get("tier_flag"))]

    @property
    def enabled(self) -> bool:
        """More than one path: the model fans out and the rank loss is on."""
        return self.num_tiers > 1

    def floor_value(self, vocab_size: int) -> Optional[float]:
        return -math.log(vocab_size) if self.logprob_floor == "vocab" else self.logprob_floor

    def objective_kwargs(self, vocab_size: int) -> dict:
        """This run's settings of ``objective.rank_loss`` (and ``rank_loss_weights``)."""
        return dict(rewards=self.rewards, mode=self.advantage, floor=self.floor_value(vocab_size), beta=self.beta)

    @property
    def linear_objective(self) -> bool:
        """Whether a path's gradient weight needs only its own log-likelihood (``Objective.linear``)."""
        return OBJECTIVES[self.objective].linear

    def tiers(self, num_experts: int, topk: int) -> list[list[int]]:
        return tier_ranks(num_experts, topk, self.num_tiers, self.grouping, self.tier_ranks)

    def in_scope(self, layer_number: int) -> bool:
        """Whether the (1-based, global) layer routes its paths by tier."""
        return self.scope_layers is None or layer_number in self.scope_layers

    def shared_prefix_layers(
        self, num_layers: int, moe_layer_freq, pipelined: bool = False, full_recompute: bool = False
    ) -> int:
        """The lazy fan-out rule: how many leading layers run once for all paths.

        The paths are identical until the first tier-routed MoE layer, so the layers before it
        run once and the hidden states fan out just before it. Not with pipeline parallelism
        (every stage must exchange the same activation shape) nor with full recompute (the
        recomputed block calls its layers without keywords): there the fan-out is at the embedding.
        """
        if (
            not self.enabled
            or not self.lazy_fanout
            or pipelined
            or full_recompute
            or self.path_schedule == "sequential"
        ):
            return 0  # (sequential: each forward is one path, which runs every layer)
        scoped = [layer for layer in moe_layer_numbers(num_layers, moe_layer_freq) if self.in_scope(layer)]
        return min(scoped) - 1 if scoped else 0

    def shared_prefix_layers_of(self, model_config) -> int:
        """``shared_prefix_layers`` of a model: the one place its inputs are read. ``model_config``
        is a Megatron ``TransformerConfig`` or Megatron-LM's ``args`` (the same attribute names:
        ``num_layers``, ``moe_layer_freq``, ``pipeline_model_parallel_size``,
        ``recompute_granularity``)."""
        c = model_config
        return self.shared_prefix_layers(
            c.num_layers,
            getattr(c, "moe_layer_freq", 1),
            (getattr(c, "pipeline_model_parallel_size", 1) or 1) > 1,
            getattr(c, "recompute_granularity", None) == "full",
        )

    def lower_path_rows(self, batch: int) -> int:
        """How many of a micro-batch's ``batch`` sequences the lower paths run on."""
        return batch if self.lower_path_fraction >= 1 else max(1, round(self.lower_path_fraction * batch))

    def stage_batch_rows(self, micro_batch_size: int) -> str:
        """The batch dimension of the activations pipeline stages exchange: ``'3 x 2'`` (fused),
        ``'2 + 2 x 1'`` (fused, sub-sampled), ``'2'`` or ``'2 or 1'`` (sequential, one path at a
        time; sub-sampled lower paths send fewer rows)."""
        b, m, c = micro_batch_size, self.lower_path_rows(micro_batch_size), self.num_tiers
        if not self.enabled:
            return str(b)
        if self.path_schedule == "sequential":
            return f"{b}" if m == b else f"{b} or {m} (one path at a time)"
        return f"{c} x {b}" if m == b else f"{b} + {c - 1} x {m}"

    def check_pipeline(self, micro_batch_size: int, pipeline: int, virtual_stages: bool) -> None:
        """The sequential schedule with sub-sampled lower paths sends activations of two shapes
        between pipeline stages (Megatron's ``variable_seq_lengths``, which exchanges each shape
        first). Megatron pairs those shape messages wrongly when a stage's previous and next stage
        are the same rank (two stages with virtual stages); refused there."""
        if not (
            self.enabled
            and self.path_schedule == "sequential"
            and pipeline == 2
            and virtual_stages
            and self.lower_path_rows(micro_batch_size) < micro_batch_size
        ):
            return
        raise OrdMoEError(
            "--ordmoe-path-schedule sequential with --ordmoe-lower-path-fraction below 1 needs Megatron's "
            "variable-shape pipeline exchange, which mis-pairs its messages with 2 pipeline stages and "
            "virtual stages: use the fused schedule, a fraction of 1, more pipeline stages, or no "
            "virtual stages"
        )

    def paths_per_sequence(self, micro_batch_size: int) -> float:
        """Forward paths a training sequence takes on average: ``1 + (C-1) m / b``."""
        return 1 + (self.num_tiers - 1) * self.lower_path_rows(micro_batch_size) / micro_batch_size

    def describe(self, num_experts: int, topk: int) -> str:
        """One line: the tiers, the objective's settings and the path schedule."""
        objective = (
            f"rewards {self.rewards}, advantage {self.advantage}"
            if OBJECTIVES[self.objective].rewards
            else f"objective {self.objective} (beta {self.beta:g})"
        )
        return (
            f"OrdMoE: {self.num_tiers} tiers ({self.grouping}: {format_tiers(self.tiers(num_experts, topk))}), "
            f"{objective}, rank-loss coeff {self.rank_loss_coeff}, ranking {self.ranking}, "
            f"layers {self.layer_scope or 'all'}, paths {self.path_schedule}"
            + (
                f" (lower paths on {self.lower_path_fraction:g} of the sequences)"
                if self.lower_path_fraction < 1
                else ""
            )
        )

    def describe_layout(
        self, num_experts: int, topk: int, num_layers: int, moe_layer_freq=1, shared_prefix: int = 0
    ) -> list[str]:
        """The dry runs' tier layout: tiers, rewards, tier-routed layers, fan-out and loss."""
        tiers = self.tiers(num_experts, topk)
        lines = [self.describe(num_experts, topk), f"tiers (routing ranks): {format_tiers(tiers)}"]
        for j, (ranks, reward) in enumerate(zip(tiers, self.rewards), start=1):
            lines.append(f"  tier {j}: ranks {format_tiers([ranks])} ({len(ranks)} experts), reward {reward:g}")
        scoped = [layer for layer in moe_layer_numbers(num_layers, moe_layer_freq) if self.in_scope(layer)]
        fanout = "at the embedding"
        if shared_prefix:
            runs = f"layer {shared_prefix} runs" if shared_prefix == 1 else f"layers 1-{shared_prefix} run"
            fanout = f"before layer {shared_prefix + 1} ({runs} once)"
        lines += [
            f"tier-routed MoE layers: {format_ranges(scoped)}",
            f"paths per sequence: {self.num_tiers}; fan-out {fanout}",
            f"loss: lm loss (path 1) + {self.rank_loss_coeff:g} x rank loss ("
            + (f"{self.advantage} advantages" if OBJECTIVES[self.objective].rewards else self.objective)
            + ")"
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
            raise OrdMoEError("--ordmoe needs a MoE model: set --num-experts (and --moe-router-topk)")
        self.tiers(n, c.moe_router_topk)
        score_function = getattr(c, "moe_router_score_function", "softmax")
        if score_function not in SCORE_FUNCTIONS:
            raise OrdMoEError(
                f"--moe-router-score-function {score_function} is not one the tier router implements: "
                f"use one of {', '.join(SCORE_FUNCTIONS)}"
            )
        num_layers = c.num_layers
        if self.scope_layers is not None:
            bad = [layer for layer in self.scope_layers if layer < 1 or layer > num_layers]
            if bad:
                raise OrdMoEError(f"--ordmoe-layer-scope names layers {bad}; the model has layers 1-{num_layers}")
            moe = moe_layer_numbers(num_layers, getattr(c, "moe_layer_freq", 1))
            if not set(moe).intersection(self.scope_layers):
                raise OrdMoEError(f"--ordmoe-layer-scope {self.layer_scope} contains no MoE layer (MoE layers: {moe})")
        if not self.enabled:
            return  # one tier is plain top-K routing: every Megatron MoE option works unchanged
        balancing = getattr(c, "moe_router_load_balancing_type", "aux_loss")
        balancing = list(balancing) if isinstance(balancing, (list, tuple)) else [balancing]
        refusals = [
            (
                getattr(c, "moe_expert_capacity_factor", None) is not None,
                "--moe-expert-capacity-factor (token dropping) would drop tokens by the load of all paths; "
                "OrdMoE needs dropless routing: remove the flag",
            ),
            (
                getattr(c, "moe_input_jitter_eps", None) is not None
                and (self.path_schedule == "sequential" or self.lower_path_fraction < 1),
                "--moe-input-jitter-eps needs every path of a token to see the same jitter, which only the fused "
                "schedule on all sequences gives: use --ordmoe-path-schedule fused and --ordmoe-lower-path-fraction "
                "1, or no input jitter",
            ),
            (
                bool({"sinkhorn", "quantile_balancing"} & set(balancing)),
                f"--moe-router-load-balancing-type={'/'.join(balancing)} is not supported with OrdMoE (it picks "
                "experts by its own rule, which lower tiers cannot follow): use aux_loss, seq_aux_loss, "
                "global_aux_loss or none",
            ),
            (
                getattr(c, "moe_router_force_biased", None) is not None,
                "--moe-router-force-biased (biased random routing for benchmarks) is not supported with OrdMoE: "
                "remove it",
            ),
            (
                self.path_schedule == "sequential" and getattr(c, "recompute_granularity", None) is not None,
                "--recompute-granularity with --ordmoe-path-schedule sequential would recompute a path with the "
                "next path's tiers: use the fused schedule, or no recompute (sequential keeps the plain activation "
                "memory)",
            ),
            (
                getattr(c, "transformer_impl", None) == "inference_optimized",
                "--transformer-impl inference_optimized swaps the MoE dispatcher at every forward; OrdMoE trains "
                "with the local or transformer_engine implementation",
            ),
            (
                bool(getattr(c, "overlap_moe_expert_parallel_comm", False)),
                "--overlap-moe-expert-parallel-comm (overlap_moe_expert_parallel_comm) builds a schedule plan that "
                "bypasses the OrdMoE paths: remove it",
            ),
            (
                bool(getattr(c, "tp_comm_overlap", False)),
                "--tp-comm-overlap (tp_comm_overlap) sizes Transformer Engine's buffers for seq x micro-batch, not "
                "the stacked or sub-sampled OrdMoE paths: remove it",
            ),
            (
                bool(getattr(c, "enable_cuda_graph", False) or getattr(c, "external_cuda_graph", False))
                or getattr(c, "cuda_graph_impl", "none") not in ("none", None),
                "CUDA graphs (--cuda-graph-impl, --enable-cuda-graph) skip the module hooks the paths need and "
                "replay one path state for every micro-batch: remove them with OrdMoE",
            ),
            (
                bool(getattr(c, "moe_enable_routing_replay", False)),
                "--moe-enable-routing-replay replays recorded top-K choices and cannot replay tiers: remove it",
            ),
            (
                bool(getattr(c, "mtp_num_layers", None))
                and getattr(c, "pipeline_model_parallel_layout", None) is not None,
                "--mtp-num-layers with --pipeline-model-parallel-layout may put the MTP block on a stage before "
                "the last, where OrdMoE cannot keep it to path 1: drop the layout (MTP then sits on the last stage)",
            ),
            (
                getattr(c, "moe_token_dispatcher_type", "alltoall") == "flex",
                "--moe-token-dispatcher-type=flex (DeepEP/HybridEP) is not supported with OrdMoE: use alltoall or "
                "allgather",
            ),
            (
                getattr(c, "context_parallel_size", 1) > 1,
                "--context-parallel-size > 1 is not supported with OrdMoE (paths are stacked on the batch dimension "
                "and "
                "the per-sequence log-likelihood would need a context-parallel reduction): use 1",
            ),
        ]
        for refused, message in refusals:
            if refused:
                raise OrdMoEError(message)
