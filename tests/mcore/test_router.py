"""TierRouter against Megatron's TopKRouter and the method page's ranked list, on one CPU process."""

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime import compat
from ordmoe_megatron.runtime.distributed import device
from tests.support import (
    moe_aux_loss_values,
    on_device,
    ordmoe_schedule_step,
    reset_moe_aux_losses,
    tiny_batch,
    tiny_batches,
    tiny_model,
)

SEQ, BATCH, HIDDEN, EXPERTS, TOPK = 5, 3, 16, 12, 2

SIGMOID_BIAS = dict(
    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3
)
SCORE_CONFIGS = {
    "softmax": dict(),
    "pre-softmax": dict(moe_router_pre_softmax=True),
    "softmax-scaled": dict(moe_router_topk_scaling_factor=2.5),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid-scaled": dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5),
    "sigmoid-expert-bias": SIGMOID_BIAS,
    "seq-aux-loss": dict(moe_router_load_balancing_type="seq_aux_loss"),
    "z-loss": dict(moe_z_loss_coeff=1e-3),
    # Group-limited routing: 4 groups of 3 experts; a group's score is its best two experts' sum.
    "group-limited": dict(moe_router_num_groups=4, moe_router_group_topk=1),
    "group-limited-pre-softmax": dict(moe_router_num_groups=4, moe_router_group_topk=1, moe_router_pre_softmax=True),
    # DeepSeek-V3's router: sigmoid scores, expert bias, scaling factor, top-4 of 2 of 4 groups.
    "deepseek-v3": dict(
        SIGMOID_BIAS,
        moe_router_topk_scaling_factor=2.5,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_topk=4,
    ),
}
if "sqrtsoftplus" in compat.SCORE_FUNCTIONS:
    SCORE_CONFIGS["sqrtsoftplus-group-limited"] = dict(
        moe_router_score_function="sqrtsoftplus", moe_router_num_groups=4, moe_router_group_topk=1
    )


def _routers(extra, ordmoe=None, topk=TOPK, bf16=False):
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
    if bf16:
        kwargs.update(bf16=True, params_dtype=torch.bfloat16)
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


def _paths(t, paths=3):
    """``[s * paths * b, ...]`` (or ``[s, paths * b, ...]``) -> ``[s, paths, b, ...]``."""
    return t.reshape(SEQ, paths, -1, *t.shape[(2 if t.dim() == 3 else 1) :])


@pytest.mark.parametrize("name", sorted(SCORE_CONFIGS))
def test_path_one_is_bit_identical_to_topk_router(megatron_single_process, name):
    torch.manual_seed(0)
    reference, tier = _routers(SCORE_CONFIGS[name])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    path_one = lambda t: _paths(t)[:, 0].reshape(-1, EXPERTS)  # noqa: E731
    # Bit for bit where the gating GEMM sees the same shape (CPU kernels may round a row by its
    # position in the batch): TopKRouter on the same stacked input, path 1's rows.
    ref_probs, ref_map = (path_one(t) for t in reference(x))
    if reference.local_tokens_per_expert is not None:
        reference.local_tokens_per_expert.zero_()
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
        counts = tier.local_tokens_per_expert
        assert torch.equal(counts, ref_map.sum(0).to(counts.dtype))
        assert not torch.equal(counts, routing_map.sum(0).to(counts.dtype))  # the lower paths route too


def _ranking_scores(row, cfg, expert_bias):
    """The score the model's own top-K ranks a token's experts by, written out."""
    fp32 = compat.ROUTER_SCORES_IN_FP32
    if cfg.moe_router_score_function == "softmax":
        if not cfg.moe_router_pre_softmax:
            return row.float()
        scores = torch.softmax(row.float(), -1)
        return scores if fp32 else scores.to(row.dtype).float()
    if cfg.moe_router_score_function == "sigmoid":
        scores = torch.sigmoid(row.float())
    else:
        scores = torch.nn.functional.softplus(row.float()).sqrt()
    scores = scores if fp32 else scores.to(row.dtype).float()
    return scores if expert_bias is None else scores + expert_bias.float()


def _gates(row, experts, cfg):
    """The model's gating rule on ``experts``, written out (fp32)."""
    chosen = row.float()[experts]
    if cfg.moe_router_score_function == "softmax":
        gates = torch.softmax(row.float(), -1)[experts] if cfg.moe_router_pre_softmax else torch.softmax(chosen, -1)
    else:
        sigmoid = cfg.moe_router_score_function == "sigmoid"
        s = torch.sigmoid(chosen) if sigmoid else torch.nn.functional.softplus(chosen).sqrt()
        gates = s / s.sum() if cfg.moe_router_topk > 1 else s
    return gates * (cfg.moe_router_topk_scaling_factor or 1.0)


def _reference_tier(scores, selected, ranks):
    """Method page §1 as a plain loop: the experts ``selected`` first, then the others by score
    (ties to the lower index); the experts at ``ranks``."""
    by_score = lambda e: (-scores[e], e)  # noqa: E731
    ranked = sorted(selected, key=by_score) + sorted((e for e in range(len(scores)) if e not in selected), key=by_score)
    return sorted(ranked[r - 1] for r in ranks)


def _check_lower_paths(tier, logits, selection, probs, routing_map, order=None, tolerance=1e-6):
    """Every lower-path token of ``[s, C, b, n]`` tensors against the plain loop: its tier is cut
    from the ranked list that ``selection`` (Megatron's top-K of the same logits) heads, it
    shares no expert with that selection, and its gates are the model's rule."""
    cfg = tier.config
    for j, t in enumerate(tier.path_tiers[1:], start=1):
        for s in range(SEQ):
            for b in range(logits.shape[2]):
                row = logits[s, j, b]
                selected = selection[s, j, b].nonzero().flatten().tolist()
                assert len(selected) == cfg.moe_router_topk
                scores = (_ranking_scores(row, cfg, tier.expert_bias) if order is None else order(s, j, b)).tolist()
                experts = _reference_tier(scores, selected, tier.tiers[t])
                assert routing_map[s, j, b].nonzero().flatten().tolist() == experts, (j, s, b)
                assert not set(experts) & set(selected)
                gates = probs[s, j, b, experts].float()
                torch.testing.assert_close(gates, _gates(row, experts, cfg), rtol=tolerance, atol=tolerance)


LAYOUTS = {
    "uniform": OrdMoEConfig(num_tiers=3),
    "high-only": OrdMoEConfig(num_tiers=3, grouping="high-only"),
    "explicit-uneven": OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks="1-2,4,6-8"),
    "explicit-scattered": OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks="1-2,3+9-10,12"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["softmax", "pre-softmax", "sigmoid-scaled", "group-limited", "deepseek-v3"])
def test_lower_paths_cut_their_tier_from_the_ranked_list(megatron_single_process, name, layout):
    extra = SCORE_CONFIGS[name]
    if name == "deepseek-v3" and layout != "uniform":  # top-4 of 12 experts
        extra = dict(extra, moe_router_topk=2, moe_router_group_topk=1)
    torch.manual_seed(1)
    reference, tier = _routers(extra, LAYOUTS[layout])
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    probs, routing_map = (_paths(t) for t in tier(x))
    _, selection = (_paths(t) for t in reference(x))  # Megatron's top-K of every row's logits
    logits = _paths(tier.gating(x))
    _check_lower_paths(tier, logits, selection, probs, routing_map)
    if name == "group-limited":  # the group limit matters here: the selection is not simply the top K
        plain = torch.zeros_like(selection).scatter(-1, logits.topk(tier.topk, dim=-1).indices, True)
        assert not torch.equal(plain, selection)


@pytest.mark.parametrize("layout", ["uniform", "high-only", "explicit-uneven"])
@pytest.mark.parametrize("name", ["softmax", "group-limited", "deepseek-v3"])
def test_no_lower_tier_shares_an_expert_with_path_one_under_bf16_ties(megatron_single_process, name, layout):
    """bf16 router logits (the default without --moe-router-dtype fp32) with experts whose router
    weights are equal, so tokens tie at rank K; every path carries the same tokens (the first
    tier-routed layer): no lower tier meets path 1's own top-K."""
    extra = SCORE_CONFIGS[name]
    if name == "deepseek-v3" and layout != "uniform":
        extra = dict(extra, moe_router_topk=2, moe_router_group_topk=1)
    torch.manual_seed(2)
    reference, tier = _routers(extra, LAYOUTS[layout], bf16=True)
    with torch.no_grad():
        for router in (reference, tier):
            router.weight[4:8] = router.weight[8:] = router.weight[:4]  # experts e, e+4, e+8 always tie
    x = on_device(torch.randn(SEQ, BATCH, HIDDEN).to(torch.bfloat16).repeat(1, 3, 1))
    probs, routing_map = (_paths(t) for t in tier(x))
    logits = _paths(tier.gating(x))
    assert logits.dtype == torch.bfloat16
    k = tier.topk
    kth, next_one = logits[:, 0].float().topk(k + 1, dim=-1).values[..., -2:].unbind(-1)
    assert (kth == next_one).all()  # every token ties at rank K
    path_one = routing_map[:, 0]
    selection = path_one.unsqueeze(1).expand_as(routing_map)
    for j in range(1, 3):
        assert not (routing_map[:, j] & path_one).any()
    _check_lower_paths(tier, logits, selection, probs, routing_map, tolerance=1e-2)  # bf16 gates


def test_tier_gating_is_the_model_rule_on_megatron_own_selection(megatron_single_process):
    """Applied to Megatron's own top-K, the lower paths' gating gives Megatron's probabilities:
    the same rule (score function, pre-softmax, sigmoid normalisation, scaling factor)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from ordmoe_megatron.method import route_to_experts

    torch.manual_seed(3)
    for name, extra in SCORE_CONFIGS.items():
        _, tier = _routers(extra)
        logits = tier.gating(on_device(torch.randn(SEQ * BATCH, HIDDEN)))
        cfg = tier.config
        probs, routing_map = topk_routing_with_score_function(
            logits,
            tier.topk,
            use_pre_softmax=cfg.moe_router_pre_softmax,
            num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=cfg.moe_router_score_function,
            expert_bias=tier.expert_bias,
        )
        experts = routing_map.float().topk(tier.topk, dim=-1).indices
        ours, our_map = route_to_experts(
            logits,
            experts,
            tier.topk,
            cfg.moe_router_score_function,
            cfg.moe_router_pre_softmax,
            cfg.moe_router_topk_scaling_factor,
            compat.ROUTER_SCORES_IN_FP32,
        )
        assert torch.equal(our_map, routing_map), name
        torch.testing.assert_close(ours, probs, rtol=1e-6, atol=1e-7, msg=name)


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
    _, tier = _routers(SCORE_CONFIGS["group-limited"], OrdMoEConfig(num_tiers=3, layer_scope="2"))
    x = on_device(torch.randn(SEQ, BATCH, HIDDEN).repeat(1, 3, 1))
    _, routing_map = tier(x)
    per_path = routing_map.view(SEQ, 3, BATCH, EXPERTS)
    assert torch.equal(per_path[:, 0], per_path[:, 1]) and torch.equal(per_path[:, 0], per_path[:, 2])


@pytest.mark.parametrize("name", ["softmax", "deepseek-v3"])
def test_average_ranking_cuts_tiers_after_each_token_own_top_k(megatron_single_process, name):
    torch.manual_seed(4)
    reference, tier = _routers(SCORE_CONFIGS[name], OrdMoEConfig(num_tiers=3, ranking="average"))
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    probs, routing_map = (_paths(t) for t in tier(x))
    logits = _paths(tier.gating(x))
    scores = tier.score_function
    raw = logits[:, 0].reshape(-1, EXPERTS).double()
    path_one_scores = torch.softmax(raw, -1) if scores == "softmax" else torch.sigmoid(raw)
    mean = path_one_scores.mean(0)  # this batch's path-1 scores are in the means it ranks with
    torch.testing.assert_close(tier.score_sum / tier.score_count, mean)
    assert tier.score_sum.dtype == tier.score_count.dtype == torch.float64
    _, selection = (_paths(t) for t in reference(x))
    _check_lower_paths(tier, logits, selection, probs, routing_map, order=lambda s, j, b: mean)
    assert {"score_sum", "score_count"} <= set(tier.state_dict())


def test_random_grouping_shuffles_the_experts_after_each_token_own_top_k(megatron_single_process):
    torch.manual_seed(5)
    reference, tier = _routers(SCORE_CONFIGS["group-limited"], OrdMoEConfig(num_tiers=3, grouping="random"))
    x = on_device(torch.randn(SEQ, BATCH, HIDDEN).repeat(1, 3, 1))
    ref_probs, selection = (_paths(t) for t in reference(x))  # the same stacked input: the same gating GEMM
    torch.manual_seed(55)
    probs, routing_map = (_paths(t) for t in tier(x))
    torch.manual_seed(55)  # the draw: one uniform key per lower-path token and expert
    keys = on_device(torch.rand(SEQ * 2 * BATCH, EXPERTS)).view(SEQ, 2, BATCH, EXPERTS)
    assert torch.equal(probs[:, 0], ref_probs[:, 0])
    logits = _paths(tier.gating(x))
    _check_lower_paths(tier, logits, selection, probs, routing_map, order=lambda s, j, b: keys[s, j - 1, b])
    assert not torch.equal(routing_map[:, 1], routing_map[:, 2])  # random draws differ across paths
    assert not (routing_map[:, 1:] & routing_map[:, :1]).any()


def test_sub_sampled_and_single_lower_paths_route_like_the_full_stack(megatron_single_process):
    """Paths 2..C on rows [0, 2] of the batch (the sub-sampled stack [b + 2m]), and each path alone
    (the sequential schedule), route those rows as the full stack does."""
    torch.manual_seed(6)
    _, tier = _routers(SCORE_CONFIGS["deepseek-v3"])
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


def test_sequential_average_ranking_updates_and_ranks_like_the_fused_stack(megatron_single_process):
    """Path 1 alone folds its scores into the running means (the sequential schedule's first
    forward of a micro-batch); the lower paths alone then rank with those means, as the fused
    stack does."""
    torch.manual_seed(7)
    _, fused = _routers(SCORE_CONFIGS["softmax"], OrdMoEConfig(num_tiers=3, ranking="average"))
    _, alone = _routers(SCORE_CONFIGS["softmax"], OrdMoEConfig(num_tiers=3, ranking="average"))
    alone.load_state_dict(fused.state_dict())
    per_path = [on_device(torch.randn(SEQ, BATCH, HIDDEN)) for _ in range(3)]
    for step in range(2):
        _, fused_map = fused(torch.cat(per_path, dim=1))
        fused_map = fused_map.view(SEQ, 3, BATCH, EXPERTS)
        for j in range(3):
            alone.path_tiers = [j]
            _, alone_map = alone(per_path[j])
            assert torch.equal(alone_map.view(SEQ, BATCH, EXPERTS), fused_map[:, j]), (step, j)
        torch.testing.assert_close(alone.score_sum, fused.score_sum, rtol=1e-12, atol=0)
        assert torch.equal(alone.score_count, fused.score_count)
        assert fused.score_count == (step + 1) * SEQ * BATCH  # path 1's tokens, once per forward


def test_sequential_forward_only_pass_ranks_as_its_training_pass(megatron_single_process):
    """The sequential schedule's preference objectives first run every path of every micro-batch
    without gradients, then train: both passes rank each micro-batch's lower paths with the same
    means, and the means take each micro-batch once."""
    torch.manual_seed(8)
    _, tier = _routers(
        SCORE_CONFIGS["softmax"], OrdMoEConfig(num_tiers=3, ranking="average", path_schedule="sequential")
    )
    micro_batches = [[on_device(torch.randn(SEQ, BATCH, HIDDEN)) for _ in range(3)] for _ in range(2)]

    def one_pass():
        maps = []
        for paths in micro_batches:
            for j, x in enumerate(paths):
                tier.path_tiers = [j]
                maps.append(tier(x)[1])
        return maps

    with torch.no_grad():
        forward_only = one_pass()
    assert tier.score_count == 0  # nothing folded in yet
    training = one_pass()
    assert all(torch.equal(a, b) for a, b in zip(forward_only, training))
    assert tier.score_count == 2 * SEQ * BATCH and not tier._previews


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
    with torch.no_grad():  # a checkpointed forward counts in its recomputation
        tier(per_path[:, 0].contiguous())
    assert tier.pop_tier_load() is None


@pytest.mark.parametrize("ranks", ["1-2,5-6,11-12", "1-2,4,6-8"], ids=["even-widths", "uneven-widths"])
def test_lower_paths_match_select_tier_per_path(megatron_single_process, ranks):
    """The router's batched routing of all lower paths equals the method's ``select_tier`` applied
    to each path alone, for tiers of one width and of different widths."""
    from ordmoe_megatron.method import select_tier

    torch.manual_seed(8)
    reference, tier = _routers(
        SCORE_CONFIGS["deepseek-v3"] | dict(moe_router_topk=2, moe_router_group_topk=1),
        OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks=ranks),
    )
    x = on_device(torch.randn(SEQ, 3 * BATCH, HIDDEN))
    probs, routing_map = (t.view(SEQ, 3, BATCH, EXPERTS) for t in tier(x))
    _, selection = (t.view(SEQ, 3, BATCH, EXPERTS) for t in reference(x))
    logits = (x @ tier.weight.t()).view(SEQ, 3, BATCH, EXPERTS)
    for j in (1, 2):
        ref_probs, ref_map = select_tier(
            logits[:, j].reshape(-1, EXPERTS),
            tier.tiers[j],
            TOPK,
            selection[:, j].reshape(-1, EXPERTS),
            "sigmoid",
            scaling_factor=2.5,
            expert_bias=tier.expert_bias,
            fp32_scores=compat.ROUTER_SCORES_IN_FP32,
        )
        assert torch.equal(routing_map[:, j].reshape(-1, EXPERTS), ref_map)
        torch.testing.assert_close(probs[:, j].reshape(-1, EXPERTS), ref_probs, rtol=1e-5, atol=1e-6)
        assert (routing_map[:, j].sum(-1) == len(tier.tiers[j])).all()


def test_input_jitter_is_path_one_draw_on_every_path(megatron_single_process):
    """--moe-input-jitter-eps: every path's copy of a token is jittered with the noise TopKRouter
    draws for path 1's rows, so the lower tiers are cut from the ranking path 1 used."""
    reference, tier = _routers(dict(moe_input_jitter_eps=0.1))
    seen = []
    gating = tier.gating
    tier.gating = lambda jittered: seen.append(jittered) or gating(jittered)
    x = on_device(torch.randn(SEQ, BATCH, HIDDEN))
    torch.manual_seed(9)
    _, routing_map = tier(x.repeat(1, 3, 1))
    torch.manual_seed(9)
    expected = reference.apply_input_jitter(x)  # TopKRouter's draw for path 1 alone
    jittered = seen[0].view(SEQ, 3, BATCH, HIDDEN)
    assert not torch.equal(expected, x)
    for j in range(3):
        assert torch.equal(jittered[:, j], expected)
    per_path = routing_map.view(SEQ, 3, BATCH, EXPERTS)
    assert not (per_path[:, 1:] & per_path[:, :1]).any()
    tier.lower_path_rows = 1
    with pytest.raises(OrdMoEError, match="--moe-input-jitter-eps"):
        tier(torch.cat([x, x[:, :1], x[:, :1]], dim=1))


def test_running_means_stay_float64_through_float16_module(megatron_single_process, tmp_path):
    """Megatron's Float16Module casts the model with .bfloat16(): the running means stay float64
    (a bf16 count stops at 2^20 + 0), in the forward, the state dict and a saved checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.module import Float16Module

    def wrapped():
        model = tiny_model(OrdMoEConfig(num_tiers=3, ranking="average"), bf16=True)
        return Float16Module(model.config, model)

    model = wrapped()
    routers = model.module.tier_routers()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(r.score_sum.dtype == r.score_count.dtype == torch.float64 for r in routers)
    for r in routers:
        r.score_count.fill_(2.0**20)
    b = tiny_batch()
    model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    tokens = b["tokens"].numel()
    assert all(r.score_count.item() == 2.0**20 + tokens for r in routers)  # bf16 would stay at 2^20
    state = model.state_dict()
    means = {k: v for k, v in state.items() if k.endswith(("score_sum", "score_count"))}
    assert means and all(v.dtype == torch.float64 for v in means.values())
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    fresh = wrapped()
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path))
    fresh.load_state_dict(loaded, strict=False)
    for k, v in means.items():
        assert fresh.state_dict()[k].dtype == torch.float64 and torch.equal(fresh.state_dict()[k], v), k


RECOMPUTE = {
    "selective-moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
RANKINGS = {
    "average": OrdMoEConfig(num_tiers=3, ranking="average"),
    "token": OrdMoEConfig(num_tiers=3),
    "random": OrdMoEConfig(num_tiers=3, grouping="random"),
    # layer 1 routes top-K for all paths: the lazy fan-out runs it once, before layer 2, except
    # under full recompute (fan-out at the embedding): the same gradients either way
    "scoped": OrdMoEConfig(num_tiers=3, layer_scope="2-3"),
}


@pytest.mark.parametrize(
    "recompute, ranking",
    [(recompute, ranking) for recompute in sorted(RECOMPUTE) for ranking in sorted(RANKINGS) if ranking != "scoped"]
    + [pytest.param("full", "scoped", marks=pytest.mark.one_version)],
)
def test_activation_recompute_gives_the_gradients_of_no_recompute(megatron_single_process, recompute, ranking):
    """Megatron runs a checkpointed forward without gradients and recomputes it in the backward:
    the recomputation routes as the forward did, the running means take each micro-batch once,
    and the tier load counts it once. Two steps of two micro-batches, with an SGD step between."""

    cfg = RANKINGS[ranking]
    models = {"plain": tiny_model(cfg), "recompute": tiny_model(cfg, **RECOMPUTE[recompute])}
    if ranking == "scoped":
        assert models["plain"].fanout_layer == 2
        assert models["recompute"].fanout_layer == (None if recompute == "full" else 2)
    batches = tiny_batches(2, seed=30)
    for step in range(2):
        results = {}
        for name, model in models.items():
            torch.manual_seed(100 + step)  # the random grouping's draws
            reports, grads = ordmoe_schedule_step(model, cfg, batches)
            loads = [r.pop_tier_load() for r in model.tier_routers()]
            means = [r.score_sum / r.score_count for r in model.tier_routers()] if ranking == "average" else []
            results[name] = reports, grads, loads, means
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in grads:
                        p -= 0.5 * grads[n]
        (plain_reports, plain_grads, plain_loads, plain_means) = results["plain"]
        (reports, grads, loads, means) = results["recompute"]
        for a, b in zip(plain_reports, reports):
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
        assert grads.keys() == plain_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        for a, b in zip(plain_loads, loads):
            # a layer before the lazy fan-out runs (and counts) once; fanned out at the embedding,
            # once per path, alike
            assert torch.equal(a.expand_as(b), b)
        for a, b in zip(plain_means, means):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    if ranking == "average":
        assert all(r.score_count == 2 * 2 * 4 * 12 for r in models["recompute"].tier_routers())  # once each
