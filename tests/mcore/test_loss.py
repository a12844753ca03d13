"""The OrdMoE loss in Megatron's loss-function convention, and the report reduction."""
import pytest
import torch

from ordmoe_megatron import OrdMoEConfig, expert_rank_loss, sequence_logprobs
from ordmoe_megatron.mcore.loss import ordmoe_loss, reduce_reports


def _loss_inputs(paths=3, batch=2, seq=4):
    torch.manual_seed(0)
    nll = torch.rand(paths * batch, seq, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    return nll, mask


def test_lm_loss_uses_path_one_only():
    nll, mask = _loss_inputs()
    cfg = OrdMoEConfig(num_tiers=3)
    loss, num_tokens, report = ordmoe_loss(mask, nll, ordmoe=cfg, num_paths=3, vocab_size=100)
    assert num_tokens.item() == 4
    expected_lm = (nll.view(3, 2, 4)[0] * mask).sum()
    assert report["lm loss"][0].item() == pytest.approx(expected_lm.item())
    assert report["lm loss"][1].item() == 4
    # With the rank loss switched off, the gradient reaches path 1's tokens only.
    off = OrdMoEConfig(num_tiers=3, rank_loss_coeff=0.0)
    loss_off, _, _ = ordmoe_loss(mask, nll, ordmoe=off, num_paths=3, vocab_size=100)
    (grad,) = torch.autograd.grad(loss_off, nll)
    assert (grad.view(3, 2, 4)[1:] == 0).all() and (grad.view(3, 2, 4)[0] == mask).all()


def test_loss_function_adds_the_rank_term_in_both_normalisations():
    nll, mask = _loss_inputs()
    cfg = OrdMoEConfig(num_tiers=3, rank_loss_coeff=0.7)
    lp = sequence_logprobs(nll.view(3, 2, 4), mask)
    per_seq = expert_rank_loss(lp, cfg.rewards, reduction="none")
    lm = (nll.view(3, 2, 4)[0] * mask).sum()

    loss, n, report = ordmoe_loss(mask, nll, ordmoe=cfg, num_paths=3, vocab_size=100)
    # Megatron divides by n: lm mean + 0.7 * mean over sequences of the rank loss.
    assert (loss / n).item() == pytest.approx((lm / 4 + 0.7 * per_seq.mean()).item(), rel=1e-6)
    assert report["rank loss"].tolist() == pytest.approx([per_seq.sum().item(), 2.0])
    assert report["path1 logprob"][0].item() == pytest.approx(lp[0].sum().item())

    loss_pt, n_pt, _ = ordmoe_loss(mask, nll, ordmoe=cfg, num_paths=3, vocab_size=100, per_token_loss=True)
    # Per-token: each sequence's rank loss weighs by its loss-token count (3 and 1).
    assert loss_pt.item() == pytest.approx((lm + 0.7 * (3 * per_seq[0] + per_seq[1])).item(), rel=1e-6)


def test_single_path_is_the_plain_megatron_loss():
    nll = torch.rand(2, 4)
    mask = torch.ones(2, 4)
    loss, n, report = ordmoe_loss(mask, nll, ordmoe=OrdMoEConfig(num_tiers=1), num_paths=1, vocab_size=10)
    assert loss.item() == pytest.approx(nll.sum().item()) and set(report) == {"lm loss"}


def test_reduce_reports_sums_pairs_before_dividing():
    reports = [{"x": torch.tensor([3.0, 1.0])}, {"x": torch.tensor([1.0, 3.0])}]
    assert reduce_reports(reports) == {"x": 1.0}
