"""Advantages, the expert rank loss, the preference objectives and the per-path log-likelihoods
(method page §3)."""

import math

import pytest
import torch

from ordmoe_megatron import default_rewards, expert_rank_loss, rank_advantages, sequence_logprobs, tier_order_correct
from ordmoe_megatron.method import pairwise_logistic_loss, plackett_luce_loss, rank_loss, rank_loss_weights


def test_zscore_advantages_of_the_paper_rewards():
    adv = rank_advantages([1.0, 0.5, 0.0])
    assert torch.allclose(adv, torch.tensor([1.2247, 0.0, -1.2247]), atol=1e-4)


def test_zscore_is_scale_invariant_and_the_other_modes_are_not():
    assert torch.allclose(rank_advantages([2, 1, 0]), rank_advantages([1, 0.5, 0]))
    assert torch.allclose(rank_advantages([2, 1, 0], "center"), torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(rank_advantages([0.5, 0.25, 0], "center"), torch.tensor([0.25, 0.0, -0.25]))
    assert torch.allclose(rank_advantages([2, 1, 0], "raw"), torch.tensor([2.0, 1.0, 0.0]))
    assert rank_advantages([1.0]).tolist() == [0.0]


def test_default_rewards():
    assert default_rewards(3) == [1.0, 0.5, 0.0]
    assert default_rewards(5) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_expert_rank_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -1.5], [-4.0, -6.0]])
    a = math.sqrt(1.5)  # z-score of [1, .5, 0] is [a, 0, -a]
    by_hand = -(a * (-1.0) + a * (4.0) + a * (-2.0) + a * (6.0)) / 2  # -(1/N) sum_i sum_j A_j L_ji
    assert expert_rank_loss(lp, [1.0, 0.5, 0.0]).item() == pytest.approx(by_hand, rel=1e-6)
    # raw rewards [2, 1, 0]: -(1/2) * ((2*-1 + 1*-3) + (2*-2 + 1*-1.5))
    assert expert_rank_loss(lp, [2, 1, 0], "raw").item() == pytest.approx(5.25)
    assert expert_rank_loss(lp, [2, 1, 0], "raw", reduction="none").tolist() == [5.0, 5.5]


def test_rank_loss_gradient_rewards_top_and_pushes_bottom():
    lp = torch.zeros(3, 4, requires_grad=True)
    expert_rank_loss(lp, [1.0, 0.5, 0.0]).backward()
    assert (lp.grad[0] < 0).all() and (lp.grad[1] == 0).all() and (lp.grad[2] > 0).all()


def test_floor_stops_the_push_down_but_keeps_the_value():
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-3.0, -9.0]], requires_grad=True)
    plain = expert_rank_loss(lp, [1.0, 0.5, 0.0])
    floored = expert_rank_loss(lp, [1.0, 0.5, 0.0], floor=-5.0)
    assert floored.item() == pytest.approx(plain.item())
    floored.backward()
    assert lp.grad[2, 1] == 0  # below the floor with a negative advantage: no more push-down
    assert lp.grad[2, 0] > 0 and lp.grad[0, 1] < 0


def test_sequence_logprobs_and_tier_order():
    nll = torch.tensor([[[1.0, 2.0, 9.0]], [[2.0, 2.0, 0.0]]])  # [C=2, N=1, S=3]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    lp = sequence_logprobs(nll, mask)
    assert lp.tolist() == [[-1.5], [-2.0]]
    assert tier_order_correct(lp).tolist() == [1.0]
    assert tier_order_correct(lp.flip(0)).tolist() == [0.0]
    assert sequence_logprobs(nll, torch.zeros(1, 3)).tolist() == [[0.0], [0.0]]


# --- the preference objectives on the tier paths (hand-computed values and gradients) ---------


def _softplus(x):
    return math.log1p(math.exp(x))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_pairwise_logistic_by_hand(beta):
    lp = torch.tensor([[-1.0], [-2.0], [-4.0]], dtype=torch.float64, requires_grad=True)
    m01, m02, m12 = beta * 1.0, beta * 3.0, beta * 2.0  # beta * (L_j - L_k) for the pairs j < k
    by_hand = (_softplus(-m01) + _softplus(-m02) + _softplus(-m12)) / 3  # -log sigmoid(m) = softplus(-m)
    loss = pairwise_logistic_loss(lp, beta)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    loss.backward()
    grad = [-(_sigmoid(-m01) + _sigmoid(-m02)), _sigmoid(-m01) - _sigmoid(-m12), _sigmoid(-m02) + _sigmoid(-m12)]
    assert lp.grad.flatten().tolist() == pytest.approx([beta * g / 3 for g in grad], rel=1e-12)


def test_pairwise_logistic_saturates_where_the_paper_objective_keeps_pushing():
    far_apart = torch.tensor([[-1.0], [-30.0], [-60.0]], requires_grad=True)
    pairwise_logistic_loss(far_apart).backward()
    assert far_apart.grad.abs().max() < 1e-10  # ordered by a wide margin: no more push
    again = far_apart.detach().clone().requires_grad_(True)
    expert_rank_loss(again, [1.0, 0.5, 0.0]).backward()
    assert again.grad[2].item() > 1.0  # the paper's objective pushes the bottom tier down for ever


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_plackett_luce_by_hand(beta):
    lp = torch.tensor([[-1.0], [-2.0], [-4.0]], dtype=torch.float64, requires_grad=True)
    s = [beta * v for v in (-1.0, -2.0, -4.0)]
    z3 = sum(math.exp(v) for v in s)
    z2 = math.exp(s[1]) + math.exp(s[2])
    by_hand = -((s[0] - math.log(z3)) + (s[1] - math.log(z2))) / 2  # two choices, averaged
    loss = plackett_luce_loss(lp, beta)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    loss.backward()
    p = [math.exp(v) / z3 for v in s]
    q1, q2 = math.exp(s[1]) / z2, math.exp(s[2]) / z2
    grad = [-(1 - p[0]) / 2, -(1 - p[1] - q1) / 2, (p[2] + q2) / 2]
    assert lp.grad.flatten().tolist() == pytest.approx([beta * g for g in grad], rel=1e-12)


def test_objectives_reduce_per_sequence_and_dispatch_by_name():
    lp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, fn in (("pairwise-logistic", pairwise_logistic_loss), ("plackett-luce", plackett_luce_loss)):
        per_seq = rank_loss(lp, name, beta=1.5, reduction="none")
        assert per_seq.shape == (5,)
        assert torch.allclose(per_seq, torch.stack([fn(lp[:, i : i + 1], 1.5) for i in range(5)]))
        assert rank_loss(lp, name, beta=1.5).item() == pytest.approx(per_seq.mean().item())
    assert torch.equal(
        rank_loss(lp, rewards=[1, 0.5, 0], reduction="none"), expert_rank_loss(lp, [1, 0.5, 0], reduction="none")
    )
    with pytest.raises(ValueError, match="--ordmoe-objective"):
        rank_loss(lp, "dpo")


@pytest.mark.parametrize(
    "objective,kwargs",
    [
        ("advantage", dict(rewards=[1.0, 0.5, 0.0], floor=-2.5)),
        ("advantage", dict(rewards=[2.0, 1.0, 0.0], mode="raw")),
        ("pairwise-logistic", dict(beta=2.0)),
        ("plackett-luce", dict(beta=0.7)),
    ],
)
def test_rank_loss_weights_are_the_per_path_gradient(objective, kwargs):
    lp = (torch.randn(3, 6, generator=torch.Generator().manual_seed(1)) - 2).requires_grad_(True)
    rank_loss(lp, objective, reduction="sum", **kwargs).backward()
    weights = rank_loss_weights(lp.detach(), objective, **kwargs)
    torch.testing.assert_close(weights, lp.grad, rtol=1e-6, atol=1e-7)
    # A path's share sum_i w_ji L_ji has that path's gradient: paths can run apart.
    for j in range(3):
        alone = lp.detach().clone().requires_grad_(True)
        (weights[j] * alone[j]).sum().backward()
        torch.testing.assert_close(alone.grad[j], lp.grad[j], rtol=1e-6, atol=1e-7)
