"""The OrdMoE all-to-all dispatcher: buffer sizes and their guard, FP8 padding, shared experts,
collective count."""

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from tests.support import BATCH, run_on_ranks, tiny_batch, tiny_model


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from ordmoe_megatron.mcore.dispatcher import OrdMoEAlltoAllTokenDispatcher

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert layers and all(isinstance(layer.token_dispatcher, OrdMoEAlltoAllTokenDispatcher) for layer in layers)
    return layers


def test_uneven_tiers_size_the_permutation_by_their_widths(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks="1-2,4,6-8"))
    b = tiny_batch()
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    assert out.shape[0] == 3 * b["tokens"].shape[0]
    for layer in _moe_layers(model):
        dispatcher = layer.token_dispatcher
        assert layer.router.path_widths() == [2, 1, 3]
        assert dispatcher.num_out_tokens == int(dispatcher.routing_map.sum())


def test_sub_sampled_and_single_lower_paths_size_the_permutation_by_their_rows(megatron_single_process):
    """Lower paths on one of the rows (fused, ``[s, b + 2 x 1, h]``), and one lower path alone on
    it (the sequential schedule): the buffer holds each path's tokens times its tier width."""
    model = tiny_model(OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks="1-2,4,6-8"))
    b = tiny_batch()
    batch, seq = b["tokens"].shape
    assert batch > 1
    for tiers, rows, slots in (([0, 1, 2], [1], seq * (batch * 2 + 1 * 1 + 1 * 3)), ([2], [1], seq * 1 * 3)):
        model.set_path_tiers(tiers)
        model.set_path_rows(torch.tensor(rows))
        model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        for layer in _moe_layers(model):
            dispatcher = layer.token_dispatcher
            assert layer.router.routed_slots == slots
            assert dispatcher.num_out_tokens == int(dispatcher.routing_map.sum()) == slots


def test_a_stale_buffer_size_fails_loudly(megatron_single_process, monkeypatch):
    """The permutation buffer size the router records is checked against the routing map: its
    rows (a shape, no sync) and, on the CPU, its routed pairs."""
    from ordmoe_megatron.mcore.router import TierRouter

    model = tiny_model(OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks="1-2,4,6-8"))
    b = tiny_batch()
    model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    recorded = TierRouter._record_slots
    monkeypatch.setattr(TierRouter, "_record_slots", lambda self, rows, slots: None)  # a router that forgets
    model.set_path_rows(torch.tensor([1]))  # fewer rows than the recorded size is for
    with pytest.raises(RuntimeError, match="stale"):
        model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    model.set_path_rows(None)
    monkeypatch.setattr(TierRouter, "_record_slots", lambda self, rows, slots: recorded(self, rows, slots + 1))
    with pytest.raises(RuntimeError, match="stale"):  # the right rows, a wrong count
        model(b["tokens"], b["position_ids"], None, labels=b["labels"])


SHARED_EXPERTS = {
    "shared": dict(moe_shared_expert_intermediate_size=16),
    "shared-gate": dict(moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True),
    "shared-overlap": dict(moe_shared_expert_intermediate_size=16, moe_shared_expert_overlap=True),
    # Ling-mini-2.0 / DeepSeek-V3 style: group-limited sigmoid routing, expert bias, scaling factor.
    "shared-group-limited-sigmoid": dict(
        moe_shared_expert_intermediate_size=16,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=4,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
    ),
}


@pytest.mark.parametrize("name", sorted(SHARED_EXPERTS))
def test_shared_experts_run_on_every_path(megatron_single_process, name):
    """The shared expert (with its gate, with its overlap on the all-to-all) runs on every path:
    the fused forward and its gradients equal separate tier passes."""

    model = tiny_model(OrdMoEConfig(num_tiers=3), **SHARED_EXPERTS[name])
    layers = _moe_layers(model)
    assert all(layer.shared_experts is not None for layer in layers)
    for layer in layers:  # a trained model's expert bias, not zeros
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, layer.router.expert_bias.numel()))
    if "overlap" in name:
        assert all(layer.token_dispatcher.shared_experts is layer.shared_experts for layer in layers)
    rows = []
    layers[0].shared_experts.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    b = tiny_batch()
    shared = [p for n, p in model.named_parameters() if "shared_experts" in n]
    fused = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    assert rows == [3 * BATCH] or "overlap" in name  # (the overlapped expert is called piecewise)
    fused.sum().backward()
    fused_grads = [p.grad.clone() for p in shared]
    model.zero_grad()
    for j in range(3):
        model.set_path_tiers([j])
        alone = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        torch.testing.assert_close(fused[j * BATCH : (j + 1) * BATCH], alone, atol=1e-6, rtol=1e-5)
        alone.sum().backward()
    for fused_grad, p in zip(fused_grads, shared):
        torch.testing.assert_close(fused_grad, p.grad, atol=1e-6, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in fused_grads)
    plain = tiny_model(OrdMoEConfig(num_tiers=3))
    assert not torch.allclose(plain(b["tokens"], b["position_ids"], None, labels=b["labels"]), fused.detach())


def test_fp8_padding_pads_each_expert_over_all_paths(megatron_single_process, monkeypatch):
    from megatron.core.transformer.moe import token_dispatcher

    model = tiny_model(OrdMoEConfig(num_tiers=3))
    # On GPU --fp8-format turns this on; TransformerConfig refuses it without FP8, which needs
    # Transformer Engine, so set it on the built config: the padding itself is plain PyTorch.
    # FP8's alignment is 16 tokens (megatron-core 0.18 on return 0 for a model without FP8).
    model.config.moe_router_padding_for_quantization = True
    monkeypatch.setattr(token_dispatcher, "get_align_size_for_quantization", lambda config: 16)
    b = tiny_batch()
    model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    for layer in _moe_layers(model):
        dispatcher = layer.token_dispatcher
        counts = dispatcher.routing_map.sum(0)
        assert (counts % 16 == 0).all() and counts.sum() > 0  # the FP8 alignment
        assert (dispatcher.routing_map | dispatcher.probs.ne(0)).equal(dispatcher.routing_map)  # no choice lost
        assert dispatcher.routing_map.shape[0] == 3 * b["tokens"].numel()


def count_all_to_alls(rank, world_size, num_tiers):
    """One EP-2 training step; the number of all-to-all collectives this rank issued."""
    from ordmoe_megatron.runtime.distributed import init_model_parallel
    from ordmoe_megatron.train import build, cli
    from ordmoe_megatron.train.checks import ResumePlan
    from ordmoe_megatron.train.trainer import setup, train_step

    calls = []
    original = torch.distributed.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.distributed.all_to_all_single = counting
    config = cli.run_config_from_args(
        cli.parse_args(
            [
                "--num-layers",
                "2",
                "--hidden-size",
                "32",
                "--ffn-hidden-size",
                "64",
                "--moe-ffn-hidden-size",
                "32",
                "--seq-length",
                "16",
                "--max-position-embeddings",
                "16",
                "--micro-batch-size",
                "2",
                "--global-batch-size",
                "4",
                "--lr-warmup-iters",
                "1",
                "--train-iters",
                "2",
                "--expert-model-parallel-size",
                "2",
                "--ordmoe",
                "--ordmoe-num-tiers",
                str(num_tiers),
                "--mock-data",
            ]
        )
    )
    tconfig = build.transformer_config(config)
    init_model_parallel(config.layout, config.seed)
    trainer = setup(
        config,
        tconfig,
        build.model_chunks(config, tconfig),
        build.stream_factory(config, build.DataSources()),
        ResumePlan("new"),
    )
    data = trainer.data("train")
    calls.clear()
    train_step(trainer, data)
    return len(calls)


def test_all_paths_cross_expert_parallel_ranks_in_the_same_number_of_all_to_alls():
    plain = run_on_ranks(count_all_to_alls, 2, 1)
    fused = run_on_ranks(count_all_to_alls, 2, 3)
    # At least dispatch and combine, forward and backward, for each of the 2 MoE layers.
    assert plain == fused and plain[0] >= 8


def test_allgather_dispatcher_gives_the_same_paths(megatron_single_process):
    b = tiny_batch(4)
    outputs = []
    for dispatcher in ("alltoall", "allgather"):
        model = tiny_model(
            OrdMoEConfig(num_tiers=3, grouping="explicit", tier_ranks="1-2,4,6-8"), moe_token_dispatcher_type=dispatcher
        )
        outputs.append(model(b["tokens"], b["position_ids"], None, labels=b["labels"]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6, rtol=0)
