"""Every invalid OrdMoE setting is refused before a model is built, with the flag named."""

from types import SimpleNamespace

import pytest

from ordmoe_megatron import OrdMoEConfig, parse_layer_scope


def model_config(**overrides):
    base = dict(
        num_moe_experts=16,
        moe_router_topk=2,
        num_layers=4,
        moe_expert_capacity_factor=None,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_load_balancing_type="aux_loss",
        moe_enable_routing_replay=False,
        mtp_num_layers=None,
        moe_token_dispatcher_type="alltoall",
        context_parallel_size=1,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def test_defaults_follow_the_paper():
    cfg = OrdMoEConfig()
    assert cfg.num_tiers == 3 and cfg.rewards == [1.0, 0.5, 0.0] and cfg.advantage == "zscore"
    assert cfg.rank_loss_coeff == 1.0 and cfg.scope_layers is None and cfg.enabled
    cfg.validate_for_model(model_config())
    assert not OrdMoEConfig(num_tiers=1).enabled


def test_layer_scope_parsing():
    assert parse_layer_scope("1-4,25-28") == [1, 2, 3, 4, 25, 26, 27, 28]
    assert parse_layer_scope("7,14,21,28") == [7, 14, 21, 28]
    assert parse_layer_scope("all") is None
    cfg = OrdMoEConfig(layer_scope="2-3")
    assert cfg.in_scope(2) and not cfg.in_scope(1)


def test_floor_vocab():
    cfg = OrdMoEConfig(logprob_floor="vocab")
    assert cfg.floor_value(1000) == pytest.approx(-6.9077, abs=1e-4)
    assert OrdMoEConfig(logprob_floor="-3").floor_value(10) == -3.0
    assert OrdMoEConfig(logprob_floor="none").floor_value(10) is None


CONFIG_ERRORS = [
    (dict(num_tiers=0), "--ordmoe-num-tiers"),
    (dict(num_tiers=2.5), "--ordmoe-num-tiers"),
    (dict(grouping="best"), "--ordmoe-grouping"),
    (dict(grouping="explicit"), "--ordmoe-tier-ranks"),
    (dict(tier_ranks="1-2,5-6,9-10"), "--ordmoe-grouping=explicit"),
    (dict(rewards=[1.0, 0.0]), "one reward per tier"),
    (dict(rewards=[1.0, 1.0, 0.0]), "strictly decreasing"),
    (dict(rewards=[0.0, 0.5, 1.0]), "strictly decreasing"),
    (dict(advantage="softmax"), "--ordmoe-advantage"),
    (dict(rank_loss_coeff=-1.0), "--ordmoe-rank-loss-coeff"),
    (dict(rank_loss_coeff=float("nan")), "--ordmoe-rank-loss-coeff"),
    (dict(ranking="global"), "--ordmoe-ranking"),
    (dict(ranking="average", grouping="random"), "pick one"),
    (dict(layer_scope="1-x"), "--ordmoe-layer-scope"),
    (dict(layer_scope="4-2"), "--ordmoe-layer-scope"),
    (dict(logprob_floor="low"), "--ordmoe-logprob-floor"),
    (dict(logprob_floor=1.0), "--ordmoe-logprob-floor"),
    (dict(objective="dpo"), "--ordmoe-objective"),
    (dict(objective="pairwise-logistic", logprob_floor="vocab"), "drop the floor"),
    (dict(beta=0.0), "--ordmoe-beta"),
    (dict(beta=float("inf")), "--ordmoe-beta"),
    (dict(logprob_floor="nan"), "--ordmoe-logprob-floor=nan must be a finite log-likelihood"),
    (dict(logprob_floor=float("-inf")), "--ordmoe-logprob-floor=-inf must be a finite"),
    (dict(beta=2.0), "--ordmoe-objective advantage ignores it"),
    (dict(num_tiers=1, objective="plackett-luce"), "--ordmoe-num-tiers=1 is plain top-K"),
    (dict(num_tiers=1, lower_path_fraction=0.5), "--ordmoe-lower-path-fraction=0.5 would be ignored"),
    (dict(path_schedule="interleaved"), "--ordmoe-path-schedule"),
    (dict(lower_path_fraction=0.0), "--ordmoe-lower-path-fraction"),
    (dict(lower_path_fraction=1.5), "--ordmoe-lower-path-fraction"),
]


@pytest.mark.parametrize("kwargs,flag", CONFIG_ERRORS)
def test_invalid_ordmoe_settings(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace("+", r"\+")):
        OrdMoEConfig(**kwargs)


MODEL_ERRORS = [
    (dict(), dict(num_moe_experts=None), "--num-experts"),
    (dict(num_tiers=9), dict(), "--ordmoe-num-tiers=9 needs 9x2=18 experts"),
    (dict(grouping="explicit", tier_ranks="1-2,3-4,17-18"), dict(), "outside 1-16"),
    (dict(layer_scope="5"), dict(), "the model has layers 1-4"),
    (dict(), dict(moe_expert_capacity_factor=1.0), "--moe-expert-capacity-factor"),
    (dict(), dict(overlap_moe_expert_parallel_comm=True), "--overlap-moe-expert-parallel-comm"),
    (dict(), dict(tp_comm_overlap=True), "--tp-comm-overlap"),
    (dict(), dict(cuda_graph_impl="local"), "CUDA graphs"),
    (dict(), dict(enable_cuda_graph=True), "CUDA graphs"),
    (dict(path_schedule="sequential"), dict(moe_input_jitter_eps=0.01), "--moe-input-jitter-eps"),
    (dict(lower_path_fraction=0.5), dict(moe_input_jitter_eps=0.01), "--moe-input-jitter-eps"),
    (dict(), dict(moe_router_load_balancing_type="sinkhorn"), "sinkhorn"),
    (dict(), dict(moe_enable_routing_replay=True), "--moe-enable-routing-replay"),
    (dict(), dict(mtp_num_layers=1, pipeline_model_parallel_layout="Et|tL"), "--pipeline-model-parallel-layout"),
    (dict(), dict(moe_token_dispatcher_type="flex"), "flex"),
    (dict(), dict(context_parallel_size=2), "--context-parallel-size"),
    # options of megatron-core 0.17 on that pick experts by a rule the lower tiers cannot follow
    (dict(), dict(moe_router_load_balancing_type="quantile_balancing"), "quantile_balancing"),
    (dict(), dict(moe_router_load_balancing_type=["aux_loss", "sinkhorn"]), "aux_loss/sinkhorn"),
    (dict(), dict(moe_router_force_biased=0.5), "--moe-router-force-biased"),
    (dict(), dict(transformer_impl="inference_optimized"), "--transformer-impl inference_optimized"),
    (dict(path_schedule="sequential"), dict(recompute_granularity="selective"), "--recompute-granularity"),
    (dict(), dict(moe_router_score_function="cosine"), "--moe-router-score-function cosine is not one the tier"),
]


@pytest.mark.parametrize("ordmoe_kwargs,model_kwargs,match", MODEL_ERRORS)
def test_model_settings_the_tier_router_refuses(ordmoe_kwargs, model_kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrdMoEConfig(**ordmoe_kwargs).validate_for_model(model_config(**model_kwargs))


def test_layer_scope_must_hit_a_moe_layer():
    with pytest.raises(ValueError, match="contains no MoE layer"):
        OrdMoEConfig(layer_scope="2").validate_for_model(model_config(moe_layer_freq=[1, 0, 1, 0]))


def test_group_limited_routing_and_fused_input_jitter_are_accepted():
    OrdMoEConfig().validate_for_model(model_config(moe_router_num_groups=4, moe_router_group_topk=2))
    OrdMoEConfig().validate_for_model(model_config(moe_input_jitter_eps=0.01))
    OrdMoEConfig().validate_for_model(model_config(mtp_num_layers=1))


def test_single_tier_accepts_every_megatron_option():
    OrdMoEConfig(num_tiers=1).validate_for_model(model_config(moe_expert_capacity_factor=1.0, context_parallel_size=2))


def test_sub_sampled_rows_flops_share_and_stage_shapes():
    cfg = OrdMoEConfig(num_tiers=3, lower_path_fraction=0.25)
    assert [cfg.lower_path_rows(b) for b in (1, 4, 8, 10)] == [1, 1, 2, 2]  # at least one row
    assert cfg.paths_per_sequence(8) == pytest.approx(1.5)
    assert OrdMoEConfig(num_tiers=3).paths_per_sequence(8) == 3
    assert cfg.stage_batch_rows(8) == "8 + 2 x 2"
    assert OrdMoEConfig(num_tiers=3).stage_batch_rows(4) == "3 x 4"
    assert OrdMoEConfig(num_tiers=3, path_schedule="sequential").stage_batch_rows(4) == "4"
    assert (
        OrdMoEConfig(num_tiers=3, path_schedule="sequential", lower_path_fraction=0.5).stage_batch_rows(4)
        == "4 or 2 (one path at a time)"
    )


def test_sequential_schedule_runs_every_layer_on_every_path():
    # One path per forward: nothing to share, so no lazy fan-out.
    assert OrdMoEConfig(layer_scope="4").shared_prefix_layers(4, 1) == 3
    assert OrdMoEConfig(layer_scope="4", path_schedule="sequential").shared_prefix_layers(4, 1) == 0


def test_the_lazy_fanout_reads_a_model_config_or_megatron_lm_args_in_one_place():
    """Pipeline stages and full recompute move the fan-out to the embedding, wherever it is asked."""
    cfg = OrdMoEConfig(layer_scope="3-4")
    model = dict(num_layers=4, moe_layer_freq=1, pipeline_model_parallel_size=1, recompute_granularity=None)
    assert cfg.shared_prefix_layers_of(SimpleNamespace(**model)) == 2
    assert cfg.shared_prefix_layers_of(SimpleNamespace(**dict(model, recompute_granularity="selective"))) == 2
    assert cfg.shared_prefix_layers_of(SimpleNamespace(**dict(model, recompute_granularity="full"))) == 0
    assert cfg.shared_prefix_layers_of(SimpleNamespace(**dict(model, pipeline_model_parallel_size=2))) == 0
    assert cfg.shared_prefix_layers_of(SimpleNamespace(**dict(model, moe_layer_freq=[0, 0, 0, 1]))) == 3


def test_sequential_sub_sampling_with_two_stages_and_virtual_stages_is_refused():
    cfg = OrdMoEConfig(path_schedule="sequential", lower_path_fraction=0.5)
    with pytest.raises(ValueError, match="mis-pairs"):
        cfg.check_pipeline(4, pipeline=2, virtual_stages=True)
    cfg.check_pipeline(4, pipeline=2, virtual_stages=False)  # 1F1B: fine
    cfg.check_pipeline(4, pipeline=4, virtual_stages=True)  # the previous and next stage differ: fine
    OrdMoEConfig(lower_path_fraction=0.5).check_pipeline(4, pipeline=2, virtual_stages=True)  # fused: one shape


def test_each_variant_family_is_one_table_that_validates_and_dispatches():
    """Groupings, advantage modes and objectives: OrdMoEConfig's Literal choices are the table's
    names, and every name the config accepts is computed by the table's entry."""
    import torch

    from ordmoe_megatron.method import ADVANTAGE_MODES, GROUPINGS, OBJECTIVES, rank_advantages, rank_loss, tier_ranks
    from ordmoe_megatron.method.config import literal_choices

    choices = literal_choices()
    assert choices["grouping"] == tuple(GROUPINGS)
    assert choices["advantage"] == tuple(ADVANTAGE_MODES)
    assert choices["objective"] == tuple(OBJECTIVES)
    for name, grouping in GROUPINGS.items():
        ranks = "1-2,5-6,15-16" if grouping.ranks is None else None
        cfg = OrdMoEConfig(grouping=name, tier_ranks=ranks)
        expected = [[1, 2], [5, 6], [15, 16]] if grouping.ranks is None else grouping.ranks(16, 2, 3)
        assert cfg.tiers(16, 2) == tier_ranks(16, 2, 3, name, ranks) == expected
    assert GROUPINGS["uniform"].ranks(16, 2, 3) == [[1, 2], [7, 8], [15, 16]]  # the paper's spread
    assert GROUPINGS["high-only"].ranks(16, 2, 3) == [[1, 2], [3, 4], [5, 6]]
    assert [name for name, g in GROUPINGS.items() if g.shuffled] == ["random"]
    rewards = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    for mode, advantages in ADVANTAGE_MODES.items():
        assert torch.equal(rank_advantages(rewards, mode), advantages(rewards).float())
    torch.testing.assert_close(rank_advantages(rewards, "zscore"), torch.tensor([1.2247449, 0.0, -1.2247449]))
    logprobs = torch.tensor([[-1.0, -2.0], [-1.5, -2.5], [-3.0, -2.0]], dtype=torch.float64)
    for name, objective in OBJECTIVES.items():
        kwargs = OrdMoEConfig(objective=name).objective_kwargs(vocab_size=64)
        loss = rank_loss(logprobs, name, **kwargs)
        by_entry = objective.loss(logprobs, kwargs["rewards"], kwargs["mode"], kwargs["floor"], kwargs["beta"], "mean")
        assert torch.equal(loss, by_entry)
        assert OrdMoEConfig(objective=name).linear_objective == objective.linear
    with pytest.raises(ValueError, match="--ordmoe-objective='dpo' is not one of advantage, pairwise-logistic"):
        rank_loss(logprobs, "dpo")
    with pytest.raises(ValueError, match="--ordmoe-advantage='softmax' is not one of zscore, center, raw"):
        rank_advantages(rewards, "softmax")
    with pytest.raises(ValueError, match="--ordmoe-grouping='spread' is not one of uniform, high-only"):
        tier_ranks(16, 2, 3, "spread")
