"""HF <-> Megatron-Core checkpoint conversion on tiny random models (fp32, CPU).

For every supported family: the converted Megatron model's logits equal the HF model's; import
then export gives back bit-identical tensors and the same config.json; the export loads with
AutoModelForCausalLM. Every bad input fails with an error naming the problem and leaves existing
outputs untouched. A 2-process run checks resharding (EP 2 -> PP 2) and exporting a checkpoint
saved in another parallel layout.
"""

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ordmoe_megatron.convert import (  # noqa: E402
    ConversionError,
    hf_to_mcore,
    mcore_io,  # noqa: E402
    mcore_to_hf,
)
from ordmoe_megatron.errors import OrdMoEError  # noqa: E402
from ordmoe_megatron.runtime import checkpointing, compat  # noqa: E402
from ordmoe_megatron.runtime.distributed import device  # noqa: E402
from tests.support import on_device  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ, BATCH = 96, 12, 2


def _configs():
    from transformers import (
        DeepseekV3Config,
        Glm4MoeConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts_per_tok=2,
    )
    return {
        # always renormalised top-k (== Megatron top-k then softmax)
        "mixtral": lambda: MixtralConfig(
            **common, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, rms_norm_eps=1e-5
        ),
        # shared expert + sigmoid gate, q/k/v bias, a dense layer, softmax-then-top-k
        "qwen2_moe": lambda: Qwen2MoeConfig(
            **common,
            intermediate_size=40,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=3,
            num_experts=8,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        # per-head q/k norm, head_dim != hidden/heads, renormalised top-k, tied embeddings
        "qwen3_moe": lambda: Qwen3MoeConfig(
            **common,
            intermediate_size=40,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_experts=8,
            head_dim=24,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
        # DeepSeek-V3 routing (sigmoid + e_score_correction_bias, 2 groups of 4 experts, top-2 from
        # one group, scaled), a shared expert, a first dense layer, q/k/v bias, per-head q/k norm,
        # RoPE on half of each head
        "glm4_moe": lambda: Glm4MoeConfig(
            **common,
            intermediate_size=40,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            use_qk_norm=True,
            attention_bias=True,
            head_dim=24,
            num_nextn_predict_layers=0,
        ),
        # multi-latent attention (query and key-value latents with their norms, interleaved RoPE on
        # part of each head, a rope_theta that is not the default) with the glm4_moe routing
        "deepseek_v3": lambda: DeepseekV3Config(**_deepseek_v3_fields()),
        # q/k norms over the whole projection (k: the 2 key heads), softmax-then-top-k
        "olmoe": lambda: OlmoeConfig(**_olmoe_fields()),
    }


def _olmoe_fields(**edits):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts_per_tok=2,
        intermediate_size=40,
        num_hidden_layers=2,
        num_experts=8,
        norm_topk_prob=False,
    )
    return {**fields, **edits}


def _deepseek_v3_fields(**edits):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        num_experts_per_tok=2,
        intermediate_size=40,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    )
    return {**fields, **edits}


FAMILIES = list(_configs())  # one tiny random model per family of convert.FAMILIES


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the expert bias moves the top-k choice
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def _tokens(seed=0):
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _mcore_logits(mcore_dir, tokens):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)  # forward forks the RNG tracker
    flags = mcore_io.read_model_args(mcore_dir)
    model = mcore_io.build_model(flags, device="cpu")
    mcore_io.load_model_weights(model, mcore_dir)
    model = model.to(device()).eval()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(on_device(tokens), on_device(pos), None).cpu()


def _tensors(path):
    from safetensors import safe_open

    out = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _config(path):
    with open(os.path.join(path, "config.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def work(tmp_path_factory, megatron_single_process):
    return tmp_path_factory.mktemp("convert")


_cache = {}


def _hf_dir(work, family):
    path = str(work / f"hf-{family}")
    if not os.path.exists(path):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_configs()[family](), dtype=torch.float32)
        _randomize(model, seed=FAMILIES.index(family))
        model.save_pretrained(path)
    return path


def _mcore_dir(work, family):
    path = str(work / f"mcore-{family}")
    if not os.path.exists(path):
        _cache[("flags", family)] = hf_to_mcore(_hf_dir(work, family), path)
    return path


def _export_dir(work, family):
    path = str(work / f"back-{family}")
    if not os.path.exists(path):
        mcore_to_hf(_mcore_dir(work, family), path)
    return path


# ----------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_match_hf(work, family):
    tokens = _tokens()
    ref = _hf_logits(_hf_dir(work, family), tokens)
    got = _mcore_logits(_mcore_dir(work, family), tokens)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4
    # the test has teeth: a random model's logits are far from a permuted one's
    assert (ref - ref.roll(1, dims=-1)).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_roundtrip_is_bit_identical(work, family):
    src, back = _hf_dir(work, family), _export_dir(work, family)
    assert _config(back) == _config(src)
    a, b = _tensors(src), _tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_with_from_pretrained(work, family):
    tokens = _tokens(1)
    ref = _hf_logits(_hf_dir(work, family), tokens)
    got = _hf_logits(_export_dir(work, family), tokens)
    assert torch.equal(got, ref)


def _mean_loglik(logits, tokens):
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    return logp.gather(-1, tokens[:, 1:, None]).mean().item()


def _deepseek_v3_q_proj_dir(work):
    """DeepSeek-V3 with q_lora_rank=None: a full query projection (q_proj <-> linear_q_proj)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    path = str(work / "hf-deepseek_v3-q-proj")
    if not os.path.exists(path):
        torch.manual_seed(0)
        config = DeepseekV3Config(**_deepseek_v3_fields(q_lora_rank=None, rope_parameters=None))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, seed=11)
        model.save_pretrained(path)
    return path


@pytest.mark.parametrize("variant", ["q-lora", "q-proj"])
def test_deepseek_v3_loglik_matches_hf_in_float64(work, variant):
    """Multi-latent attention through the converted megatron-core model (the project's local MLA
    core attention): the log-likelihood equals transformers' in float64 within 1e-4, with the
    query latent (q_a_proj, q_a_layernorm, q_b_proj) and without it (q_proj); export gives back
    the same tensors."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoModelForCausalLM

    if variant == "q-lora":
        hf, mcore = _hf_dir(work, "deepseek_v3"), _mcore_dir(work, "deepseek_v3")
    else:
        hf, mcore = _deepseek_v3_q_proj_dir(work), str(work / "mcore-deepseek_v3-q-proj")
        problem = compat.mla_query_projection_problem(None)
        if problem:  # megatron-core 0.19's local spec cannot build it: refused before any output
            with pytest.raises(OrdMoEError, match="--q-lora-rank") as err:
                hf_to_mcore(hf, mcore)
            assert str(err.value) == problem and not os.path.exists(mcore)
            return
        if not os.path.exists(mcore):
            hf_to_mcore(hf, mcore)
    flags = mcore_io.read_model_args(mcore)
    assert flags["multi_latent_attention"] and flags["qk_layernorm"] and flags["rope_type"] == "rope"
    assert flags["q_lora_rank"] == (24 if variant == "q-lora" else None)
    assert flags["moe_router_num_groups"] == 2 and flags["moe_router_enable_expert_bias"]
    assert flags["rotary_base"] == (50000 if variant == "q-lora" else 10000)
    tokens = _tokens(4)
    ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(tokens).logits
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    model = mcore_io.build_model(flags, device="cpu")
    mcore_io.load_model_weights(model, mcore)
    model = model.double().eval()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        got = model(tokens, pos, None)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert abs(_mean_loglik(got, tokens) - _mean_loglik(ref, tokens)) < 1e-4
    assert (got - ref).abs().max().item() < 1e-4
    if variant == "q-proj":
        back = str(work / "back-deepseek_v3-q-proj")
        mcore_to_hf(mcore, back)
        assert _config(back) == _config(hf)
        a, b = _tensors(hf), _tensors(back)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert "model.layers.0.self_attn.q_proj.weight" in a


def _olmoe_renormalised_dir(work):
    """OLMoE with norm_topk_prob=True (top-k then softmax in Megatron) and tied embeddings."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    path = str(work / "hf-olmoe-renormalised")
    if not os.path.exists(path):
        torch.manual_seed(0)
        config = OlmoeConfig(**_olmoe_fields(norm_topk_prob=True, tie_word_embeddings=True, num_key_value_heads=4))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, seed=12)
        model.save_pretrained(path)
    return path


@pytest.mark.parametrize("variant", ["unnormalised", "renormalised"])
def test_olmoe_loglik_matches_hf_in_float64(work, variant):
    """OLMoE's q_norm/k_norm over the whole projection (qk_layernorm_scope='projection'), with
    norm_topk_prob False (softmax over all, top-k == moe_router_pre_softmax) and True (renormalised
    == top-k then softmax), GQA and not, tied embeddings and not: the converted model's
    log-likelihood equals transformers' in float64 within 1e-4; export gives back the same tensors."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoModelForCausalLM

    from ordmoe_megatron.runtime.qk_norm import ProjectionKNorm, ProjectionQNorm

    if variant == "unnormalised":
        hf, mcore = _hf_dir(work, "olmoe"), _mcore_dir(work, "olmoe")
    else:
        hf, mcore = _olmoe_renormalised_dir(work), str(work / "mcore-olmoe-renormalised")
        if not os.path.exists(mcore):
            hf_to_mcore(hf, mcore)
    flags = mcore_io.read_model_args(mcore)
    assert flags["qk_layernorm"] and flags["qk_layernorm_scope"] == "projection"
    assert flags["moe_router_pre_softmax"] == (variant == "unnormalised")
    assert flags["untie_embeddings_and_output_weights"] == (variant == "unnormalised")
    tokens = _tokens(5)
    ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(tokens).logits
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    model = mcore_io.build_model(flags, device="cpu")
    attn = model.decoder.layers[0].self_attention
    assert type(attn.q_layernorm) is ProjectionQNorm and type(attn.k_layernorm) is ProjectionKNorm
    kv_heads = 2 if variant == "unnormalised" else 4
    assert attn.q_layernorm.weight.shape == (64,) and attn.k_layernorm.weight.shape == (kv_heads * 16,)
    mcore_io.load_model_weights(model, mcore)
    model = model.double().eval()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        got = model(tokens, pos, None)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert abs(_mean_loglik(got, tokens) - _mean_loglik(ref, tokens)) < 1e-4
    assert (got - ref).abs().max().item() < 1e-4
    back = str(work / f"back-olmoe-{variant}")
    if not os.path.exists(back):
        mcore_to_hf(mcore, back)
    assert _config(back) == _config(hf)
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_olmoe_flags_belong_to_olmoe_only(work):
    """Export without HF metadata infers OLMoE from the projection scope; the per-head families
    refuse it, and OLMoE refuses the per-head scope."""
    from ordmoe_megatron.convert.families import FAMILIES, infer_family

    flags = mcore_io.read_model_args(_mcore_dir(work, "olmoe"))
    assert infer_family(flags).model_type == "olmoe"
    for name, fam in FAMILIES.items():
        if name != "olmoe":
            with pytest.raises(ConversionError):
                fam.config.to_hf(flags)
    # Qwen3-MoE has per-head q/k norms and the same routing: only the scope tells the two apart
    with pytest.raises(ConversionError, match="qk_layernorm_scope='projection'.*it needs qk_layernorm_scope='head'"):
        FAMILIES["qwen3_moe"].config.to_hf({**flags, "kv_channels": None})
    with pytest.raises(ConversionError, match="it needs qk_layernorm_scope='projection'"):
        FAMILIES["olmoe"].config.to_hf({**flags, "qk_layernorm_scope": "head"})


def test_model_args_and_flags(work):
    from ordmoe_megatron.runtime.model_flags import add_model_args, flags_from_args, flags_to_argv

    mcore = _mcore_dir(work, "qwen2_moe")
    with open(os.path.join(mcore, mcore_io.TRACKER)) as fh:
        assert fh.read() == "release"
    flags = mcore_io.read_model_args(mcore)
    assert flags["moe_layer_freq"] == [1, 0, 1]
    assert flags["moe_shared_expert_gate"] and flags["moe_router_pre_softmax"]
    assert flags["add_qkv_bias"] and flags["padded_vocab_size"] == VOCAB
    # the printed flags parse back (with Megatron-LM's spelling) to the same model flags
    import argparse

    parser = add_model_args(argparse.ArgumentParser())
    parsed = flags_from_args(parser.parse_args(flags_to_argv(flags)))
    assert {k: v for k, v in parsed.items() if k != "padded_vocab_size"} == {
        k: v for k, v in flags.items() if k != "padded_vocab_size"
    }
    q3 = mcore_io.read_model_args(_mcore_dir(work, "qwen3_moe"))
    assert q3["qk_layernorm"] and q3["kv_channels"] == 24 and not q3["moe_router_pre_softmax"]
    assert not q3["untie_embeddings_and_output_weights"]


def test_sharded_export_and_no_metadata_export(work):
    """Export in several safetensors shards (with index) and import that back; and export an
    ``iter_XXXXXXX`` checkpoint saved by training (flags in run.json, no HF metadata): the
    family is inferred from the flags."""
    mcore = _mcore_dir(work, "qwen2_moe")
    out = str(work / "sharded")
    mcore_to_hf(mcore, out, max_shard_size="40KB")
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    a, b = _tensors(_hf_dir(work, "qwen2_moe")), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a sharded (index + shards) HF checkpoint imports to the same flags
    again = str(work / "sharded-mcore")
    assert hf_to_mcore(out, again) == mcore_io.read_model_args(mcore)

    bare = str(work / "bare-mcore")
    shutil.copytree(_mcore_dir(work, "qwen3_moe"), bare)
    os.remove(os.path.join(bare, mcore_io.HF_METADATA))
    # laid out like an ordmoe-pretrain save: iteration dir, flags in its run.json, vocab padding
    # left to Megatron (the export takes the embedding rows from the checkpoint)
    flags = mcore_io.read_model_args(bare)
    os.remove(os.path.join(bare, mcore_io.MODEL_ARGS))
    os.rename(os.path.join(bare, "release"), os.path.join(bare, "iter_0000007"))
    with open(os.path.join(bare, mcore_io.TRACKER), "w") as fh:
        fh.write("7")
    flags.update(padded_vocab_size=None, make_vocab_size_divisible_by=128)
    with open(os.path.join(bare, "iter_0000007", checkpointing.RUN_FILE), "w") as fh:
        json.dump({"iteration": 7, "model_flags": flags}, fh)
    out2 = str(work / "bare-hf")
    values = mcore_to_hf(bare, out2)
    assert values["architectures"] == ["Qwen3MoeForCausalLM"]
    tokens = _tokens(2)
    assert torch.equal(_hf_logits(out2, tokens), _hf_logits(_hf_dir(work, "qwen3_moe"), tokens))


# ----------------------------------------------------------------------------------------------
# Megatron-LM checkpoints: the flags from common.pt's args
# ----------------------------------------------------------------------------------------------
def _megatron_lm_variant(work, family, name, **args_edits):
    """The converted checkpoint laid out as ``pretrain_gpt.py --save`` writes it: an iteration
    directory named by the tracker, no model_args.json and no HF metadata, and the model's
    arguments only in ``common.pt``'s ``args`` namespace, under Megatron-LM's names (with the enum
    and signal values a real one holds, and arguments that are not the model's)."""
    import argparse
    import signal

    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    src = _mcore_dir(work, family)
    flags = mcore_io.read_model_args(src)
    dst = str(work / f"mlm-{name}")
    shutil.copytree(src, dst)
    for meta in (mcore_io.MODEL_ARGS, mcore_io.HF_METADATA):
        os.remove(os.path.join(dst, meta))
    os.rename(os.path.join(dst, "release"), os.path.join(dst, "iter_0000004"))
    with open(os.path.join(dst, mcore_io.TRACKER), "w") as fh:
        fh.write("4")
    args = {k: v for k, v in flags.items() if k not in ("disable_bias_linear", "norm_epsilon")}
    if not args["group_query_attention"]:
        args["num_query_groups"] = args["num_attention_heads"]  # what Megatron-LM's validation sets
    args.update(
        add_bias_linear=not flags["disable_bias_linear"],
        layernorm_epsilon=flags["norm_epsilon"],
        transformer_impl="local",
        attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder,
        exit_signal=signal.SIGTERM,
        params_dtype=torch.float32,
        lr=1e-3,
        ordmoe=True,
        ordmoe_num_tiers=3,
    )
    args.update(args_edits)
    common = {"args": argparse.Namespace(**args), "checkpoint_version": 3.0, "iteration": 4}
    torch.save(common, os.path.join(dst, "iter_0000004", "common.pt"))
    return dst


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_megatron_lm_checkpoint_exports_with_its_own_flags(work, family):
    """No model_args.json: the flags come from common.pt's args (add_bias_linear -> no biases,
    layernorm_epsilon, query groups, the qkv bias, the shared expert, the dense layer); the export
    equals the model it came from, and its files have plain modes under umask 022."""
    src = _megatron_lm_variant(work, family, f"export-{family}")
    out = str(work / f"mlm-hf-{family}")
    old = os.umask(0o022)
    try:
        mcore_to_hf(src, out)
    finally:
        os.umask(old)
    a, b = _tensors(_hf_dir(work, family)), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _config(out)["model_type"] == family
    assert _config(out)["rms_norm_eps"] == _config(_hf_dir(work, family))["rms_norm_eps"]
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)} == {
        f: 0o644 for f in os.listdir(out)
    }


@pytest.mark.parametrize(
    "edits,message",
    [
        (dict(transformer_impl="transformer_engine"), "trained with --transformer-impl transformer_engine: its layer"),
        (dict(moe_grouped_gemm=True), "trained with --moe-grouped-gemm: grouped expert weights"),
        (dict(squared_relu=True), "trained with --squared-relu: only GeLU and SwiGLU"),
        (dict(add_bias_linear=True), "mixtral: model flag disable_bias_linear=False"),  # read, not dropped
        (dict(normalization="LayerNorm1P"), r"normalization='LayerNorm1P' not in"),
    ],
)
def test_megatron_lm_checkpoint_that_cannot_be_mapped_is_refused(work, edits, message):
    src = _megatron_lm_variant(work, "mixtral", "refused-" + "-".join(edits), **edits)
    out = _occupied(work, "outmlm-" + "-".join(edits))
    with pytest.raises(OrdMoEError, match=message):
        mcore_to_hf(src, out, force=True)
    _assert_untouched(out)


def test_megatron_lm_args_are_read_without_running_code(work, tmp_path):
    """common.pt is read with weights_only=True: a global other than the namespace and plain
    enums refuses the file, and nothing in it runs."""
    import argparse

    src = _megatron_lm_variant(work, "mixtral", "unsafe")
    ran = tmp_path / "ran"
    common_pt = os.path.join(src, "iter_0000004", "common.pt")
    from ordmoe_megatron.convert.megatron_lm_args import _allowed_globals  # the reader's own rule

    with torch.serialization.safe_globals(_allowed_globals(common_pt, common_pt)):
        common = torch.load(common_pt, weights_only=True)
    common["args"].hook = _Trap(str(ran))
    torch.save(common, common_pt)
    with pytest.raises(OrdMoEError, match=r"common.pt holds io.open, which is not read without running code"):
        mcore_to_hf(src, str(work / "unsafe-hf"))
    assert not ran.exists() and not os.path.exists(work / "unsafe-hf")
    assert isinstance(common["args"], argparse.Namespace)


def _common_state_checkpoint(path, common):
    """An iteration laid out as core_v0.19 saves it: the common state is the bytes item
    ``common_state`` of the torch_dist checkpoint (no common.pt)."""
    import io

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    data = io.BytesIO()
    torch.save([common], data)
    data.seek(0)
    os.makedirs(path / "iter_0000003")
    writer = FileSystemWriter(str(path / "iter_0000003"))
    dcp_save({"common_state/shard_0_1": data}, storage_writer=writer, no_dist=True)
    (path / mcore_io.TRACKER).write_text("3")
    return str(path)


def test_megatron_lm_args_inside_the_shards_are_read_safely(work, tmp_path):
    """core_v0.19 keeps the common state inside the shards: read as raw bytes (torch's own
    planner would unpickle them with weights_only=False), then with weights_only=True."""
    import argparse

    from ordmoe_megatron.convert.megatron_lm_args import megatron_lm_model_flags

    args = argparse.Namespace(num_layers=3, hidden_size=32, add_bias_linear=False, layernorm_epsilon=1e-6)
    root = _common_state_checkpoint(tmp_path / "v19", {"args": args, "iteration": 3})
    flags = megatron_lm_model_flags(root, "--mcore-dir")
    assert flags == dict(num_layers=3, hidden_size=32, disable_bias_linear=True, norm_epsilon=1e-6)

    ran = tmp_path / "ran"
    args.hook = _Trap(str(ran))
    root = _common_state_checkpoint(tmp_path / "v19-unsafe", {"args": args, "iteration": 3})
    with pytest.raises(OrdMoEError, match=r"holds io.open, which is not read without running code"):
        megatron_lm_model_flags(root, "--mcore-dir")
    assert not ran.exists()


class _Trap:
    """Unpickling it would call open(path, "w")."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------
# bad inputs: clear error, existing outputs untouched
# ----------------------------------------------------------------------------------------------
def _occupied(work, name):
    out = work / name
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return str(out)


def _assert_untouched(out):
    assert os.listdir(out) == ["keep.txt"]
    assert open(os.path.join(out, "keep.txt")).read() == "precious"
    parent = os.path.dirname(out)
    base = os.path.basename(out)
    assert not [f for f in os.listdir(parent) if f.startswith(f".{base}.")], "temp dir left behind"


def _hf_variant(work, family, name, config_edit=None, tensor_edit=None):
    src = _hf_dir(work, family)
    dst = str(work / f"bad-{name}")
    shutil.copytree(src, dst)
    if config_edit:
        cfg = _config(dst)
        config_edit(cfg)
        with open(os.path.join(dst, "config.json"), "w") as fh:
            json.dump(cfg, fh)
    if tensor_edit:
        tensors = _tensors(dst)
        tensor_edit(tensors)
        safetensors_torch.save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_existing_output_needs_force(work):
    out = _occupied(work, "occupied-import")
    with pytest.raises(OrdMoEError, match="already exists; pass --force"):
        hf_to_mcore(_hf_dir(work, "mixtral"), out)
    _assert_untouched(out)
    out2 = _occupied(work, "occupied-export")
    with pytest.raises(OrdMoEError, match="already exists; pass --force"):
        mcore_to_hf(_mcore_dir(work, "mixtral"), out2)
    _assert_untouched(out2)
    # with --force the output is replaced, and no temp dir is left behind
    mcore_to_hf(_mcore_dir(work, "mixtral"), out2, force=True)
    assert "config.json" in os.listdir(out2) and "keep.txt" not in os.listdir(out2)
    assert not [f for f in os.listdir(work) if f.startswith(".occupied-export.")]


def _truncate(dst):
    path = os.path.join(dst, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)


def _edit_header(edit):
    """A ``post`` step: rewrite model.safetensors' JSON header with ``edit(header) -> header``."""

    def post(dst):
        path = os.path.join(dst, "model.safetensors")
        raw = open(path, "rb").read()
        length = int.from_bytes(raw[:8], "little")
        header = edit(json.loads(raw[8 : 8 + length]))
        text = json.dumps(header).encode()
        open(path, "wb").write(len(text).to_bytes(8, "little") + text + raw[8 + length :])

    return post


def _drop_offsets(header):
    del header["model.embed_tokens.weight"]["data_offsets"]
    return header


def _alias(header):
    first, second = (header[f"model.layers.{layer}.self_attn.q_proj.weight"] for layer in (0, 1))
    second["data_offsets"] = list(first["data_offsets"])
    return header


def _index_outside(dst):
    names = list(_tensors(dst))
    index = {"metadata": {}, "weight_map": {n: "../elsewhere/model.safetensors" for n in names}}
    json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"))


L1K = "model.layers.1.self_attn.k_proj.weight"
BAD_HF = {
    "header-without-offsets": (
        "mixtral",
        dict(),
        _edit_header(_drop_offsets),
        "lacks a valid dtype, shape or data_offsets",
    ),
    "header-list": ("mixtral", dict(), _edit_header(lambda h: list(h)), "its header is a list, not an object"),
    "aliased-bytes": ("mixtral", dict(), _edit_header(_alias), "share bytes"),
    "weight-map-outside": ("mixtral", dict(), _index_outside, "outside .*shards must be files in the checkpoint"),
    "topk-above-experts": (
        "mixtral",
        dict(config_edit=lambda c: c.update(num_experts_per_tok=99)),
        None,
        "num_experts_per_tok=99 must be between 1 and the number of experts",
    ),
    "topk-zero": (
        "mixtral",
        dict(config_edit=lambda c: c.update(num_experts_per_tok=0)),
        None,
        "num_experts_per_tok=0 must be between 1",
    ),
    "truncated": ("mixtral", dict(), _truncate, "truncated"),
    "missing-tensor": ("mixtral", dict(tensor_edit=lambda t: t.pop(L1K)), None, L1K),
    "wrong-shape": (
        "qwen3_moe",
        dict(tensor_edit=lambda t: t.__setitem__("model.layers.0.mlp.experts.3.up_proj.weight", torch.zeros(31, 64))),
        None,
        r"model\.layers\.0\.mlp\.experts\.3\.up_proj\.weight has shape \[31, 64\]",
    ),
    "stray-tensor": (
        "mixtral",
        dict(tensor_edit=lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2))),
        None,
        r"model\.layers\.0\.mlp\.extra\.weight",
    ),
    "sliding-window": (
        "mixtral",
        dict(config_edit=lambda c: c.update(sliding_window=4096)),
        None,
        "sliding_window=4096",
    ),
    "qwen-sliding-window": (
        "qwen2_moe",
        dict(config_edit=lambda c: c.update(use_sliding_window=True)),
        None,
        "use_sliding_window",
    ),
    "rope-scaling": (
        "qwen3_moe",
        dict(
            config_edit=lambda c: c.update(
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
            )
        ),
        None,
        "rope_type='linear'",
    ),
    "unknown-field": (
        "mixtral",
        dict(config_edit=lambda c: c.update(quantization_config={"quant_method": "fp8"})),
        None,
        "quantization_config",
    ),
    "o-proj-bias": (
        "qwen3_moe",
        dict(config_edit=lambda c: c.update(attention_bias=True)),
        None,
        "attention_bias=True",
    ),
    "activation": ("qwen2_moe", dict(config_edit=lambda c: c.update(hidden_act="gelu")), None, "hidden_act='gelu'"),
    "deepseek-v2": (
        "mixtral",
        dict(config_edit=lambda c: c.update(model_type="deepseek_v2")),
        None,
        "'deepseek_v2' is refused: DeepSeek-V2 uses multi-latent attention",
    ),
    "olmoe-clip-qkv": (
        "olmoe",
        dict(config_edit=lambda c: c.update(clip_qkv=8.0)),
        None,
        "clip_qkv=8.0 is not supported: OLMoE then clamps q, k and v",
    ),
    "olmoe-attention-bias": (
        "olmoe",
        dict(config_edit=lambda c: c.update(attention_bias=True)),
        None,
        "attention_bias=True is not supported: OLMoE puts the bias on q/k/v",
    ),
    "olmoe-head-dim": ("olmoe", dict(config_edit=lambda c: c.update(head_dim=24)), None, "not covered.*head_dim"),
    "deepseek-v3-gqa": (
        "deepseek_v3",
        dict(config_edit=lambda c: c.update(num_key_value_heads=2)),
        None,
        "num_key_value_heads=2 is not supported: multi-latent attention",
    ),
    "deepseek-v3-rope-not-interleaved": (
        "deepseek_v3",
        dict(config_edit=lambda c: c.update(rope_interleave=False)),
        None,
        "rope_interleave=False is not supported",
    ),
    "deepseek-v3-yarn": (
        "deepseek_v3",
        dict(
            config_edit=lambda c: c.update(
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 40.0,
                    "rope_theta": 10000.0,
                    "original_max_position_embeddings": 4096,
                }
            )
        ),
        None,
        "rope_type='yarn' is not supported",
    ),
    "deepseek-v3-attention-bias": (
        "deepseek_v3",
        dict(config_edit=lambda c: c.update(attention_bias=True)),
        None,
        "attention_bias=True is not supported",
    ),
    "deepseek-v3-norm-eps": (
        "deepseek_v3",
        dict(config_edit=lambda c: c.update(rms_norm_eps=1e-5)),
        None,
        "rms_norm_eps=1e-05 is not supported: DeepSeek-V3's q_a_layernorm",
    ),
    "deepseek-v3-group-scores": (
        "deepseek_v3",
        dict(config_edit=lambda c: c.update(n_group=4, topk_group=2, num_experts_per_tok=2)),
        None,
        "n_group=4, topk_group=2, num_experts_per_tok=2: HF ranks groups by their top-2",
    ),
    "deepseek-v3-unnormalised": (
        "deepseek_v3",
        dict(config_edit=lambda c: c.update(norm_topk_prob=False)),
        None,
        "norm_topk_prob=False is not supported",
    ),
    "not-in-table": (
        "mixtral",
        dict(config_edit=lambda c: c.update(model_type="llama")),
        None,
        "'llama' is not in the mapping tables",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_bad_hf_input_fails_clearly(work, case):
    family, edits, post, pattern = BAD_HF[case]
    src = _hf_variant(work, family, case, **edits)
    if post:
        post(src)
    out = _occupied(work, f"out-{case}")
    with pytest.raises(ConversionError, match=pattern):
        hf_to_mcore(src, out, force=True)
    _assert_untouched(out)


def _mcore_variant(work, family, name, flags_edit=None, meta_edit=None):
    dst = str(work / f"badm-{name}")
    shutil.copytree(_mcore_dir(work, family), dst)
    if flags_edit:
        path = os.path.join(dst, mcore_io.MODEL_ARGS)
        flags = json.load(open(path))
        flags_edit(flags)
        json.dump(flags, open(path, "w"))
    if meta_edit:
        path = os.path.join(dst, mcore_io.HF_METADATA)
        meta = json.load(open(path))
        meta_edit(meta)
        json.dump(meta, open(path, "w"))
    return dst


def _truncate_distcp(dst):
    ckpt = os.path.join(dst, "release")
    name = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))[0]
    with open(os.path.join(ckpt, name), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(ckpt, name)) // 2)


BAD_MCORE = {
    "truncated": ("mixtral", dict(), _truncate_distcp, r"release/__0_0\.distcp: truncated checkpoint file"),
    "more-layers": (
        "mixtral",
        dict(flags_edit=lambda f: f.update(num_layers=3)),
        None,
        r"decoder\.layers\.\S+ .*has shape \[2, .*the model flags imply \[3, ",
    ),
    "wrong-hidden": (
        "qwen3_moe",
        dict(flags_edit=lambda f: f.update(moe_ffn_hidden_size=16)),
        None,
        r"linear_fc\d\.weight .*has shape",
    ),
    "missing-tensor": (
        "mixtral",
        dict(
            flags_edit=lambda f: f.update(moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True),
            meta_edit=lambda m: m.update(model_type="qwen2_moe"),
        ),
        None,
        r"missing tensor decoder\.layers\.mlp\.shared_experts\.\S+",
    ),
    "extra-tensor": (
        "qwen3_moe",
        dict(flags_edit=lambda f: f.update(qk_layernorm=False), meta_edit=lambda m: m.update(model_type="mixtral")),
        None,
        r"not part of the model .*q_layernorm",
    ),
    "not-expressible": (
        "mixtral",
        dict(flags_edit=lambda f: f.update(moe_router_pre_softmax=True)),
        None,
        "moe_router_pre_softmax=True cannot be expressed",
    ),
    "no-model-args": (
        "mixtral",
        dict(),
        lambda d: os.remove(os.path.join(d, mcore_io.MODEL_ARGS)),
        "model_args.json not found .*model flags of this checkpoint are needed",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MCORE))
def test_bad_mcore_input_fails_clearly(work, case):
    family, edits, post, pattern = BAD_MCORE[case]
    src = _mcore_variant(work, family, case, **edits)
    if post:
        post(src)
    out = _occupied(work, f"outm-{case}")
    with pytest.raises(OrdMoEError, match=pattern):
        mcore_to_hf(src, out, force=True)
    _assert_untouched(out)


# ----------------------------------------------------------------------------------------------
# CLIs
# ----------------------------------------------------------------------------------------------
def test_ordmoe_convert_both_ways(work, capsys):
    """``ordmoe-convert`` (convert/cli.py's main, what the console script and tools/ call)."""
    from ordmoe_megatron.convert.cli import main

    hf = _hf_dir(work, "mixtral")
    out = str(work / "cli-mcore")
    assert main(["hf-to-mcore", "--hf-dir", hf, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "--num-experts 4 --moe-router-topk 2" in printed
    assert "--untie-embeddings-and-output-weights" in printed
    assert main(["hf-to-mcore", "--hf-dir", hf, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ordmoe-convert: error: output ")
    assert err[-1].endswith("already exists; pass --force to replace it")
    back = str(work / "cli-hf")
    assert main(["mcore-to-hf", "--mcore-dir", out, "--out", back]) == 0
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "--qk-layernorm-scope" not in printed


def test_ordmoe_convert_says_an_olmoe_checkpoint_is_ordmoe_pretrains(work, capsys):
    from ordmoe_megatron.convert.cli import main

    assert main(["hf-to-mcore", "--hf-dir", _hf_dir(work, "olmoe"), "--out", str(work / "cli-olmoe")]) == 0
    printed = capsys.readouterr().out
    assert "--qk-layernorm --qk-layernorm-scope projection" in printed
    assert "pretrain_gpt.py builds per-head q/k norms and refuses this checkpoint" in printed


# ----------------------------------------------------------------------------------------------
# resharding (2 gloo processes)
# ----------------------------------------------------------------------------------------------
def _pipeline_logits(model, tokens):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)

    def step(data_iterator, chunk):
        out = chunk(next(data_iterator), pos, None)
        return out, lambda output, non_loss_data=False: output.detach().clone()

    result = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    return result[0] if parallel_state.is_pipeline_last_stage() else None


def _reshard_worker(rank, world_size, src, ep2_dir, tokens):
    """EP 2: load the converted (single-layout) checkpoint, forward, save in the EP-2 layout.
    Then PP 2 (EP 1): load the EP-2 checkpoint, forward through the pipeline schedule."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron.runtime.distributed import ParallelLayout, init_model_parallel
    from ordmoe_megatron.runtime.model_flags import gpt_model_from_flags, transformer_config_from_flags

    flags = mcore_io.read_model_args(src)
    common = dict(hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)

    init_model_parallel(ParallelLayout(expert=2))
    model = gpt_model_from_flags(
        flags,
        transformer_config_from_flags(
            flags, expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall", **common
        ),
    )
    mcore_io.load_model_weights(model, src)
    model.eval()
    with torch.no_grad():
        ep_logits = model(tokens, pos, None)
    mcore_io.save_checkpoint(model.sharded_state_dict(), ep2_dir)
    if rank == 0:
        for name in (mcore_io.MODEL_ARGS, mcore_io.HF_METADATA):
            shutil.copy(os.path.join(src, name), os.path.join(ep2_dir, name))

    init_model_parallel(ParallelLayout(pipeline=2))
    model_parallel_cuda_manual_seed(1)
    model = gpt_model_from_flags(flags, transformer_config_from_flags(flags, pipeline_model_parallel_size=2, **common))
    mcore_io.load_model_weights(model, ep2_dir)
    model.eval()
    with torch.no_grad():
        pp_logits = _pipeline_logits(model, tokens)
    torch.distributed.barrier()
    return ep_logits, pp_logits


def test_reshard_ep2_to_pp2_and_export(work):
    from tests.support import run_on_ranks

    tokens = _tokens(3)
    src = _mcore_dir(work, "mixtral")
    ep2 = str(work / "mcore-mixtral-ep2")
    results = run_on_ranks(_reshard_worker, 2, src, ep2, tokens, timeout=500)
    ref = _hf_logits(_hf_dir(work, "mixtral"), tokens)
    for ep_logits, _ in results:
        assert (ep_logits - ref).abs().max().item() < 1e-4
    pp_logits = results[1][1]
    assert results[0][1] is None and pp_logits is not None
    assert (pp_logits - ref).abs().max().item() < 1e-4
    # the checkpoint saved with EP 2 exports to the original tensors, bit for bit
    back = str(work / "back-mixtral-ep2")
    mcore_to_hf(ep2, back)
    a, b = _tensors(_hf_dir(work, "mixtral")), _tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _config(back) == _config(_hf_dir(work, "mixtral"))


def test_import_streams_tensors_through_disk(tmp_path):
    """Each converted tensor is written out and mapped back, so the single checkpoint save of the
    whole model reads pages from disk instead of holding every tensor in memory."""
    from ordmoe_megatron.convert.api import spill_to_disk

    for dtype in (torch.float32, torch.bfloat16):
        tensor = torch.randn(5, 7).to(dtype)
        mapped = spill_to_disk(tensor, str(tmp_path), 0 if dtype == torch.float32 else 1)
        assert torch.equal(mapped, tensor) and mapped.dtype == dtype
        assert mapped.untyped_storage().filename.startswith(str(tmp_path))


@pytest.mark.one_version
def test_families_read_moe_layers_through_method_layers():
    """The Qwen layer rule writes the dense layers that method.layers.moe_layer_pattern names (and
    reads them back); Mixtral's (MoE in every layer) refuses dense layers; bad patterns get
    method.layers' refusal."""
    from ordmoe_megatron.convert.families import _all_moe_layers, _qwen_layer_pattern
    from ordmoe_megatron.method.layers import moe_layer_pattern

    qwen, mixtral = _qwen_layer_pattern(), _all_moe_layers()
    for freq in (2, [1, 1, 0, 1], 1):
        hf = qwen.to_hf(dict(num_layers=4, moe_layer_freq=freq))
        pattern = moe_layer_pattern(4, freq)
        assert hf == {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, p in enumerate(pattern) if not p]}
        assert qwen.to_flags(dict(hf, num_hidden_layers=4))["moe_layer_freq"] == (1 if all(pattern) else pattern)
    assert mixtral.to_hf(dict(num_layers=4, moe_layer_freq=1)) == {}
    with pytest.raises(ConversionError, match="puts dense layers in"):
        mixtral.to_hf(dict(num_layers=4, moe_layer_freq=2))
    with pytest.raises(OrdMoEError, match="pattern has 3 entries for 4 layers"):
        qwen.to_hf(dict(num_layers=4, moe_layer_freq=[1, 0, 1]))


@pytest.mark.one_version
def test_one_table_of_families_validates_and_dispatches():
    from ordmoe_megatron.convert import FAMILIES as TABLE
    from ordmoe_megatron.convert import REFUSED, get_family

    assert set(TABLE) == set(FAMILIES) and not set(TABLE) & set(REFUSED)  # each family is tested here
    for model_type, family in TABLE.items():
        assert get_family(model_type) is family and family.model_type == model_type
    for model_type, reason in REFUSED.items():
        with pytest.raises(ConversionError, match=f"model_type {model_type!r} is refused: ") as refused:
            get_family(model_type)
        assert reason in str(refused.value)
    with pytest.raises(
        ConversionError,
        match="not in the mapping tables .supported: deepseek_v3, glm4_moe, mixtral, olmoe, qwen2_moe, qwen3_moe",
    ):
        get_family("llama")


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3 multi-token prediction (num_nextn_predict_layers)
# ----------------------------------------------------------------------------------------------
def _mtp_layer_tensors(hf_dir, seed=21):
    """An MTP layer (model.layers.3) for the tiny DeepSeek-V3: a random MoE decoder layer shaped
    like layer 2, enorm/hnorm/eh_proj/shared_head.norm, and the copies of embed_tokens and lm_head."""
    main = _tensors(hf_dir)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in main.items():
        if name.startswith("model.layers.2."):
            noise = torch.randn(t.shape, generator=gen)
            out[name.replace("model.layers.2.", "model.layers.3.")] = (
                1.0 + 0.2 * noise if "norm" in name else 0.1 * noise if "bias" in name else 0.15 * noise
            )
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        out[f"model.layers.3.{norm}.weight"] = 1.0 + 0.2 * torch.randn(64, generator=gen)
    out["model.layers.3.eh_proj.weight"] = 0.15 * torch.randn(64, 128, generator=gen)
    out["model.layers.3.embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
    out["model.layers.3.shared_head.head.weight"] = main["lm_head.weight"].clone()
    return out


def _deepseek_v3_mtp_dir(work):
    path = str(work / "hf-deepseek_v3-mtp")
    if not os.path.exists(path):
        src = _hf_dir(work, "deepseek_v3")
        shutil.copytree(src, path)
        tensors = {**_tensors(src), **_mtp_layer_tensors(src)}
        for fname in os.listdir(path):
            if fname.endswith(".safetensors") or fname.endswith(".index.json"):
                os.remove(os.path.join(path, fname))
        safetensors_torch.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def _mtp_reference_logits(hf_dir, tokens):
    """DeepSeek-V3's MTP from transformers' own pieces in float64: the layer is loaded as the 4th
    decoder layer of a 4-layer model; its input is eh_proj([enorm(embed(t_{i+1})), hnorm(h_i)])
    with h_i the main model's last hidden state (after its final norm, as megatron-core and
    DeepSeek-V3's serving code feed it), then shared_head.norm and lm_head."""
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    mtp = {k: v for k, v in _tensors(hf_dir).items() if k.startswith("model.layers.3.")}
    main = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager").eval()
    big_dir = hf_dir + "-as-4-layers"
    if not os.path.exists(big_dir):
        shutil.copytree(hf_dir, big_dir)
        cfg = _config(big_dir)
        cfg["num_hidden_layers"] = 4
        with open(os.path.join(big_dir, "config.json"), "w") as fh:
            json.dump(cfg, fh)
        layer = {k: v for k, v in _tensors(hf_dir).items() if not k.startswith("model.layers.3.")}
        layer.update(
            {
                k: v
                for k, v in mtp.items()
                if not any(s in k for s in ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"))
            }
        )
        for fname in os.listdir(big_dir):
            if fname.endswith(".safetensors"):
                os.remove(os.path.join(big_dir, fname))
        safetensors_torch.save_file(layer, os.path.join(big_dir, "model.safetensors"), metadata={"format": "pt"})
    big = AutoModelForCausalLM.from_pretrained(big_dir, dtype=torch.float64, experts_implementation="eager").eval()

    def norm(name):
        n = DeepseekV3RMSNorm(64, eps=main.config.rms_norm_eps).double()
        n.weight.data.copy_(mtp[f"model.layers.3.{name}.weight"].double())
        return n

    with torch.no_grad():
        h = main.model(tokens).last_hidden_state
        emb = main.model.embed_tokens(tokens.roll(-1, dims=1))
        x = torch.cat([norm("enorm")(emb), norm("hnorm")(h)], -1) @ mtp["model.layers.3.eh_proj.weight"].double().T
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        cos_sin = big.model.rotary_emb(x, pos)
        x = big.model.layers[3](x, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        x = x[0] if isinstance(x, tuple) else x
        return main.lm_head(norm("shared_head.norm")(x))


def test_deepseek_v3_mtp_layers_import_export_and_match_a_reference(work):
    """A DeepSeek-V3 checkpoint with its MTP layer: import gives mtp_num_layers=1 and the
    megatron-core MTP block loads it; MTP logits equal a reference from transformers' own layers
    in float64 within 1e-4; export gives back the same config and tensors bit for bit."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    hf, mcore, back = (
        _deepseek_v3_mtp_dir(work),
        str(work / "mcore-deepseek_v3-mtp"),
        str(work / "back-deepseek_v3-mtp"),
    )
    flags = hf_to_mcore(hf, mcore)
    assert flags["mtp_num_layers"] == 1
    # the plain checkpoint (config num_nextn_predict_layers=1, no MTP tensors) imports without MTP
    assert _config(_hf_dir(work, "deepseek_v3"))["num_nextn_predict_layers"] == 1
    assert not mcore_io.read_model_args(_mcore_dir(work, "deepseek_v3"))["mtp_num_layers"]

    tokens = _tokens(5)
    ref = _mtp_reference_logits(hf, tokens)
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    model = mcore_io.build_model(mcore_io.read_model_args(mcore), device="cpu")
    mcore_io.load_model_weights(model, mcore)
    model = model.double().eval()
    captured = {}
    model.mtp.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        model(tokens, pos, None, labels=tokens)
        mtp_hidden = torch.chunk(captured["h"], 2, dim=0)[1]
        got = model.output_layer(mtp_hidden)[0].transpose(0, 1)
    assert got.shape == ref.shape
    # the last position has no next token (megatron-core rolls it out of the loss)
    err = (got[:, :-1] - ref[:, :-1]).abs().max().item()
    assert err < 1e-4, err
    assert (ref[:, :-1] - ref[:, :-1].roll(1, dims=-1)).abs().max().item() > 1e-2

    mcore_to_hf(mcore, back)
    assert _config(back) == _config(hf)
    a, b = _tensors(hf), _tensors(back)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepseek_v3_mtp_copy_that_differs_is_refused(work, tmp_path):
    src = _deepseek_v3_mtp_dir(work)
    path = str(tmp_path / "hf")
    shutil.copytree(src, path)
    tensors = _tensors(path)
    tensors["model.layers.3.shared_head.head.weight"] = tensors["model.layers.3.shared_head.head.weight"] + 1
    safetensors_torch.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.3\.shared_head\.head\.weight differs from lm_head"):
        hf_to_mcore(path, str(tmp_path / "out"))
