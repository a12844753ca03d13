"""Tier layouts (method page §1) and per-token tier selection (§2), plain PyTorch."""

import pytest
import torch

from ordmoe_megatron import parse_rank_spec, rank_order, select_tier, tier_gating, tier_ranks
from ordmoe_megatron.method import ranked_keys, tier_experts


def _ranges(tiers):
    return [(t[0], t[-1]) for t in tiers]


@pytest.mark.parametrize(
    "n,k,c,expected",
    [
        (64, 6, 1, [(1, 6)]),
        (64, 6, 2, [(1, 6), (59, 64)]),
        (64, 6, 3, [(1, 6), (25, 30), (59, 64)]),
        (64, 6, 4, [(1, 6), (19, 24), (37, 42), (59, 64)]),
        (256, 8, 3, [(1, 8), (121, 128), (249, 256)]),
    ],
)
def test_uniform_table_of_the_method_page(n, k, c, expected):
    tiers = tier_ranks(n, k, c)
    assert _ranges(tiers) == expected
    assert all(t == list(range(t[0], t[0] + k)) for t in tiers)


def test_high_only_and_random_positions():
    assert _ranges(tier_ranks(64, 6, 3, "high-only")) == [(1, 6), (7, 12), (13, 18)]
    assert tier_ranks(64, 6, 3, "random") == tier_ranks(64, 6, 3, "uniform")


def test_explicit_and_uneven_layouts():
    tiers = tier_ranks(64, 6, 3, "explicit", "1-6,25-27,59-61")
    assert tiers == [list(range(1, 7)), [25, 26, 27], [59, 60, 61]]
    assert parse_rank_spec("1-2,5+9-10,7") == [[1, 2], [5, 9, 10], [7]]
    assert tier_ranks(8, 2, 2, "explicit", [[1, 2], [8]]) == [[1, 2], [8]]


def test_uniform_with_experts_not_a_multiple_of_topk():
    # n=10, K=3: blocks of 3 ranks; the last tier is still the bottom K ranks.
    assert _ranges(tier_ranks(10, 3, 3)) == [(1, 3), (4, 6), (8, 10)]


@pytest.mark.parametrize(
    "args,match",
    [
        ((64, 6, 0), "at least 1"),
        ((64, 6, 11), "needs 11x6=66 experts"),
        ((64, 6, 3, "bogus"), "not one of"),
        ((64, 6, 3, "explicit", "2-7,25-30,59-64"), "tier 1 must be ranks 1-6"),
        ((64, 6, 3, "explicit", "1-6,5-9,59-64"), "repeats ranks"),
        ((64, 6, 3, "explicit", "1-6,25-30,60-65"), "outside 1-64"),
        ((64, 6, 3, "explicit", "1-6,25-30"), "lists 2 tiers"),
        ((64, 6, 3, "explicit", "1-6,x,59-64"), "cannot read"),
        ((64, 6, 3, "explicit", None), "needs --ordmoe-tier-ranks"),
        ((64, 6, 3, "uniform", "1-6,25-30,59-64"), "only used with --ordmoe-grouping=explicit"),
        ((4, 6, 1), "between 1 and"),
    ],
)
def test_impossible_layouts_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        tier_ranks(*args)


def test_rank_order_breaks_ties_towards_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert rank_order(scores).tolist() == [[1, 3, 0, 2, 4]]


def _top_k_mask(scores, k):
    """A plain top-K selection as a mask (ties to the lower index)."""
    order = sorted(range(scores.shape[-1]), key=lambda e: (-scores[e].item(), e))
    return torch.zeros(scores.shape[-1], dtype=torch.bool).index_fill(0, torch.tensor(order[:k]), True)


def test_select_tier_uses_each_token_own_ranking():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]])
    selected = torch.stack([_top_k_mask(row, 2) for row in logits])
    probs, routing_map = select_tier(logits, [5, 6], 2, selected)
    assert routing_map[0].nonzero().flatten().tolist() == [4, 5]
    assert routing_map[1].nonzero().flatten().tolist() == [0, 1]
    # Eq. 3 restricted to the tier: softmax over the tier's own logits.
    expected = torch.softmax(torch.tensor([0.0, -1.0]), 0)
    assert torch.allclose(probs[0, [4, 5]], expected)
    assert torch.allclose(probs[1, [1, 0]], expected)
    assert probs.sum(1).allclose(torch.ones(2)) and (probs[~routing_map] == 0).all()


def _reference_ranked_list(scores, selected):
    """Method page §1 as a plain loop: the selected experts (in score order), then every other
    expert by score, ties to the lower index."""
    n = len(scores)
    by_score = lambda e: (-scores[e], e)  # noqa: E731
    chosen = sorted((e for e in range(n) if selected[e]), key=by_score)
    return chosen + sorted((e for e in range(n) if not selected[e]), key=by_score)


LAYOUTS = {
    "uniform": tier_ranks(16, 2, 3),
    "uniform-4": tier_ranks(16, 2, 4),
    "high-only": tier_ranks(16, 2, 3, "high-only"),
    "explicit-uneven": tier_ranks(16, 2, 3, "explicit", "1-2,4,6-8"),
    "explicit-scattered": tier_ranks(16, 2, 3, "explicit", "1-2,5+9-10,16"),
    "explicit-bottom-heavy": tier_ranks(16, 2, 3, "explicit", "1-2,3-13,14-16"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("selection", ["top-k", "not-top-k"])
def test_tiers_are_cut_from_the_ranked_list_of_the_method_page(dtype, selection):
    """Every layout against the plain loop, with tied scores (duplicated experts, bf16 rounding,
    -0.0 against 0.0) and with selections that are not the top K by score (group-limited
    routing picks them so): tier 1 is exactly the selection, no other tier touches it."""
    g = torch.Generator().manual_seed(0)
    tokens, n, k = 64, 16, 2
    scores = (torch.randn(tokens, n, generator=g) * 0.3).to(dtype)
    scores[:, 8:12] = scores[:, 0:4]  # exact ties, at every rank
    scores[:, 12] = -0.0
    scores[:, 13] = 0.0
    if selection == "top-k":
        selected = torch.stack([_top_k_mask(row, k) for row in scores])
    else:
        picks = torch.rand(tokens, n, generator=g).topk(k, dim=-1).indices
        selected = torch.zeros(tokens, n, dtype=torch.bool).scatter(1, picks, True)
    keys = ranked_keys(scores, selected)
    order = rank_order(scores, selected)
    for name, tiers in LAYOUTS.items():
        chosen = [tier_experts(keys, ranks) for ranks in tiers]
        for t in range(tokens):
            expected = _reference_ranked_list(scores[t].tolist(), selected[t].tolist())
            assert set(order[t, :k].tolist()) == set(expected[:k]) and order[t, k:].tolist() == expected[k:]
            for ranks, experts in zip(tiers, chosen):
                assert sorted(experts[t].tolist()) == sorted(expected[r - 1] for r in ranks), (name, ranks, t)
        assert torch.equal(torch.zeros_like(selected).scatter(1, chosen[0], True), selected), name
        for experts in chosen[1:]:
            assert not selected.gather(1, experts).any(), name


def test_tier_experts_take_any_leading_shape():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 4, 16, generator=g)
    selected = torch.zeros(3, 4, 16, dtype=torch.bool)
    selected[..., :2] = True
    keys = ranked_keys(scores, selected)
    flat = tier_experts(keys.view(-1, 16), [7, 8])
    assert torch.equal(tier_experts(keys, [7, 8]).sort(-1).values.view(-1, 2), flat.sort(-1).values)


def test_gating_rules_of_other_score_functions():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    experts = torch.tensor([[2, 3]])
    pre = tier_gating(logits, experts, 2, use_pre_softmax=True)
    assert torch.allclose(pre, torch.softmax(logits, -1)[:, [2, 3]])
    sig = tier_gating(logits, experts, 2, score_function="sigmoid", scaling_factor=2.5)
    s = torch.sigmoid(torch.tensor([0.0, -1.0]))
    assert torch.allclose(sig, 2.5 * s / s.sum())
    single = tier_gating(logits, experts[:, :1], 1, score_function="sigmoid")
    assert torch.allclose(single, torch.sigmoid(torch.tensor([[0.0]])))


def test_sigmoid_ranking_adds_expert_bias():
    logits = torch.zeros(1, 4)
    bias = torch.tensor([0.0, 0.3, 0.2, 0.1])
    selected = torch.tensor([[True, False, False, False]])  # path 1's pick comes first regardless
    _, routing_map = select_tier(logits, [2], 1, selected, score_function="sigmoid", expert_bias=bias)
    assert routing_map[0].nonzero().flatten().tolist() == [1]


def test_layer_wide_order_ranks_the_experts_after_the_token_own_top_k():
    logits = torch.randn(5, 8)
    order_scores = torch.arange(8, 0, -1, dtype=torch.float64)  # layer order 0, 1, .., 7
    selected = torch.zeros(5, 8, dtype=torch.bool)
    selected[:, 2] = selected[:, 6] = True  # the tokens' own top-2
    _, routing_map = select_tier(logits, [3, 4], 2, selected, order_scores=order_scores)
    # ranked lists: 2, 6 (path 1), then 0, 1, 3, 4, 5, 7 by the layer order: ranks 3-4 are 0, 1
    assert (routing_map.nonzero()[:, 1].view(5, 2) == torch.tensor([0, 1])).all()
