"""``--qk-layernorm-scope projection`` (runtime.qk_norm): OLMoE's q/k RMSNorm over the whole projection."""

import argparse
import types

import pytest
import torch

from ordmoe_megatron import OrdMoEConfig
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime.model_flags import (
    add_model_args,
    flags_from_args,
    flags_to_argv,
    gpt_model_from_flags,
    normalize_flags,
    transformer_config_from_flags,
)
from ordmoe_megatron.runtime.qk_norm import ProjectionKNorm, ProjectionQNorm

FLAGS = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    group_query_attention=True,
    num_query_groups=2,
    kv_channels=8,
    num_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    ffn_hidden_size=48,
    normalization="RMSNorm",
    swiglu=True,
    disable_bias_linear=True,
    position_embedding_type="rope",
    qk_layernorm=True,
    qk_layernorm_scope="projection",
    vocab_size=64,
    seq_length=12,
)


def _rms_over_projection(x, weight, eps):
    """The hand-written reference: one RMS per token over heads*head_dim (OLMoE's q_norm/k_norm)."""
    flat = x.reshape(*x.shape[:-2], -1).double()
    out = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out.reshape(x.shape)


@pytest.mark.parametrize("cls, heads", [(ProjectionQNorm, 4), (ProjectionKNorm, 2)])
def test_the_norm_is_rmsnorm_over_the_whole_projection(cls, heads):
    config = types.SimpleNamespace(num_attention_heads=4, num_query_groups=2, params_dtype=torch.float32)
    norm = cls(config=config, hidden_size=8, eps=1e-5)
    assert norm.weight.shape == (heads * 8,) and torch.equal(norm.weight, torch.ones(heads * 8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(heads * 8, generator=gen))
    x = torch.randn(5, 3, heads, 8, generator=gen) * torch.arange(1, heads + 1).view(heads, 1)  # heads differ in scale
    got = norm(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), _rms_over_projection(x, norm.weight, 1e-5), rtol=1e-5, atol=1e-6)
    # it is not the per-head norm: heads of different scale keep their relative scale
    per_head = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.view(heads, 8)
    assert (got - per_head).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"expected \[\.\.\., %d, 8\]" % heads):
        norm(torch.randn(5, 3, heads + 1, 8))


@pytest.mark.parametrize(
    "edit, overrides, message",
    [
        (dict(qk_layernorm=False), {}, "--qk-layernorm-scope projection sets where .*pass --qk-layernorm too"),
        (dict(normalization="LayerNorm"), {}, "is an RMSNorm .*pass --normalization RMSNorm"),
        (
            dict(multi_latent_attention=True),
            {},
            "multi-latent attention has its own latent norms",
        ),
        ({}, dict(tensor_model_parallel_size=2), r"would need an all-reduce.*--tensor-model-parallel-size 1 \(got 2\)"),
    ],
)
def test_settings_the_projection_scope_cannot_honour_are_refused(edit, overrides, message):
    with pytest.raises(OrdMoEError, match=message):
        transformer_config_from_flags({**FLAGS, **edit}, **overrides)


def test_a_scope_not_in_the_choices_is_refused():
    with pytest.raises(OrdMoEError, match="qk_layernorm_scope='tensor' not in"):
        normalize_flags({**FLAGS, "qk_layernorm_scope": "tensor"})


def test_the_flag_parses_and_only_the_projection_scope_is_spelled_out():
    parser = add_model_args(argparse.ArgumentParser())
    assert parser.parse_args([]).qk_layernorm_scope == "head"
    argv = flags_to_argv(FLAGS)
    assert argv[argv.index("--qk-layernorm-scope") + 1] == "projection"
    assert flags_from_args(parser.parse_args(argv)) == normalize_flags(FLAGS)
    # the default stays off the Megatron-LM command line (pretrain_gpt.py has no such flag)
    assert "--qk-layernorm-scope" not in flags_to_argv({**FLAGS, "qk_layernorm_scope": "head"})


@pytest.mark.parametrize("model", ["gpt", "ordmoe", "ordmoe-dense-first-mtp"])
def test_the_built_model_has_the_projection_norm_in_every_layer(megatron_single_process, model):
    """Every decoder layer (and the MTP layer), through the local layer spec and the decoder block
    spec (a dense first layer), for GPTModel and OrdMoEGPTModel; GPTModel's loss reaches the norm
    weights of every layer."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel

    flags = dict(FLAGS)
    if model == "ordmoe-dense-first-mtp":
        flags.update(num_layers=3, moe_layer_freq=[0, 1, 1], mtp_num_layers=1)
    config = transformer_config_from_flags(
        flags, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, moe_aux_loss_coeff=0.0
    )
    model_parallel_cuda_manual_seed(3)
    extra = {} if model == "gpt" else dict(model_class=OrdMoEGPTModel, ordmoe=OrdMoEConfig())
    gpt = gpt_model_from_flags(flags, config, pre_process=True, post_process=True, **extra)
    attentions = [m for name, m in gpt.named_modules() if name.endswith("self_attention")]
    assert len(attentions) == flags["num_layers"] + (flags.get("mtp_num_layers") or 0)
    for attn in attentions:
        assert type(attn.q_layernorm) is ProjectionQNorm and attn.q_layernorm.weight.shape == (32,)
        assert type(attn.k_layernorm) is ProjectionKNorm and attn.k_layernorm.weight.shape == (16,)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).unsqueeze(0).expand_as(tokens)
    if model == "gpt":
        out = gpt(tokens, pos, None, labels=tokens)
        out.float().mean().backward()
        assert all(a.q_layernorm.weight.grad.abs().sum() > 0 for a in attentions)


SMOKE = (
    "--mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --num-experts 8 --moe-router-topk 2 --ffn-hidden-size 64 --moe-ffn-hidden-size 32 "
    "--normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope --qk-layernorm "
    "--qk-layernorm-scope projection --seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 "
    "--global-batch-size 2 --train-iters 3 --log-interval 1"
).split()


@pytest.mark.one_version
def test_ordmoe_pretrain_trains_with_the_projection_scope(tmp_path):
    """A few ordmoe-pretrain steps with --qk-layernorm-scope projection (OrdMoE's three paths);
    the scope is recorded with the run's model flags."""
    import json

    from tests.support import run_pretrain

    proc = run_pretrain(*SMOKE, "--work-dir", str(tmp_path / "w"), "--save", str(tmp_path / "ckpt"))
    assert " iteration        3/       3" in proc.stdout and "path logprob" in proc.stdout
    run = json.loads((tmp_path / "ckpt" / "iter_0000003" / "run.json").read_text())
    assert run["model_flags"]["qk_layernorm_scope"] == "projection"
