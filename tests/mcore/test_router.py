"""TierRouter against Megatron's TopKRouter, on one CPU process."""

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.runtime import compat
from ordmoe_megatron.runtime.distributed import device
from tests.support import moe_aux_loss_values, on_device, reset_moe_aux_losses

SEQ, BATCH, HIDDEN, EXPERTS, TOPK = 5, 3, 16, 12, 2

SCORE_CONFIGS = {
    "softmax": dict(),
    "pre-softmax": dict(moe_router_pre_softmax=True),
    "softmax-scaled": dict(moe_router_topk_scaling_factor=2.5),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid-expert-bias": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3
    ),
    "seq-aux-loss": dict(moe_router_load_balancing_type="seq_aux_loss"),
    "z-loss": dict(moe_z_loss_coeff=1e-3),
}


def _routers(extra, ordmoe=None, topk=TOPK):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ordmoe_megatron.mcore.router import TierRouter

    kwargs = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=topk,
        moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss",
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
    kwargs.update(extra)
    config = TransformerConfig(**kwargs)
    pgs = get_default_pg_collection()
    reference = TopKRouter(config=config, pg_collection=pgs)
    tier = TierRouter(config=config, pg_collection=pgs, ordmoe=ordmoe or OrdMoEConfig(num_tiers=3))
    tier.load_state_dict(reference.state_dict(), strict=False)  # average ranking adds buffers
    reference, tier = reference.to(device()), tier.to(device())
    for router in (reference, tier):
        router.set_layer_number(1)
        if router.expert_bias is not None:
            router.expert_bias.copy_(on_device(torch.linspace(-0.05, 0.05, EXPERTS)))
    tier.path_tiers = list(range(tier.ordmoe.num_tiers))
    return reference, tier


def _aux_values():
    return {k: v.clone() for k, v in moe_aux_loss_values().items()}


def _clear_tracker():
    reset_moe_aux_losses()


@pytest.mark.parametrize("name", sorted(SCORE_CONFIGS))
def test_path_one_is_bit_identical_to_topk_router(megatron_single_process, name):
    torch.manual_seed(0)
    reference, tier = _routers(SCORE_CONFIGS[name])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    path_one = lambda t: t.view(SEQ, 3, BATCH, EXPERTS)[:, 0].reshape(-1, EXPERTS)  # noqa: E731
    # Bit for bit where the gating GEMM sees the same shape (CPU kernels may round a row by its
    # position in the batch): TopKRouter on the same stacked input, path 1's rows.
    ref_probs, ref_map = (path_one(t) for t in reference(x))
    _clear_tracker()
    ref_aux = {k: v for k, v in (reference(x[:, :BATCH].contiguous()), _aux_values())[1].items()}
    _clear_tracker()
    probs, routing_map = tier(x)
    assert torch.equal(path_one(probs), ref_probs) and torch.equal(path_one(routing_map), ref_map)
    # The auxiliary losses see path 1 only: TopKRouter on path 1 alone gives them.
    aux = _aux_values()
    assert aux.keys() == ref_aux.keys()
    for k in aux:
        torch.testing.assert_close(aux[k], ref_aux[k], rtol=1e-5, atol=1e-7)
    if tier.local_tokens_per_expert is not None:  # expert-bias token counts see path 1 only
        assert torch.equal(tier.local_tokens_per_expert, ref_map.sum(0).to(tier.local_tokens_per_expert.dtype))


def _expected_tier(scores_row, ranks):
    order = sorted(range(len(scores_row)), key=lambda e: (-scores_row[e], e))
    return sorted(order[r - 1] for r in ranks)


@pytest.mark.parametrize("name", ["softmax", "pre-softmax", "sigmoid-expert-bias"])
def test_lower_paths_take_their_tier_from_their_own_scores(megatron_single_process, name):
    torch.manual_seed(1)
    _, tier = _routers(SCORE_CONFIGS[name])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    probs, routing_map = tier(x)
    logits = (x @ tier.weight.t()).view(SEQ, 3, BATCH, EXPERTS)
    probs = probs.view(SEQ, 3, BATCH, EXPERTS)
    routing_map = routing_map.view(SEQ, 3, BATCH, EXPERTS)
    cfg = tier.config
    for j, ranks in ((1, tier.tiers[1]), (2, tier.tiers[2])):
        for s in range(SEQ):
            for b in range(BATCH):
                row = logits[s, j, b]
                if cfg.moe_router_score_function == "sigmoid":
                    scores = (torch.sigmoid(row) + tier.expert_bias).tolist()
                elif cfg.moe_router_pre_softmax:
                    scores = torch.softmax(row, -1).tolist()
                else:
                    scores = row.tolist()
                experts = _expected_tier(scores, ranks)
                assert routing_map[s, j, b].nonzero().flatten().tolist() == experts
                chosen = row[experts]
                if cfg.moe_router_score_function == "sigmoid":
                    gates = torch.sigmoid(chosen) / torch.sigmoid(chosen).sum()
                elif cfg.moe_router_pre_softmax:
                    gates = torch.softmax(row, -1)[experts]
                else:
                    gates = torch.softmax(chosen, -1)  # Eq. 3 over the tier
                assert torch.allclose(probs[s, j, b, experts], gates, atol=1e-6)


def test_aux_loss_ignores_the_lower_paths(megatron_single_process):
    torch.manual_seed(2)
    _, tier = _routers(SCORE_CONFIGS["softmax"])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN)).requires_grad_()
    _clear_tracker()
    probs_a, _ = tier(x)
    aux_a = _aux_values()
    y = x.detach().clone()
    y[:, BATCH:] = on_device(torch.randn(SEQ, 2 * BATCH, HIDDEN)) * 3
    _clear_tracker()
    probs_b, _ = tier(y)
    aux_b = _aux_values()
    assert torch.equal(aux_a["load_balancing_loss"], aux_b["load_balancing_loss"])
    assert aux_a["load_balancing_loss"].sum() > 0
    # The aux-loss gradient reaches only path 1's inputs.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(on_device(torch.tensor(1.0)))
    (probs_a * 0).sum().backward()
    grad = x.grad.view(SEQ, 3, BATCH, HIDDEN)
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1:].abs().sum() == 0


def test_out_of_scope_layer_uses_top_k_on_every_path(megatron_single_process):
    torch.manual_seed(3)
    _, tier = _routers(SCORE_CONFIGS["softmax"], OrdMoEConfig(num_tiers=3, layer_scope="2"))
    x = on_device(torch.randn(SEQ, BATCH, HIDDEN).repeat(1, 3, 1))
    _, routing_map = tier(x)
    per_path = routing_map.view(SEQ, 3, BATCH, EXPERTS)
    assert torch.equal(per_path[:, 0], per_path[:, 1]) and torch.equal(per_path[:, 0], per_path[:, 2])


def test_average_ranking_uses_running_means_and_is_state(megatron_single_process):
    torch.manual_seed(4)
    _, tier = _routers(SCORE_CONFIGS["softmax"], OrdMoEConfig(num_tiers=3, ranking="average"))
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    _, routing_map = tier(x)
    logits = (x @ tier.weight.t()).view(SEQ, 3, BATCH, EXPERTS)
    mean = torch.softmax(logits[:, 0].reshape(-1, EXPERTS).double(), -1).mean(0)
    assert torch.allclose(tier.score_sum / tier.score_count, mean)
    order = sorted(range(EXPERTS), key=lambda e: (-mean[e].item(), e))
    per_path = routing_map.view(SEQ, 3, BATCH, EXPERTS)
    for j in (1, 2):
        expected = sorted(order[r - 1] for r in tier.tiers[j])
        assert all(per_path[s, j, b].nonzero().flatten().tolist() == expected for s in range(SEQ) for b in range(BATCH))
    assert {"score_sum", "score_count"} <= set(tier.state_dict())


def test_random_grouping_keeps_path_one_and_draws_lower_tiers(megatron_single_process):
    torch.manual_seed(5)
    reference, tier = _routers(SCORE_CONFIGS["softmax"], OrdMoEConfig(num_tiers=3, grouping="random"))
    x = on_device(torch.randn(SEQ, BATCH, HIDDEN).repeat(1, 3, 1))
    ref_probs, _ = reference(x)  # the same stacked input: the same gating GEMM
    probs, routing_map = tier(x)
    path_one = lambda t: t.view(SEQ, 3, BATCH, EXPERTS)[:, 0]  # noqa: E731
    assert torch.equal(path_one(probs), path_one(ref_probs))
    per_path = routing_map.view(SEQ, 3, BATCH, EXPERTS)
    assert (per_path.sum(-1) == TOPK).all()
    assert not torch.equal(per_path[:, 1], per_path[:, 2])  # random draws differ across paths


def test_sub_sampled_and_single_lower_paths_route_like_the_full_stack(megatron_single_process):
    """Paths 2..C on rows [0, 2] of the batch (the sub-sampled stack [b + 2m]), and each path alone
    (the sequential schedule), route those rows as the full stack does."""
    torch.manual_seed(6)
    _, tier = _routers(SCORE_CONFIGS["sigmoid-expert-bias"])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    full_probs, full_map = (t.view(SEQ, 3, BATCH, EXPERTS) for t in tier(x))
    rows = on_device(torch.tensor([0, 2]))
    per_path = x.view(SEQ, 3, BATCH, HIDDEN)
    stacked = torch.cat([per_path[:, 0], per_path[:, 1, rows], per_path[:, 2, rows]], dim=1)
    tier.lower_path_rows = 2
    probs, routing_map = (t.view(SEQ, BATCH + 4, EXPERTS) for t in tier(stacked))
    assert torch.equal(routing_map[:, :BATCH], full_map[:, 0])
    for j in (1, 2):
        got = slice(BATCH + 2 * (j - 1), BATCH + 2 * j)
        assert torch.equal(routing_map[:, got], full_map[:, j, rows])
        torch.testing.assert_close(probs[:, got], full_probs[:, j, rows], rtol=1e-5, atol=1e-6)
    tier.lower_path_rows = None
    for j in (1, 2):
        tier.path_tiers = [j]
        alone_probs, alone_map = tier(per_path[:, j].contiguous())
        assert torch.equal(alone_map.view(SEQ, BATCH, EXPERTS), full_map[:, j])
        torch.testing.assert_close(alone_probs.view(SEQ, BATCH, EXPERTS), full_probs[:, j], rtol=1e-5, atol=1e-6)


def test_tier_load_counts_per_tier(megatron_single_process):
    from ordmoe_megatron.mcore.metrics import tier_load_paused

    torch.manual_seed(7)
    _, tier = _routers(SCORE_CONFIGS["softmax"])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    _, full_map = tier(x)
    fused = tier.pop_tier_load()
    expected = full_map.view(SEQ, 3, BATCH, EXPERTS).sum((0, 2)).float()
    assert torch.equal(fused, expected) and tier.pop_tier_load() is None
    per_path = x.view(SEQ, 3, BATCH, HIDDEN)
    for j in range(3):  # the sequential schedule: one path per forward, counted per tier
        tier.path_tiers = [j]
        tier(per_path[:, j].contiguous())
    assert torch.equal(tier.pop_tier_load(), fused)
    with tier_load_paused([tier]):  # evaluation between training steps does not count
        tier(per_path[:, 0].contiguous())
    assert tier.pop_tier_load() is None and tier.count_tier_load


@pytest.mark.parametrize("ranks", ["1-2,5-6,11-12", "1-2,4,6-8"], ids=["even-widths", "uneven-widths"])
def test_lower_paths_match_select_tier_per_path(megatron_single_process, ranks):
    """The router's batched routing of all lower paths equals the method's ``select_tier`` applied
    to each path alone, for tiers of one width and of different widths."""
    from ordmoe_megatron.method import select_tier

    torch.manual_seed(8)
    _, tier = _routers(
        SCORE_CONFIGS["sigmoid-expert-bias"], OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks=ranks)
    )
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    probs, routing_map = (t.view(SEQ, 3, BATCH, EXPERTS) for t in tier(x))
    logits = (x @ tier.weight.t()).view(SEQ, 3, BATCH, EXPERTS)
    for j in (1, 2):
        ref_probs, ref_map = select_tier(
            logits[:, j].reshape(-1, EXPERTS),
            tier.tiers[j],
            TOPK,
            "sigmoid",
            expert_bias=tier.expert_bias,
            fp32_scores=compat.ROUTER_SCORES_IN_FP32,
        )
        assert torch.equal(routing_map[:, j].reshape(-1, EXPERTS), ref_map)
        torch.testing.assert_close(probs[:, j].reshape(-1, EXPERTS), ref_probs, rtol=1e-5, atol=1e-6)
        assert (routing_map[:, j].sum(-1) == len(tier.tiers[j])).all()
