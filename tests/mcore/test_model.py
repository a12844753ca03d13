"""OrdMoEGPTModel: fused multi-path forward, and C=1 equal to plain Megatron training."""

import functools

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.runtime.distributed import device
from ordmoe_megatron.testing import run_on_ranks

VOCAB, SEQ, BATCH = 64, 12, 2


def _transformer_config(**extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        normalization="RMSNorm",
    )
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def _build(ordmoe=None, seed=7, **extra):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel

    config = _transformer_config(**extra)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    if ordmoe is None:
        return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ).to(device())
    return OrdMoEGPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, ordmoe=ordmoe).to(device())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask, position_ids=position_ids)
    return {k: v.to(device()) for k, v in batch.items()}


def test_ordmoe_adds_no_parameters(megatron_single_process):
    plain = _build()
    ordmoe = _build(OrdMoEConfig(num_tiers=3))
    assert plain.state_dict().keys() == ordmoe.state_dict().keys()

    def tensors(model):
        return [v for v in model.state_dict().values() if isinstance(v, torch.Tensor)]

    assert all(torch.equal(a, b) for a, b in zip(tensors(plain), tensors(ordmoe)))


def test_fused_forward_equals_separate_tier_forwards(megatron_single_process):
    model = _build(OrdMoEConfig(num_tiers=3))
    b = _batch()
    fused = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    assert fused.shape == (3 * BATCH, SEQ)
    for j in range(3):
        model.set_path_tiers([j])
        alone = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        torch.testing.assert_close(fused[j * BATCH : (j + 1) * BATCH], alone, atol=1e-6, rtol=1e-5)
    model.set_path_tiers([0, 1, 2])
    # The lower tiers are genuinely different forwards.
    assert not torch.allclose(fused[:BATCH], fused[2 * BATCH :])


def test_precomputed_decoder_input_gives_the_same_paths(megatron_single_process):
    model = _build(OrdMoEConfig(num_tiers=3))
    b = _batch(1)
    from_ids = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    embedded = model.embedding(input_ids=b["tokens"], position_ids=b["position_ids"])
    from_embeddings = model(None, b["position_ids"], None, decoder_input=embedded, labels=b["labels"])
    assert torch.equal(from_ids, from_embeddings)


def test_partial_layer_scope_leaves_paths_identical_before_the_first_scoped_layer(megatron_single_process):
    model = _build(OrdMoEConfig(num_tiers=3, layer_scope="3", lazy_fanout=False))
    captured = {}
    layer2 = model.decoder.layers[1]

    def keep_output(module, inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    layer2.register_forward_hook(keep_output)
    b = _batch(2)
    model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    h = captured["h"].view(SEQ, 3, BATCH, -1)
    # The same values, computed in different rows of one batched GEMM: CPU kernels may round a row
    # differently by its position, so equal up to float32 rounding, not bit for bit.
    torch.testing.assert_close(h[:, 1], h[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h[:, 2], h[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["2-3", "3"])
def test_lazy_fanout_gives_the_same_losses_and_gradients_as_full_fanout(megatron_single_process, scope):
    lazy = _build(OrdMoEConfig(num_tiers=3, layer_scope=scope))
    full = _build(OrdMoEConfig(num_tiers=3, layer_scope=scope, lazy_fanout=False))
    assert lazy.fanout_layer == int(scope[0]) and full.fanout_layer is None
    b = _batch(3)
    out_lazy = lazy(b["tokens"], b["position_ids"], None, labels=b["labels"])
    out_full = full(b["tokens"], b["position_ids"], None, labels=b["labels"])
    assert out_lazy.shape == out_full.shape == (3 * BATCH, SEQ)
    assert torch.allclose(out_lazy, out_full, atol=1e-6, rtol=0)
    out_lazy.sum().backward()
    out_full.sum().backward()
    for (name, p_lazy), p_full in zip(lazy.named_parameters(), full.parameters()):
        assert torch.allclose(p_lazy.grad, p_full.grad, atol=1e-5, rtol=1e-4), name


def _plain_loss_func(loss_mask, output_tensor):
    """Megatron-LM pretrain_gpt.py's loss function, for reference."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def _train(model, loss_func, steps=3, num_microbatches=2):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # A backward outside the schedules leaves a 0-d aux-loss scale that the schedules cannot copy into.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [_batch(100 + i) for i in range(steps * num_microbatches)]
    losses, grads = [], []
    for step in range(steps):
        data = iter(batches[step * num_microbatches : (step + 1) * num_microbatches])

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            return out, functools.partial(loss_func, b["loss_mask"])

        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=False,
        )
        losses.append(torch.stack([r["lm loss"] for r in reports]))
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return losses, grads


def _single_tier_and_plain_training(rank, world_size, extra):
    from ordmoe_megatron.mcore.loss import ordmoe_loss
    from ordmoe_megatron.runtime.distributed import init_model_parallel

    init_model_parallel(seed=1234)
    plain = _build(**extra)
    ordmoe_cfg = OrdMoEConfig(num_tiers=1)
    single = _build(ordmoe_cfg, **extra)

    def ordmoe_loss_func(mask, out):
        return ordmoe_loss(mask, out, ordmoe=ordmoe_cfg, num_paths=1, vocab_size=VOCAB)

    return _train(plain, _plain_loss_func), _train(single, ordmoe_loss_func)


@pytest.mark.parametrize(
    "extra", [dict(), dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)]
)
def test_single_tier_trains_bit_identically_to_plain_megatron(extra):
    # On the CPU by design (a gloo process): bit for bit on its deterministic kernels. The GPU's
    # version, with deterministic algorithms, is in tests/gpu.
    (((plain_losses, plain_grads), (single_losses, single_grads)),) = run_on_ranks(
        _single_tier_and_plain_training, 1, extra
    )
    for step in range(3):
        assert torch.equal(plain_losses[step], single_losses[step])
        assert all(torch.equal(a, b) for a, b in zip(plain_grads[step], single_grads[step]))
    assert not torch.equal(plain_losses[0], plain_losses[2])  # it did train
