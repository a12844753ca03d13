"""Training FLOPs of a step: the plain GPT count by hand, and what the OrdMoE paths add."""

import pytest

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.mcore.flops import gpt_step_flops, ordmoe_run_step_flops, ordmoe_step_flops


def _config(mla=False, **extra):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kwargs = dict(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        ffn_hidden_size=16,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=6,
        moe_layer_freq=[0, 1],
        use_cpu_initialization=True,
    )
    kwargs.update(extra)
    return (MLATransformerConfig if mla else TransformerConfig)(**kwargs)


def test_gpt_step_flops_by_hand():
    h, s, vocab = 8, 10, 32
    attention = 2 * h * (3 * h) + 2 * h * h + 2 * s * h  # QKV, projection, causal scores
    dense = 2 * h * 16 * 2  # two matmuls, no gating
    moe = 2 * h * 4 + 2 * h * (2 * 6) * 2  # router, top-2 experts
    per_token = 2 * attention + dense + moe + 2 * h * vocab
    assert gpt_step_flops(_config(), vocab, sequences=3, seq_length=s) == pytest.approx(3 * per_token * 3 * s)
    gated = gpt_step_flops(_config(gated_linear_unit=True), vocab, 3, s)
    assert gated - gpt_step_flops(_config(), vocab, 3, s) == pytest.approx(3 * 3 * s * (2 * h * 16 + 2 * h * 12))
    first_layer = gpt_step_flops(_config(), vocab, 3, s, layers=[0], output_layer=False)
    assert first_layer == pytest.approx(3 * (attention + dense) * 3 * s)


def test_ordmoe_step_flops():
    cfg = _config()
    plain = gpt_step_flops(cfg, 32, 4, 10)
    assert ordmoe_run_step_flops(cfg, 32, 4, 10) == plain
    assert ordmoe_run_step_flops(cfg, 32, 4, 10, OrdMoEConfig(num_tiers=3)) == pytest.approx(3 * plain)
    assert ordmoe_run_step_flops(cfg, 32, 4, 10, OrdMoEConfig(num_tiers=1)) == plain
    shared = gpt_step_flops(cfg, 32, 4, 10, layers=[0], output_layer=False)
    assert ordmoe_run_step_flops(cfg, 32, 4, 10, OrdMoEConfig(num_tiers=3), shared_prefix_layers=1) == pytest.approx(
        3 * plain - 2 * shared
    )
    # Lower paths on a quarter of each micro-batch of 8: 1 + 2 x 1/4 plain steps.
    assert ordmoe_run_step_flops(
        cfg, 32, 4, 10, OrdMoEConfig(num_tiers=3, lower_path_fraction=0.25), micro_batch_size=8
    ) == pytest.approx(1.5 * plain)
    assert ordmoe_step_flops(10.0, 2.0, 3, 0.5) == pytest.approx(10 + 2 * 0.5 * 8)


def test_mla_and_mtp_flops_by_hand():
    h, s, vocab, heads = 8, 10, 32, 2
    mla = dict(q_lora_rank=4, kv_lora_rank=3, qk_head_dim=5, qk_pos_emb_head_dim=2, v_head_dim=6)
    cfg = _config(mla=True, multi_latent_attention=True, **mla)
    q = 4 * (h + heads * 7 + 1)  # down, up, the norm between
    kv = 3 * (h + heads * (5 + 6) + 1) + h * 2  # down, up, norm; the shared RoPE key
    attention = 2 * (q + kv + heads * 6 * h) + s * heads * (7 + 6)  # projections, causal scores
    dense, moe = 2 * h * 16 * 2, 2 * h * 4 + 2 * h * (2 * 6) * 2
    per_token = 2 * attention + dense + moe + 2 * h * vocab
    assert gpt_step_flops(cfg, vocab, 3, s) == pytest.approx(3 * per_token * 3 * s)
    # One MTP layer: norms, the [embedding, hidden] projection, a layer like the last (MoE), its
    # output layer; not counted for a subset of layers or without the output layer.
    with_mtp = _config(mtp_num_layers=1)
    mtp_layer = 3 * h + 4 * h * h + (2 * h * (3 * h) + 2 * h * h + 2 * s * h) + moe + 2 * h * vocab
    assert gpt_step_flops(with_mtp, vocab, 3, s) - gpt_step_flops(_config(), vocab, 3, s) == pytest.approx(
        3 * mtp_layer * 3 * s
    )
    assert gpt_step_flops(with_mtp, vocab, 3, s, mtp=False) == gpt_step_flops(_config(), vocab, 3, s)
    assert gpt_step_flops(with_mtp, vocab, 3, s, layers=[0], output_layer=False) == gpt_step_flops(
        _config(), vocab, 3, s, layers=[0], output_layer=False
    )
    # The lower paths skip the MTP block (path 1's alone).
    plain = gpt_step_flops(with_mtp, vocab, 4, s)
    mtp = plain - gpt_step_flops(_config(), vocab, 4, s)
    assert ordmoe_run_step_flops(with_mtp, vocab, 4, s, OrdMoEConfig(num_tiers=3)) == pytest.approx(
        plain + 2 * (plain - mtp)
    )
