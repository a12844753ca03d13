"""DeepSeek-V3-style models with tier paths: group-limited sigmoid routing with expert bias, a
shared expert, first dense layers and multi-token prediction (MTP, path 1 only)."""

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.runtime import compat
from tests.support import (
    BATCH,
    SEQ,
    ordmoe_schedule_step,
    run_on_ranks,
    single_tier_and_plain_training,
    tiny_batch,
    tiny_batches,
    tiny_model,
)

# Ling-mini-2.0 / DeepSeek-V3 in miniature: 16 experts in 4 groups (2 per token), sigmoid scores
# with the expert bias and a scaling factor, one shared expert, a first dense layer, one MTP layer.
DEEPSEEK = dict(
    num_moe_experts=16,
    moe_router_num_groups=4,
    moe_router_group_topk=2,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_topk_scaling_factor=2.5,
    moe_shared_expert_intermediate_size=16,
    moe_ffn_hidden_size=16,
    ffn_hidden_size=32,
    moe_layer_freq=[0, 1, 1],
    mtp_num_layers=1,
    mtp_loss_scaling_factor=0.3,
)


def _mtp_tracked_loss() -> torch.Tensor:
    tracked = compat.mtp_tracked_losses()
    values = tracked.clone()
    tracked.zero_()
    return values


def test_mtp_runs_on_path_1_only_and_lower_paths_match_their_own_forward(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3), **DEEPSEEK)
    assert model.mtp_process
    mtp_routers = [m for m in model.mtp.modules() if hasattr(m, "expert_bias")]
    assert mtp_routers and not any(isinstance(r, TierRouter) for r in mtp_routers)  # plain top-K
    b = tiny_batch(4)
    fused = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    fused_mtp = _mtp_tracked_loss()
    assert fused.shape == (3 * BATCH, SEQ)
    model.set_path_tiers([0])
    alone = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    torch.testing.assert_close(fused[:BATCH], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_mtp, _mtp_tracked_loss(), atol=1e-6, rtol=1e-5)  # path 1's MTP loss only
    for j in (1, 2):
        model.set_path_tiers([j])
        alone = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
        assert not _mtp_tracked_loss().any()  # lower paths skip MTP
        torch.testing.assert_close(fused[j * BATCH : (j + 1) * BATCH], alone, atol=1e-6, rtol=1e-5)
    # The MTP parameters' gradient is path 1's alone: the fused loss of all paths gives what path 1's does.
    model.set_path_tiers([0, 1, 2])
    model.zero_grad(set_to_none=True)
    model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"]).sum().backward()
    fused_grads = [p.grad.clone() for p in model.mtp.parameters()]
    model.zero_grad(set_to_none=True)
    model.set_path_tiers([0])
    model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"]).sum().backward()
    model.set_path_tiers([0, 1, 2])
    assert any(g.any() for g in fused_grads)
    for fused_grad, p in zip(fused_grads, model.mtp.parameters()):
        torch.testing.assert_close(fused_grad, p.grad, rtol=1e-5, atol=1e-7)


def test_no_lower_tier_shares_an_expert_with_path_1_under_group_limits(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3), **DEEPSEEK)
    maps = []
    router = model.decoder.layers[1].mlp.router
    handle = router.register_forward_hook(lambda module, args, output: maps.append(output[1].clone()))
    b = tiny_batch(5)
    model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    handle.remove()
    routing = maps[0].view(SEQ, 3, BATCH, -1).transpose(0, 1)  # [s, C*b] rows, path-major on b: [path, s, b, e]
    assert routing.sum(-1).eq(2).all()
    assert not (routing[0] & routing[1]).any() and not (routing[0] & routing[2]).any()
    assert not (routing[1] & routing[2]).any()


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_sequential_schedule_gives_the_fused_gradients_with_mtp(megatron_single_process, fraction):
    model = tiny_model(OrdMoEConfig(num_tiers=3), **DEEPSEEK)
    batches = tiny_batches(2)
    kwargs = dict(num_tiers=3, lower_path_fraction=fraction)
    _, fused = ordmoe_schedule_step(model, OrdMoEConfig(**kwargs), batches)
    _, sequential = ordmoe_schedule_step(model, OrdMoEConfig(path_schedule="sequential", **kwargs), batches)
    assert fused.keys() == sequential.keys()
    assert any(name.startswith("mtp.") for name in fused)
    for name, grad in fused.items():
        torch.testing.assert_close(sequential[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())


def test_single_tier_with_mtp_trains_bit_identically_to_plain_megatron():
    # A gloo process on the CPU (bit for bit on its deterministic kernels), as test_model's.
    (((plain_losses, plain_grads), (single_losses, single_grads)),) = run_on_ranks(
        single_tier_and_plain_training, 1, DEEPSEEK
    )
    for step in range(3):
        assert torch.equal(plain_losses[step], single_losses[step])
        assert all(torch.equal(a, b) for a, b in zip(plain_grads[step], single_grads[step]))
    assert not torch.equal(plain_losses[0], plain_losses[2])


MLA = dict(
    multi_latent_attention=True,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=8,
    rope_type="rope",
)


def test_mla_with_dense_first_layer_trains_on_tier_paths(megatron_single_process):
    """DeepSeek-V3's attention (MLA, its core attention bridged without Transformer Engine) with the
    routing above: C = 3 stacked paths equal each path alone, forward and backward."""
    model = tiny_model(OrdMoEConfig(num_tiers=3), **DEEPSEEK, **MLA)
    assert type(model.decoder.layers[0].self_attention).__name__ == "MLASelfAttention"
    assert model.decoder.layers[0].mlp.__class__.__name__ == "MLP"  # the first dense layer
    assert [r.layer_number for r in model.tier_routers()] == [2, 3]
    b = tiny_batch(6)
    fused = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    fused.sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("linear_kv_down_proj" in n for n in fused_grads)
    model.zero_grad(set_to_none=True)
    for j in range(3):
        model.set_path_tiers([j])
        alone = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
        torch.testing.assert_close(fused[j * BATCH : (j + 1) * BATCH], alone, atol=1e-6, rtol=1e-5)
        alone.sum().backward()
    model.set_path_tiers([0, 1, 2])
    for name, grad in fused_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())
