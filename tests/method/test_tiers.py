"""Tier layouts (method page §1) and per-token tier selection (§2), plain PyTorch."""

import pytest
import torch

from ordmoe_megatron import parse_rank_spec, rank_order, select_tier, tier_gating, tier_ranks


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


def test_select_tier_uses_each_token_own_ranking():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]])
    probs, routing_map = select_tier(logits, [5, 6], topk=2)
    assert routing_map[0].nonzero().flatten().tolist() == [4, 5]
    assert routing_map[1].nonzero().flatten().tolist() == [0, 1]
    # Eq. 3 restricted to the tier: softmax over the tier's own logits.
    expected = torch.softmax(torch.tensor([0.0, -1.0]), 0)
    assert torch.allclose(probs[0, [4, 5]], expected)
    assert torch.allclose(probs[1, [1, 0]], expected)
    assert probs.sum(1).allclose(torch.ones(2)) and (probs[~routing_map] == 0).all()


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
    _, routing_map = select_tier(logits, [1], topk=1, score_function="sigmoid", expert_bias=bias)
    assert routing_map[0].nonzero().flatten().tolist() == [1]


def test_layer_wide_order_gives_every_token_the_same_experts():
    logits = torch.randn(5, 8)
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    _, routing_map = select_tier(logits, [3, 4], topk=2, order=order)
    assert (routing_map.nonzero()[:, 1].view(5, 2) == torch.tensor([4, 5])).all()
