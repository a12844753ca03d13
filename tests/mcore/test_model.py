"""OrdMoEGPTModel: fused multi-path forward, and C=1 equal to plain Megatron training."""

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from tests.support import BATCH, SEQ, run_on_ranks, single_tier_and_plain_training, tiny_batch, tiny_model


def test_ordmoe_adds_no_parameters(megatron_single_process):
    plain = tiny_model()
    ordmoe = tiny_model(OrdMoEConfig(num_tiers=3))
    assert plain.state_dict().keys() == ordmoe.state_dict().keys()

    def tensors(model):
        return [v for v in model.state_dict().values() if isinstance(v, torch.Tensor)]

    assert all(torch.equal(a, b) for a, b in zip(tensors(plain), tensors(ordmoe)))


def test_fused_forward_equals_separate_tier_forwards(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3))
    b = tiny_batch()
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
    model = tiny_model(OrdMoEConfig(num_tiers=3))
    b = tiny_batch(1)
    from_ids = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    embedded = model.embedding(input_ids=b["tokens"], position_ids=b["position_ids"])
    from_embeddings = model(None, b["position_ids"], None, decoder_input=embedded, labels=b["labels"])
    assert torch.equal(from_ids, from_embeddings)


def test_packed_sequences_with_sub_sampled_lower_paths_are_refused(megatron_single_process):
    # Packed sequences run (tests/mcore/test_packed.py); a packed row has no rows to sub-sample.
    from ordmoe_megatron.errors import OrdMoEError
    from tests.support import packed_batch

    model = tiny_model(OrdMoEConfig(num_tiers=3), packed=True)
    b = packed_batch(tiny_batch(1))
    model.set_path_rows(torch.tensor([0]))
    with pytest.raises(OrdMoEError, match="--ordmoe-lower-path-fraction below 1 with packed sequences"):
        model(b["tokens"], b["position_ids"], None, labels=b["labels"], packed_seq_params=b["packed_seq_params"])


def test_partial_layer_scope_leaves_paths_identical_before_the_first_scoped_layer(megatron_single_process):
    model = tiny_model(OrdMoEConfig(num_tiers=3, layer_scope="3", lazy_fanout=False))
    captured = {}
    layer2 = model.decoder.layers[1]

    def keep_output(module, inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    layer2.register_forward_hook(keep_output)
    b = tiny_batch(2)
    model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    h = captured["h"].view(SEQ, 3, BATCH, -1)
    # The same values, computed in different rows of one batched GEMM: CPU kernels may round a row
    # differently by its position, so equal up to float32 rounding, not bit for bit.
    torch.testing.assert_close(h[:, 1], h[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h[:, 2], h[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["2-3", "3"])
def test_lazy_fanout_gives_the_same_losses_and_gradients_as_full_fanout(megatron_single_process, scope):
    lazy = tiny_model(OrdMoEConfig(num_tiers=3, layer_scope=scope))
    full = tiny_model(OrdMoEConfig(num_tiers=3, layer_scope=scope, lazy_fanout=False))
    assert lazy.fanout_layer == int(scope[0]) and full.fanout_layer is None
    b = tiny_batch(3)
    out_lazy = lazy(b["tokens"], b["position_ids"], None, labels=b["labels"])
    out_full = full(b["tokens"], b["position_ids"], None, labels=b["labels"])
    assert out_lazy.shape == out_full.shape == (3 * BATCH, SEQ)
    assert torch.allclose(out_lazy, out_full, atol=1e-6, rtol=0)
    out_lazy.sum().backward()
    out_full.sum().backward()
    for (name, p_lazy), p_full in zip(lazy.named_parameters(), full.parameters()):
        assert torch.allclose(p_lazy.grad, p_full.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize(
    "extra", [dict(), dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)]
)
def test_single_tier_trains_bit_identically_to_plain_megatron(extra):
    # On the CPU by design (a gloo process): bit for bit on its deterministic kernels. The GPU's
    # version, with deterministic algorithms, is in tests/gpu.
    (((plain_losses, plain_grads), (single_losses, single_grads)),) = run_on_ranks(
        single_tier_and_plain_training, 1, extra
    )
    for step in range(3):
        assert torch.equal(plain_losses[step], single_losses[step])
        assert all(torch.equal(a, b) for a, b in zip(plain_grads[step], single_grads[step]))
    assert not torch.equal(plain_losses[0], plain_losses[2])  # it did train
