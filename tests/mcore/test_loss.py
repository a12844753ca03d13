"""The OrdMoE loss in Megatron's loss-function convention (fused, per path, sub-sampled), and the
report reduction."""

import itertools

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig, expert_rank_loss, sequence_logprobs
from ordmoe_megatron.mcore.loss import MicroBatchPaths, ordmoe_loss, ordmoe_path_loss, reduce_reports


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


# --- the sequential schedule's per-path losses, and sub-sampled lower paths --------------------

OBJECTIVE_CONFIGS = {
    "advantage-floor": dict(logprob_floor=-1.0, rank_loss_coeff=0.7),
    "advantage-raw": dict(rewards=[2.0, 1.0, 0.0], advantage="raw"),
    "pairwise-logistic": dict(objective="pairwise-logistic", beta=2.0),
    "plackett-luce": dict(objective="plackett-luce", beta=0.5),
}


def _batch_of(batch=4, seq=5, paths=3, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lower = batch if rows is None else len(rows)
    nll = (torch.rand(batch + (paths - 1) * lower, seq, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).double()
    mask[0] = 0.0  # a sequence with no loss token counts nowhere
    return nll, mask


def _sequential_losses(mask, nll, cfg, per_token, rows, weight_logprobs=None):
    """Each path's loss on its rows of the fused output, summed as the schedule's scaling makes them."""
    batch, paths = mask.shape[0], cfg.num_tiers
    lower = batch if rows is None else len(rows)
    state = MicroBatchPaths(weight_logprobs=weight_logprobs)
    total, tokens, reports = 0.0, 0, []
    for j in range(paths):
        out = nll[:batch] if j == 0 else nll[batch + (j - 1) * lower : batch + j * lower]
        loss, n, report = ordmoe_path_loss(
            mask,
            out,
            path=j,
            paths_of_micro_batch=state,
            ordmoe=cfg,
            num_paths=paths,
            vocab_size=100,
            per_token_loss=per_token,
            lower_rows=rows,
        )
        total, tokens = total + loss, tokens + int(n)
        reports.append(report)
    return total, tokens, reports


@pytest.mark.parametrize("per_token", [False, True], ids=["per-micro-batch", "per-token"])
@pytest.mark.parametrize("sub_sampled", [False, True], ids=["all-rows", "rows-1-3"])
@pytest.mark.parametrize("name", sorted(OBJECTIVE_CONFIGS))
def test_sequential_path_losses_have_the_fused_gradient_and_report(name, sub_sampled, per_token):
    cfg = OrdMoEConfig(num_tiers=3, **OBJECTIVE_CONFIGS[name])
    rows = torch.tensor([1, 3]) if sub_sampled else None
    nll, mask = _batch_of(rows=rows)
    fused, fused_tokens, fused_report = ordmoe_loss(
        mask, nll, ordmoe=cfg, num_paths=3, vocab_size=100, per_token_loss=per_token, lower_rows=rows
    )
    (fused_grad,) = torch.autograd.grad(fused, nll)
    weights = None
    if not cfg.linear_objective:  # the schedule's forward-only pre-pass gives every path's values
        sub = mask if rows is None else mask[rows]
        top = nll[:4] if rows is None else nll[:4][rows]
        weights = sequence_logprobs(torch.cat([top, nll[4:]]).view(3, sub.shape[0], -1), sub).detach()
    total, tokens, reports = _sequential_losses(mask, nll, cfg, per_token, rows, weights)
    (grad,) = torch.autograd.grad(total, nll)
    torch.testing.assert_close(grad, fused_grad, rtol=1e-5, atol=1e-7)  # float32 losses
    # Megatron divides each micro-batch by its tokens, or the per-token sum by the tokens counted.
    assert tokens == (int(fused_tokens) if per_token else len(reports) * int(fused_tokens))
    assert all(r.keys() == fused_report.keys() for r in reports)  # Megatron-LM reduces every key
    summed = {k: sum(r[k] for r in reports) for k in fused_report}
    for k in fused_report:
        torch.testing.assert_close(summed[k], fused_report[k], rtol=1e-6, atol=1e-7)


def test_a_nonlinear_objective_needs_the_pre_pass_for_its_weights():
    cfg = OrdMoEConfig(num_tiers=3, objective="plackett-luce")
    nll, mask = _batch_of()
    with pytest.raises(RuntimeError, match="pre-pass"):
        ordmoe_path_loss(
            mask, nll[:4], path=0, paths_of_micro_batch=MicroBatchPaths(), ordmoe=cfg, num_paths=3, vocab_size=100
        )


@pytest.mark.parametrize("per_token", [False, True], ids=["per-micro-batch", "per-token"])
@pytest.mark.parametrize("name", sorted(OBJECTIVE_CONFIGS))
def test_sub_sampled_rank_loss_is_unbiased(name, per_token):
    """Over every subset of 2 of the 4 sequences (exactly the expectation of a uniform draw), the
    mean loss and the mean gradient are the full ones."""
    cfg = OrdMoEConfig(num_tiers=3, **OBJECTIVE_CONFIGS[name])
    full_nll, mask = _batch_of(seed=3)
    full, _, _ = ordmoe_loss(mask, full_nll, ordmoe=cfg, num_paths=3, vocab_size=100, per_token_loss=per_token)
    (full_grad,) = torch.autograd.grad(full, full_nll)
    subsets = list(itertools.combinations(range(4), 2))
    mean_loss, mean_grad = 0.0, torch.zeros_like(full_grad)
    for subset in subsets:
        rows = torch.tensor(subset)
        lower_rows = torch.cat([4 + j * 4 + rows for j in range(2)])  # the subset's rows of paths 2 and 3
        nll = torch.cat([full_nll[:4], full_nll[lower_rows]]).detach().requires_grad_(True)
        loss, _, _ = ordmoe_loss(
            mask, nll, ordmoe=cfg, num_paths=3, vocab_size=100, per_token_loss=per_token, lower_rows=rows
        )
        (grad,) = torch.autograd.grad(loss, nll)
        mean_loss += loss.item() / len(subsets)
        mean_grad[:4] += grad[:4] / len(subsets)
        mean_grad[lower_rows] += grad[4:] / len(subsets)
    # (the loss computes in float32, as Megatron's does)
    assert mean_loss == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(mean_grad, full_grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grad, torch.cat([full_grad[:4], full_grad[lower_rows]]))  # one draw is noisy
