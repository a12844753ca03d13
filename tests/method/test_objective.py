"""Advantages, the expert rank loss and the per-path log-likelihoods (method page §3)."""
import math

import pytest
import torch

from ordmoe_megatron import (
    default_rewards,
    expert_rank_loss,
    rank_advantages,
    sequence_logprobs,
    tier_order_correct,
)


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
