"""Expert tiers: which routing ranks form each tier, and per-token tier selection.

Plain PyTorch, no Megatron import (method page §1 and §2). Ranks are 1-based positions in a
token's ranked list: the experts the model's own top-K selects for it first (so tier 1, ranks
1..K, is exactly the standard top-K forward, group limits and ties included), then every other
expert by the score the router ranks with, ties to the lower expert index (``ranked_keys``). No
lower tier can share an expert with path 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.method.ranges import format_ranges, parse_ranges


def _spread(n: int, k: int, c: int) -> list[list[int]]:
    """The ranked list cut into ``B = n // K`` blocks, the tiers spread evenly over them, the
    last tier the bottom K ranks (the paper's)."""
    if c == 1:
        return [list(range(1, k + 1))]
    blocks = n // k
    starts = [(j * (blocks - 1) // (c - 1)) * k + 1 for j in range(c - 1)] + [n - k + 1]
    return [list(range(s, s + k)) for s in starts]


def _consecutive(n: int, k: int, c: int) -> list[list[int]]:
    """Consecutive blocks of K ranks from the top."""
    return [list(range(j * k + 1, (j + 1) * k + 1)) for j in range(c)]


@dataclass(frozen=True)
class Grouping:
    """A way to cut the tiers from each token's ranked experts (``--ordmoe-grouping``)."""

    # (n, K, C) -> the tier ranks; None: they come from --ordmoe-tier-ranks
    ranks: Optional[Callable[[int, int, int], list[list[int]]]]
    shuffled: bool = False  # the experts after the token's own top-K are ranked in a random order


# The groupings: the one table ``OrdMoEConfig`` validates against (its ``Literal``), ``tier_ranks``
# cuts the tiers by and the tier router asks whether to shuffle.
GROUPINGS: dict[str, Grouping] = {
    "uniform": Grouping(_spread),
    "high-only": Grouping(_consecutive),
    "random": Grouping(_spread, shuffled=True),  # uniform's positions on a shuffled order
    "explicit": Grouping(None),
}
# The router score functions the tier router implements, besides softmax (normalised over the
# experts, handled apart): each maps fp32 logits to independent scores. Which of them a run may
# use is megatron-core's list (``runtime.compat.SCORE_FUNCTIONS``); this is the math.
_INDEPENDENT_SCORES = {
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt(),
}
SCORE_FUNCTIONS = ("softmax", *_INDEPENDENT_SCORES)


def parse_rank_spec(spec: str) -> list[list[int]]:
    """Parse an explicit tier layout such as ``"1-6,25-27,59-61"``.

    Commas separate tiers; each tier is a range ``a-b`` or a single rank ``a``; ``+`` joins
    several ranges into one tier (``"1-6,20-22+40-42"``).
    """
    return [parse_ranges(tier, "--ordmoe-tier-ranks", "1-6,25-27,59-61", sep="+") for tier in spec.split(",")]


def tier_ranks(
    num_experts: int,
    topk: int,
    num_tiers: int,
    grouping: str = "uniform",
    ranks: Optional[str | Sequence[Sequence[int]]] = None,
) -> list[list[int]]:
    """The 1-based routing ranks of each tier.

    ``uniform`` (and ``random``, which uses the same positions on a shuffled order) cuts the
    ranked list into ``B = n // K`` blocks and spreads the tiers evenly over them, the last tier
    being the bottom K ranks; ``high-only`` takes consecutive blocks from the top; ``explicit``
    takes the layout from ``ranks``. Raises ``OrdMoEError`` naming the flag on a bad layout.
    """
    n, k, c = num_experts, topk, num_tiers
    if k < 1 or n < 1 or k > n:
        raise OrdMoEError(f"--moe-router-topk={k} must be between 1 and --num-experts={n}")
    if c < 1:
        raise OrdMoEError(f"--ordmoe-num-tiers={c} must be at least 1 (1 is plain top-K training)")
    if grouping not in GROUPINGS:
        raise OrdMoEError(f"--ordmoe-grouping='{grouping}' is not one of {', '.join(GROUPINGS)}")
    if GROUPINGS[grouping].ranks is None:
        if ranks is None:
            raise OrdMoEError("--ordmoe-grouping=explicit needs --ordmoe-tier-ranks, e.g. '1-6,25-27,59-61'")
        tiers = parse_rank_spec(ranks) if isinstance(ranks, str) else [list(t) for t in ranks]
        _check_explicit(tiers, n, k, c)
        return tiers
    if ranks is not None:
        raise OrdMoEError(f"--ordmoe-tier-ranks is only used with --ordmoe-grouping=explicit, not '{grouping}'")
    if c * k > n:
        raise OrdMoEError(
            f"--ordmoe-num-tiers={c} needs {c}x{k}={c * k} experts but the layer has {n}: "
            f"use at most {n // k} tiers with top-{k}, or --ordmoe-grouping=explicit with smaller tiers"
        )
    return GROUPINGS[grouping].ranks(n, k, c)


def _check_explicit(tiers: list[list[int]], n: int, k: int, c: int) -> None:
    if len(tiers) != c:
        raise OrdMoEError(f"--ordmoe-tier-ranks lists {len(tiers)} tiers but --ordmoe-num-tiers={c}; make them agree")
    if tiers[0] != list(range(1, k + 1)):
        raise OrdMoEError(
            f"--ordmoe-tier-ranks: tier 1 must be ranks 1-{k} (the standard top-{k}), "
            f"got {format_ranges(tiers[0], sep='+')}"
        )
    seen: set[int] = set()
    for j, tier in enumerate(tiers, start=1):
        if not tier:
            raise OrdMoEError(f"--ordmoe-tier-ranks: tier {j} is empty")
        bad = [r for r in tier if r < 1 or r > n]
        if bad:
            raise OrdMoEError(
                f"--ordmoe-tier-ranks: tier {j} has ranks {bad} outside 1-{n} (the layer has {n} experts)"
            )
        overlap = seen.intersection(tier)
        if overlap or len(set(tier)) != len(tier):
            raise OrdMoEError(
                f"--ordmoe-tier-ranks: tier {j} repeats ranks {sorted(overlap) or tier}; tiers must not overlap"
            )
        seen.update(tier)


def format_tiers(tiers: Sequence[Sequence[int]]) -> str:
    """``[[1..6], [25..30]]`` -> ``'1-6, 25-30'`` (a tier of several ranges joins them with '+')."""
    return ", ".join(format_ranges(t, sep="+") for t in tiers)


def ranked_keys(ranking_scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sort keys of each token's ranked list (method page §1): ``[tokens, n]`` int64, larger is
    better, unique within a row but for the selected experts.

    ``selected`` (bool ``[tokens, n]``) marks the experts path 1's own top-K picked for the token
    (group limits, expert bias and all): they come first, whatever their scores. Every other
    expert follows by ``ranking_scores`` (``[tokens, n]``, or one layer-wide ``[n]``), ties going
    to the lower expert index. So tier 1 is exactly path 1's selection and no lower tier can share
    an expert with it, whatever the ties or the group limits.
    """
    return _score_keys(ranking_scores, selected.shape[-1], selected)


def _score_keys(scores: torch.Tensor, n: int, selected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 keys in the order (``selected`` first, then score descending, then expert index
    ascending), unique within a row but for the selected experts."""
    reverse_index = torch.arange(n - 1, -1, -1, device=scores.device)
    if scores.dtype == torch.float64:  # no room for the index next to 64 bits: rank positions
        if selected is not None:
            scores = torch.where(selected, torch.inf, scores)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return torch.empty_like(order).scatter_(-1, order, reverse_index.expand_as(order))
    # fp32 (bf16 and fp16 widen exactly): an IEEE float's bits as a signed integer, negative
    # numbers' magnitude negated, are in the float's order (-0.0 and +0.0 both become 0).
    bits = scores.float().contiguous().view(torch.int32)
    sign = bits >> 31
    ordered = bits & 0x7FFFFFFF  # a new tensor: the steps below work in place
    ordered ^= sign
    ordered -= sign
    if selected is not None:  # above every float, NaN aside
        if ordered.shape != selected.shape:
            ordered = ordered.expand(selected.shape).clone()
        ordered.masked_fill_(selected, 2**31 - 1)
    return torch.add(reverse_index, ordered, alpha=n)  # int64: the score, then the index


def rank_order(ranking_scores: torch.Tensor, selected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each token's whole ranked list, best first (``[tokens, n]``; ``[n]`` for a layer-wide
    ranking without ``selected``): ``selected`` first (see ``ranked_keys``), then by score, ties
    to the lower expert index. A full sort: the definition ``tier_experts`` selects from.
    """
    if selected is None:
        keys = _score_keys(ranking_scores, ranking_scores.shape[-1])
    else:
        keys = ranked_keys(ranking_scores, selected)
    return torch.sort(keys, dim=-1, descending=True).indices


def tier_experts(keys: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """The experts at the 1-based ``ranks`` of each token's ranked list, ``[..., len(ranks)]`` in
    no particular order; ``keys`` from ``ranked_keys`` (``[..., n]``, any leading shape).

    Selects instead of sorting all ``n`` experts: a block of ranks ``a..b`` is the ``b - a + 1``
    worst of the best ``b`` keys (or the best of the worst ``n - a + 1``, whichever is fewer), two
    unsorted top-k selections; ranks in several blocks (an explicit tier ``20-22+40-42``) come
    from one sorted top-k, sliced block by block (no index tensor, so no host-to-device copy).
    """
    n = keys.shape[-1]
    positions = sorted(r - 1 for r in ranks)
    low, high, width = positions[0], positions[-1], len(positions)
    from_top = high + 1 <= n - low
    if high - low + 1 == width:
        if from_top:
            values, experts = keys.topk(high + 1, dim=-1, sorted=False)
            if high + 1 == width:
                return experts
            pick = values.topk(width, dim=-1, largest=False, sorted=False).indices
        else:
            values, experts = keys.topk(n - low, dim=-1, largest=False, sorted=False)
            if n - low == width:
                return experts
            pick = values.topk(width, dim=-1, sorted=False).indices
        return experts.gather(-1, pick)
    blocks = _blocks(positions)
    if from_top:
        best = keys.topk(high + 1, dim=-1, sorted=True).indices
        return torch.cat([best[..., a : b + 1] for a, b in blocks], dim=-1)
    worst = keys.topk(n - low, dim=-1, largest=False, sorted=True).indices  # rank p at n-1-p
    return torch.cat([worst[..., n - 1 - b : n - a] for a, b in blocks], dim=-1)


def _blocks(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> runs of consecutive positions, ``[(first, last), ...]``."""
    blocks = [[positions[0], positions[0]]]
    for p in positions[1:]:
        if p == blocks[-1][1] + 1:
            blocks[-1][1] = p
        else:
            blocks.append([p, p])
    return [(a, b) for a, b in blocks]


def _scores(logits: torch.Tensor, score_function: str, fp32_scores: bool) -> torch.Tensor:
    """sigmoid or sqrtsoftplus scores, computed in fp32 (and kept there with ``fp32_scores``)."""
    if score_function not in _INDEPENDENT_SCORES:
        raise OrdMoEError(
            f"--moe-router-score-function='{score_function}' is not one the tier router implements: "
            f"use one of {', '.join(SCORE_FUNCTIONS)}"
        )
    scores = _INDEPENDENT_SCORES[score_function](logits.float())
    return scores if fp32_scores else scores.type_as(logits)


def routing_scores(logits: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The routing scores ``s_t = score_fn(rho_t)`` over all experts, in fp32 (method page §1):
    softmax over the experts, or the sigmoid / sqrtsoftplus scores."""
    if score_function == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    return _scores(logits, score_function, fp32_scores=True)


def ranking_scores(
    logits: torch.Tensor,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    expert_bias: Optional[torch.Tensor] = None,
    fp32_scores: bool = False,
) -> torch.Tensor:
    """The quantity the model's own top-K selection ranks experts by.

    softmax: the logits (softmax is monotone), or the softmax scores with pre-softmax routing;
    sigmoid and sqrtsoftplus: the scores, plus the expert bias when the model balances load with
    one. ``fp32_scores``: the scores stay in fp32, as Megatron's top-K keeps them from
    megatron-core 0.18 on; before, they were cast to the logits' dtype first.
    """
    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            return scores if fp32_scores else scores.type_as(logits)
        return logits
    scores = _scores(logits, score_function, fp32_scores)
    if expert_bias is None:
        return scores
    return scores + (expert_bias.float() if fp32_scores else expert_bias)


def tier_gating(
    logits: torch.Tensor,
    experts: torch.Tensor,
    topk: int,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    scaling_factor: Optional[float] = None,
    fp32_scores: bool = False,
) -> torch.Tensor:
    """Gating weights of the selected ``experts`` ([tokens, k]) under the model's own rule.

    softmax (Eq. 3 restricted to the tier): softmax of the tier's logits; pre-softmax: the
    softmax over all experts, gathered; sigmoid and sqrtsoftplus: the tier's scores, normalised
    over the tier when the model routes to more than one expert. The top-K scaling factor
    multiplies. ``fp32_scores``: every step in fp32 and one cast at the end (megatron-core 0.18
    on); otherwise each score is cast to the logits' dtype as it is made.
    """
    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            probs = (scores if fp32_scores else scores.type_as(logits)).gather(1, experts)
        else:
            probs = torch.softmax(logits.gather(1, experts), dim=-1, dtype=torch.float32)
            probs = probs if fp32_scores else probs.type_as(logits)
    else:  # (scores are elementwise: gathered first)
        probs = _scores(logits.gather(1, experts), score_function, fp32_scores)
        if topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor:
        probs = probs * scaling_factor
    return probs.type_as(logits)


def select_tier(
    logits: torch.Tensor,
    ranks: Sequence[int],
    topk: int,
    selected: torch.Tensor,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    scaling_factor: Optional[float] = None,
    expert_bias: Optional[torch.Tensor] = None,
    order_scores: Optional[torch.Tensor] = None,
    fp32_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route every token to the experts at ``ranks`` of its own ranked list (method page §1).

    ``logits`` is ``[tokens, n]``; ``selected`` (bool ``[tokens, n]``) the experts the model's own
    top-K picked for each token, which head its list. ``order_scores`` ranks the other experts
    where it is not the token's own ranking scores: a layer-wide ``[n]`` (average ranking) or
    ``[tokens, n]`` random keys (random grouping). Returns dense ``probs`` and boolean
    ``routing_map``, both ``[tokens, n]``, as Megatron's routers do.
    """
    if order_scores is None:
        order_scores = ranking_scores(logits, score_function, use_pre_softmax, expert_bias, fp32_scores)
    experts = tier_experts(ranked_keys(order_scores, selected), ranks)
    return route_to_experts(logits, experts, topk, score_function, use_pre_softmax, scaling_factor, fp32_scores)


def route_to_experts(
    logits: torch.Tensor,
    experts: torch.Tensor,
    topk: int,
    score_function: str = "softmax",
    use_pre_softmax: bool = False,
    scaling_factor: Optional[float] = None,
    fp32_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``probs`` and boolean ``routing_map`` (``[tokens, n]``) of routing each token to its
    ``experts`` (``[tokens, w]``) with ``tier_gating``'s weights."""
    probs = tier_gating(logits, experts, topk, score_function, use_pre_softmax, scaling_factor, fp32_scores)
    dense_probs = torch.zeros_like(logits).scatter(1, experts, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, experts, True)
    return dense_probs, routing_map
