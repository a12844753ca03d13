"""The OrdMoE schedules: fused and sequential paths through Megatron's own schedule, sub-sampled
lower paths (unbiased, drawn per data-parallel rank), one process unless a test says otherwise.
The parallel layouts' versions are in tests/train/test_parallel_layouts.py."""

import itertools

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.mcore.loss import ordmoe_loss
from tests.support import (
    SCHEDULE_BATCH as BATCH,
)
from tests.support import (
    VOCAB,
    ordmoe_schedule_step,
    run_on_ranks,
    tiny_batches,
    tiny_model,
)


def _summed(reports):
    return {k: sum(r[k] for r in reports) for k in reports[0]}


@pytest.mark.parametrize(
    "objective,fraction,per_token",
    [
        ("advantage", 1.0, False),
        ("advantage", 1.0, True),
        ("advantage", 0.5, False),
        ("plackett-luce", 1.0, False),
        ("pairwise-logistic", 0.5, True),
    ],
)
def test_sequential_schedule_gives_the_fused_gradients_and_reports(
    megatron_single_process, objective, fraction, per_token
):
    model = tiny_model(
        OrdMoEConfig(num_tiers=3), moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True
    )
    batches = tiny_batches(2)
    kwargs = dict(num_tiers=3, objective=objective, lower_path_fraction=fraction)
    fused_reports, fused = ordmoe_schedule_step(model, OrdMoEConfig(**kwargs), batches, per_token)
    seq_reports, sequential = ordmoe_schedule_step(
        model, OrdMoEConfig(path_schedule="sequential", **kwargs), batches, per_token
    )
    assert len(seq_reports) == 3 * len(fused_reports)
    for key, value in _summed(fused_reports).items():
        torch.testing.assert_close(_summed(seq_reports)[key], value, rtol=1e-6, atol=1e-6)
    assert fused.keys() == sequential.keys()
    for name, grad in fused.items():
        torch.testing.assert_close(sequential[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())
    # The router's weights see the load-balancing loss: scaled for the sequential micro-batches.
    router = next(n for n in fused if n.endswith("router.weight"))
    assert fused[router].abs().max() > 0


def test_evaluation_runs_every_path_on_every_sequence(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3))
    batches = tiny_batches(2, seed=10)
    for objective in ("advantage", "plackett-luce"):  # (no pre-pass without a backward)
        with torch.no_grad():
            full, _ = ordmoe_schedule_step(
                model, OrdMoEConfig(num_tiers=3, objective=objective), batches, forward_only=True
            )
            sub, _ = ordmoe_schedule_step(
                model,
                OrdMoEConfig(num_tiers=3, objective=objective, lower_path_fraction=0.25),
                batches,
                forward_only=True,
            )
            seq, _ = ordmoe_schedule_step(
                model,
                OrdMoEConfig(num_tiers=3, objective=objective, path_schedule="sequential", lower_path_fraction=0.25),
                batches,
                forward_only=True,
            )
        for key, value in _summed(full).items():
            torch.testing.assert_close(_summed(sub)[key], value)
            torch.testing.assert_close(_summed(seq)[key], value, rtol=1e-6, atol=1e-6)


def test_sub_sampled_model_gradient_is_unbiased(megatron_single_process):
    """The model's gradient, averaged over every choice of 2 of 4 sequences for the lower paths,
    is the full gradient: rows never mix, and the loss scales the subset by b / m."""
    cfg = OrdMoEConfig(num_tiers=3, objective="pairwise-logistic", lower_path_fraction=0.5)
    model = tiny_model(cfg, moe_aux_loss_coeff=0.0)
    (b,) = tiny_batches(1, seed=20)

    def grads(rows):
        model.zero_grad(set_to_none=True)
        model.set_path_rows(rows)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        loss, _, _ = ordmoe_loss(b["loss_mask"], out, ordmoe=cfg, num_paths=3, vocab_size=VOCAB, lower_rows=rows)
        loss.backward()
        model.set_path_rows(None)
        return {n: p.grad.double() for n, p in model.named_parameters()}

    full = grads(None)
    subsets = [torch.tensor(s, device=b["tokens"].device) for s in itertools.combinations(range(BATCH), 2)]
    draws = [grads(rows) for rows in subsets]
    for name, grad in full.items():
        mean = sum(d[name] for d in draws) / len(draws)
        torch.testing.assert_close(mean, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.allclose(draws[0][name], full[name], rtol=1e-3)  # one draw is an estimate


def _draws(rank, world_size):
    from megatron.core import parallel_state

    from ordmoe_megatron.mcore.schedules import PathSchedule
    from ordmoe_megatron.runtime.distributed import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(tensor=2), seed=1)
    cfg = OrdMoEConfig(num_tiers=3, lower_path_fraction=0.25)
    rows = {}
    for step in (3, 4):
        schedule = PathSchedule(cfg, VOCAB, False, seed=11, step_fn=lambda step=step: step)
        draw = schedule._subset_drawer(16, cfg.lower_path_rows(16), torch.device("cpu"))
        rows[step] = [draw(k).tolist() for k in range(2)]
    again = PathSchedule(cfg, VOCAB, False, seed=11, step_fn=lambda: 3)._subset_drawer(16, 4, torch.device("cpu"))
    assert again(0).tolist() == rows[3][0]  # a resumed run draws what the first one did
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(), rows


def test_lower_path_draws_agree_across_tensor_parallel_ranks_and_differ_across_data_parallel_ranks():
    results = run_on_ranks(_draws, 4)
    by_dp = {}
    for _tp, dp, rows in results:
        by_dp.setdefault(dp, []).append(rows)
        for step in rows:
            for draw in rows[step]:
                assert len(draw) == 4 and draw == sorted(set(draw)) and all(0 <= r < 16 for r in draw)
    assert sorted(by_dp) == [0, 1]
    for peers in by_dp.values():
        assert len(peers) == 2 and peers[0] == peers[1]  # tensor-parallel peers: the same rows
    assert by_dp[0][0] != by_dp[1][0]  # data-parallel ranks: independent draws
    first = by_dp[0][0]
    assert first[3] != first[4] and first[3][0] != first[3][1]  # new rows per step and micro-batch
