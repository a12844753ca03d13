"""Declarative mapping tables: Hugging Face MoE families <-> Megatron-Core GPTModel (local spec).

Semantics matched exactly (and checked by the tests on tiny random models):

* router: HF "softmax over all experts, top-k, renormalise" (Mixtral; Qwen with
  ``norm_topk_prob=True``) == Megatron ``moe_router_pre_softmax=False`` (top-k on logits, softmax
  over the k); HF "softmax over all, top-k, no renormalisation" (Qwen ``norm_topk_prob=False``)
  == Megatron ``moe_router_pre_softmax=True``. No scaling factor, softmax scores.
* RoPE: HF ``rotate_half`` (non-interleaved) == Megatron's default; ``rope_type`` must be
  "default" (no scaling) and the whole head is rotated.
* RMSNorm with ``rms_norm_eps`` == ``--normalization RMSNorm --norm-epsilon``; Qwen3's q/k norms
  are per head == Megatron ``qk_layernorm``; OLMoE's are one RMSNorm over the whole q (k)
  projection == ``qk_layernorm`` with ``qk_layernorm_scope='projection'`` (``runtime.qk_norm``).
* Qwen2-MoE's shared expert and its sigmoid gate == ``moe_shared_expert_intermediate_size`` +
  ``moe_shared_expert_gate``.
* GLM-4.5 MoE's router (sigmoid scores, ``e_score_correction_bias`` == the router's
  ``expert_bias``, ``n_group``/``topk_group`` == group-limited top-k when
  ``num_experts_per_tok = 2 x topk_group``, renormalised, ``routed_scaling_factor``), its
  ``n_shared_experts`` (ungated) and ``first_k_dense_replace``; partial RoPE == ``rotary_percent``.
* fused ``linear_qkv`` is ordered by query group, fused ``linear_fc1`` is ``[gate; up]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from ordmoe_megatron.method.layers import moe_layer_pattern
from ordmoe_megatron.runtime.model_flags import padded_vocab_size

from .engine import (
    GLU,
    QKV,
    ConfigRule,
    ConfigTable,
    ConversionError,
    TensorRule,
    TensorTable,
    check,
    fixed_flags,
    integral,
    negated,
    same,
)

# Fields with no effect on the forward pass (or only on training-time behaviour that Megatron
# configures separately): carried verbatim from import to export.
COMMON_CARRY = (
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "output_router_logits",
    "router_aux_loss_coef",
    "attention_dropout",
    "tokenizer_class",
)

# ----------------------------------------------------------------------------------------------
# config rules shared by the Llama-style MoE families
# ----------------------------------------------------------------------------------------------


def _vocab() -> ConfigRule:
    def to_flags(v):
        if not v.get("vocab_size"):
            raise ConversionError("config.json lacks required field 'vocab_size'")
        n = int(v["vocab_size"])
        # The HF embedding has exactly vocab_size rows: record that, and pad by 1 (no padding).
        return {"vocab_size": n, "padded_vocab_size": n, "make_vocab_size_divisible_by": 1}

    return ConfigRule(("vocab_size",), to_flags, lambda f: {"vocab_size": padded_vocab_size(f)})


def _kv_heads() -> ConfigRule:
    def to_flags(v):
        heads = v["num_attention_heads"]
        kv = v.get("num_key_value_heads") or heads
        if heads % kv:
            raise ConversionError(
                f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        gqa = kv != heads
        return {"group_query_attention": gqa, "num_query_groups": kv if gqa else 1}

    def to_hf(f):
        return {
            "num_key_value_heads": f["num_query_groups"] if f["group_query_attention"] else f["num_attention_heads"]
        }

    return ConfigRule(("num_key_value_heads",), to_flags, to_hf)


def _head_dim(has_field: bool) -> ConfigRule:
    """HF ``head_dim`` (None = hidden/heads) <-> ``kv_channels``. Families without the field
    always use hidden/heads, so other kv_channels are refused on export."""

    def to_flags(v):
        return {"kv_channels": v.get("head_dim")} if has_field else {}

    def to_hf(f):
        default = f["hidden_size"] // f["num_attention_heads"]
        if has_field:
            return {"head_dim": f["kv_channels"]}
        if f["kv_channels"] not in (None, default):
            raise ConversionError(
                f"model flag kv_channels={f['kv_channels']} cannot be expressed by this family "
                f"(its head dim is always hidden_size/num_attention_heads={default})"
            )
        return {}

    return ConfigRule(("head_dim",) if has_field else (), to_flags, to_hf)


def _rope() -> ConfigRule:
    """Only plain RoPE (rope_type 'default', the whole head rotated) maps exactly."""

    def to_flags(v):
        params = v.get("rope_parameters")
        if params is None:  # pre-v5 spelling
            params = dict(v.get("rope_scaling") or {})
            params.setdefault("rope_theta", v.get("rope_theta", 10000.0))
        params = dict(params)
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        if rope_type != "default":
            raise ConversionError(
                f"config.json field rope_parameters.rope_type={rope_type!r} is not supported: "
                f"only unscaled RoPE maps exactly onto Megatron-Core's rotary embedding"
            )
        theta = params.pop("rope_theta", 10000.0)
        if v.get("partial_rotary_factor") not in (None, 1, 1.0):
            params["partial_rotary_factor"] = v["partial_rotary_factor"]
        if params.get("partial_rotary_factor", 1.0) in (1, 1.0):
            params.pop("partial_rotary_factor", None)
        if params:
            raise ConversionError(
                "config.json field(s) rope_parameters."
                + ", rope_parameters.".join(f"{k}={val!r}" for k, val in sorted(params.items()))
                + " not supported by the mapping"
            )
        if not integral(theta):
            raise ConversionError(
                f"config.json field rope_parameters.rope_theta={theta!r} is not supported: "
                f"Megatron-LM's --rotary-base is an integer"
            )
        return {"position_embedding_type": "rope", "rotary_base": int(theta), "rotary_percent": 1.0}

    def to_hf(f):
        if f["position_embedding_type"] != "rope" or f["rotary_percent"] != 1.0:
            raise ConversionError(
                f"model flags position_embedding_type={f['position_embedding_type']!r}, "
                f"rotary_percent={f['rotary_percent']} cannot be expressed by this family "
                f"(it needs full-head RoPE)"
            )
        return {"rope_parameters": {"rope_theta": float(f["rotary_base"]), "rope_type": "default"}}

    return ConfigRule(("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor"), to_flags, to_hf)


def _experts(*hf_names: str) -> ConfigRule:
    """Number of routed experts; ``hf_names[0]`` is the spelling written on export."""

    def to_flags(v):
        for n in hf_names:
            if v.get(n) is not None:
                if int(v[n]) < 1:
                    raise ConversionError(f"config.json field {n}={v[n]!r}: not an MoE model")
                return {"num_experts": int(v[n])}
        raise ConversionError(f"config.json lacks required field {hf_names[0]!r}")

    def to_hf(f):
        if not f["num_experts"]:
            raise ConversionError("model flag num_experts is required (MoE families only)")
        return {hf_names[0]: f["num_experts"]}

    return ConfigRule(tuple(hf_names), to_flags, to_hf)


def _all_moe_layers() -> ConfigRule:
    def to_hf(f):
        if 0 in moe_layer_pattern(f["num_layers"], f["moe_layer_freq"]):
            raise ConversionError("model flag moe_layer_freq puts dense layers in; this family has MoE in every layer")
        return {}

    return ConfigRule((), lambda v: {"moe_layer_freq": 1}, to_hf)


def _qwen_layer_pattern() -> ConfigRule:
    """HF: layer i is MoE iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0."""

    def to_flags(v):
        n, step = v["num_hidden_layers"], v.get("decoder_sparse_step") or 1
        dense = set(v.get("mlp_only_layers") or [])
        pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(n)]
        return {"moe_layer_freq": 1 if all(pattern) else pattern}

    def to_hf(f):
        pattern = moe_layer_pattern(f["num_layers"], f["moe_layer_freq"])
        return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, p in enumerate(pattern) if p == 0]}

    return ConfigRule(("decoder_sparse_step", "mlp_only_layers"), to_flags, to_hf)


def _mixtral_ffn() -> ConfigRule:
    def to_flags(v):
        return {"ffn_hidden_size": v["intermediate_size"], "moe_ffn_hidden_size": v["intermediate_size"]}

    def to_hf(f):
        return {"intermediate_size": f["moe_ffn_hidden_size"] or f["ffn_hidden_size"] or 4 * f["hidden_size"]}

    return ConfigRule(("intermediate_size",), to_flags, to_hf)


def _dense_ffn() -> ConfigRule:
    """Dense-layer MLP size; unset in the flags means Megatron's 4 * hidden_size."""

    def to_flags(v):
        if not v.get("intermediate_size"):
            raise ConversionError("config.json lacks required field 'intermediate_size'")
        return {"ffn_hidden_size": v["intermediate_size"]}

    return ConfigRule(
        ("intermediate_size",), to_flags, lambda f: {"intermediate_size": f["ffn_hidden_size"] or 4 * f["hidden_size"]}
    )


def _seq_length() -> ConfigRule:
    def to_flags(v):
        mpe = v.get("max_position_embeddings")
        if not mpe:
            raise ConversionError("config.json lacks required field 'max_position_embeddings'")
        return {"max_position_embeddings": mpe, "seq_length": min(int(mpe), 4096)}

    return ConfigRule(
        ("max_position_embeddings",),
        to_flags,
        lambda f: {"max_position_embeddings": f["max_position_embeddings"] or f["seq_length"]},
    )


def _silu() -> ConfigRule:
    return check(
        "hidden_act", lambda a: a == "silu", "the mapping covers SwiGLU (silu-gated) MLPs only", default="silu"
    )


def _common_rules(qk_layernorm_scope: str = "head") -> list:
    return [
        _vocab(),
        same("hidden_size"),
        same("num_hidden_layers", "num_layers"),
        same("num_attention_heads"),
        _kv_heads(),
        _seq_length(),
        same("rms_norm_eps", "norm_epsilon"),
        negated("tie_word_embeddings", "untie_embeddings_and_output_weights", hf_default=False),
        same("num_experts_per_tok", "moe_router_topk"),
        _rope(),
        _silu(),
        fixed_flags(
            normalization="RMSNorm",
            swiglu=True,
            disable_bias_linear=True,
            moe_router_score_function="softmax",
            moe_router_topk_scaling_factor=None,
            multi_latent_attention=False,
            qk_layernorm_scope=qk_layernorm_scope,
        ),
    ]


def _common_tensors(attn: str, *, mlp_rules: list) -> list:
    a = f"model.layers.{{L}}.{attn}"
    return [
        TensorRule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        TensorRule("decoder.final_layernorm.weight", "model.norm.weight"),
        TensorRule("output_layer.weight", "lm_head.weight"),
        TensorRule("decoder.layers.{L}.input_layernorm.weight", "model.layers.{L}.input_layernorm.weight"),
        TensorRule("decoder.layers.{L}.pre_mlp_layernorm.weight", "model.layers.{L}.post_attention_layernorm.weight"),
        TensorRule(
            "decoder.layers.{L}.self_attention.linear_qkv.weight",
            (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"),
            QKV,
        ),
        TensorRule(
            "decoder.layers.{L}.self_attention.linear_qkv.bias",
            (f"{a}.q_proj.bias", f"{a}.k_proj.bias", f"{a}.v_proj.bias"),
            QKV,
        ),
        TensorRule("decoder.layers.{L}.self_attention.linear_proj.weight", f"{a}.o_proj.weight"),
        TensorRule("decoder.layers.{L}.self_attention.q_layernorm.weight", f"{a}.q_norm.weight"),
        TensorRule("decoder.layers.{L}.self_attention.k_layernorm.weight", f"{a}.k_norm.weight"),
        *mlp_rules,
    ]


def _qwen_mlp_tensors() -> list:
    m = "model.layers.{L}.mlp"
    x = "decoder.layers.{L}.mlp"
    return [
        TensorRule(f"{x}.router.weight", f"{m}.gate.weight"),
        TensorRule(
            f"{x}.experts.local_experts.{{E}}.linear_fc1.weight",
            (f"{m}.experts.{{E}}.gate_proj.weight", f"{m}.experts.{{E}}.up_proj.weight"),
            GLU,
        ),
        TensorRule(f"{x}.experts.local_experts.{{E}}.linear_fc2.weight", f"{m}.experts.{{E}}.down_proj.weight"),
        TensorRule(
            f"{x}.shared_experts.linear_fc1.weight",
            (f"{m}.shared_expert.gate_proj.weight", f"{m}.shared_expert.up_proj.weight"),
            GLU,
        ),
        TensorRule(f"{x}.shared_experts.linear_fc2.weight", f"{m}.shared_expert.down_proj.weight"),
        TensorRule(f"{x}.shared_experts.gate_weight", f"{m}.shared_expert_gate.weight"),
        # dense (mlp_only_layers / decoder_sparse_step) layers
        TensorRule(f"{x}.linear_fc1.weight", (f"{m}.gate_proj.weight", f"{m}.up_proj.weight"), GLU),
        TensorRule(f"{x}.linear_fc2.weight", f"{m}.down_proj.weight"),
    ]


TIED = ("lm_head.weight", "model.embed_tokens.weight")

# ----------------------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------------------


@dataclass
class Family:
    model_type: str
    architecture: str
    tensors: TensorTable
    config: ConfigTable


MIXTRAL = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    tensors=TensorTable(
        _common_tensors(
            "self_attn",
            mlp_rules=[
                TensorRule("decoder.layers.{L}.mlp.router.weight", "model.layers.{L}.block_sparse_moe.gate.weight"),
                TensorRule(
                    "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
                    (
                        "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
                        "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
                    ),
                    GLU,
                ),
                TensorRule(
                    "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
                    "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
                ),
            ],
        ),
        tied_output=TIED,
    ),
    config=ConfigTable(
        rules=[
            *_common_rules(),
            _head_dim(has_field=True),
            _mixtral_ffn(),
            _experts("num_local_experts"),
            _all_moe_layers(),
            check(
                "sliding_window",
                lambda w: w is None,
                "sliding-window attention is not expressible in Megatron-Core's GPTModel",
                default=None,
            ),
            fixed_flags(
                moe_router_pre_softmax=False,
                add_qkv_bias=False,
                qk_layernorm=False,
                moe_shared_expert_intermediate_size=None,
                moe_shared_expert_gate=False,
            ),
        ],
        # router_jitter_noise only perturbs inputs in training mode.
        carry=COMMON_CARRY + ("router_jitter_noise",),
    ),
)


def _qwen_config_rules() -> list:
    return [
        *_common_rules(),
        _dense_ffn(),
        same("moe_intermediate_size", "moe_ffn_hidden_size"),
        negated("norm_topk_prob", "moe_router_pre_softmax", hf_default=False),
        _qwen_layer_pattern(),
        check(
            "use_sliding_window",
            lambda u: not u,
            "sliding-window attention is not expressible in Megatron-Core's GPTModel",
            default=False,
        ),
        check(
            "layer_types",
            lambda t: t is None or all(x == "full_attention" for x in t),
            "only full attention maps onto Megatron-Core's GPTModel",
        ),
        # meaningful only with use_sliding_window=True (refused above)
        ConfigRule(("max_window_layers",), lambda v: {}, lambda f: {}, carried=True),
    ]


def _qwen2_shared() -> ConfigRule:
    def to_flags(v):
        size = v.get("shared_expert_intermediate_size")
        if not size:
            raise ConversionError(
                "config.json shared_expert_intermediate_size must be > 0 "
                "(Qwen2-MoE always builds a gated shared expert)"
            )
        return {"moe_shared_expert_intermediate_size": size, "moe_shared_expert_gate": True}

    def to_hf(f):
        if not f["moe_shared_expert_intermediate_size"] or not f["moe_shared_expert_gate"]:
            raise ConversionError(
                "Qwen2-MoE needs a gated shared expert (model flags "
                "moe_shared_expert_intermediate_size and moe_shared_expert_gate)"
            )
        return {"shared_expert_intermediate_size": f["moe_shared_expert_intermediate_size"]}

    return ConfigRule(("shared_expert_intermediate_size",), to_flags, to_hf)


QWEN2_MOE = Family(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    tensors=TensorTable(_common_tensors("self_attn", mlp_rules=_qwen_mlp_tensors()), tied_output=TIED),
    config=ConfigTable(
        rules=[
            *_qwen_config_rules(),
            _head_dim(has_field=False),
            _experts("num_experts"),
            _qwen2_shared(),
            same("qkv_bias", "add_qkv_bias"),
            check("sliding_window", lambda w: True, "", default=None),
            fixed_flags(qk_layernorm=False),
        ],
        carry=COMMON_CARRY,
    ),
)

QWEN3_MOE = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    tensors=TensorTable(_common_tensors("self_attn", mlp_rules=_qwen_mlp_tensors()), tied_output=TIED),
    config=ConfigTable(
        rules=[
            *_qwen_config_rules(),
            _head_dim(has_field=True),
            # "num_experts" works as a kwarg on every transformers version (v5 maps it to
            # num_local_experts, which is how v5 writes it).
            _experts("num_experts", "num_local_experts"),
            check(
                "attention_bias",
                lambda b: not b,
                "Qwen3-MoE puts the bias on q/k/v *and* o_proj; Megatron-Core has add_qkv_bias "
                "(q/k/v only) or add_bias_linear (every linear, not allowed with MoE)",
                default=False,
            ),
            # Qwen3 applies a sliding window whenever sliding_window is set.
            check(
                "sliding_window",
                lambda w: w is None,
                "sliding-window attention is not expressible in Megatron-Core's GPTModel",
                default=None,
            ),
            fixed_flags(
                qk_layernorm=True,
                add_qkv_bias=False,
                moe_shared_expert_intermediate_size=None,
                moe_shared_expert_gate=False,
            ),
        ],
        carry=COMMON_CARRY,
    ),
)


# ----------------------------------------------------------------------------------------------
# GLM-4.5 MoE (glm4_moe): the DeepSeek-V3 routing (sigmoid scores, e_score_correction_bias,
# group-limited top-k, routed_scaling_factor), shared experts, first dense layers, partial RoPE
# ----------------------------------------------------------------------------------------------
def _partial_rope() -> ConfigRule:
    """Unscaled RoPE on the first ``partial_rotary_factor`` of each head (rotate_half) ==
    Megatron's ``rotary_percent``."""
    plain = _rope()

    def to_flags(v):
        params = dict(v.get("rope_parameters") or {})
        factor = params.pop("partial_rotary_factor", v.get("partial_rotary_factor") or 1.0)
        flags = plain.to_flags({**v, "rope_parameters": params, "partial_rotary_factor": None})
        return {**flags, "rotary_percent": float(factor)}

    def to_hf(f):
        if f["position_embedding_type"] != "rope":
            raise ConversionError("model flag position_embedding_type must be 'rope' for this family")
        params = {"rope_theta": float(f["rotary_base"]), "rope_type": "default"}
        params["partial_rotary_factor"] = f["rotary_percent"]
        return {"rope_parameters": params}

    return ConfigRule(plain.hf, to_flags, to_hf)


def _deepseek_routing(experts_field: str) -> list:
    """Sigmoid scores + bias (aux-loss-free balancing), group-limited top-k, renormalised, scaled.

    HF picks groups by the sum of each group's top-2 scores; Megatron by the sum of its top
    ``topk / group_topk``: the same when that is 2 (DeepSeek-V3: 8 / 4) or without groups."""

    def groups_to_flags(v):
        groups, topk_group, k = v.get("n_group") or 1, v.get("topk_group") or 1, v["num_experts_per_tok"]
        if groups == 1:
            return {"moe_router_num_groups": None, "moe_router_group_topk": None}
        if k % topk_group or k // topk_group != 2:
            raise ConversionError(
                f"config.json n_group={groups}, topk_group={topk_group}, num_experts_per_tok={k}: HF ranks groups "
                f"by their top-2 scores, Megatron-Core by their top num_experts_per_tok/topk_group; only "
                "num_experts_per_tok = 2 x topk_group maps exactly"
            )
        return {"moe_router_num_groups": groups, "moe_router_group_topk": topk_group}

    def groups_to_hf(f):
        return {"n_group": f["moe_router_num_groups"] or 1, "topk_group": f["moe_router_group_topk"] or 1}

    def scale_to_flags(v):
        factor = v.get("routed_scaling_factor")
        return {"moe_router_topk_scaling_factor": None if factor in (None, 1, 1.0) else float(factor)}

    def scale_to_hf(f):
        return {"routed_scaling_factor": f["moe_router_topk_scaling_factor"] or 1.0}

    def shared_to_flags(v):
        n = v.get("n_shared_experts") or 0
        return {"moe_shared_expert_intermediate_size": n * v["moe_intermediate_size"] or None}

    def shared_to_hf(f):
        size, expert = f["moe_shared_expert_intermediate_size"] or 0, f["moe_ffn_hidden_size"]
        if size % expert:
            raise ConversionError(
                f"model flag moe_shared_expert_intermediate_size={size} is not a multiple of "
                f"moe_ffn_hidden_size={expert} (this family counts whole shared experts)"
            )
        return {"n_shared_experts": size // expert}

    def dense_to_flags(v):
        k, n = v.get("first_k_dense_replace") or 0, v["num_hidden_layers"]
        return {"moe_layer_freq": 1 if k == 0 else [0] * k + [1] * (n - k)}

    def dense_to_hf(f):
        pattern = moe_layer_pattern(f["num_layers"], f["moe_layer_freq"])
        k = pattern.index(1) if 1 in pattern else len(pattern)
        if pattern != [0] * k + [1] * (len(pattern) - k):
            raise ConversionError(
                "model flag moe_layer_freq puts dense layers after MoE layers; this family has first dense "
                "layers only (first_k_dense_replace)"
            )
        return {"first_k_dense_replace": k}

    return [
        _experts(experts_field),
        same("moe_intermediate_size", "moe_ffn_hidden_size"),
        ConfigRule(("n_group", "topk_group"), groups_to_flags, groups_to_hf),
        ConfigRule(("routed_scaling_factor",), scale_to_flags, scale_to_hf),
        ConfigRule(("n_shared_experts",), shared_to_flags, shared_to_hf),
        ConfigRule(("first_k_dense_replace",), dense_to_flags, dense_to_hf),
        check(
            "norm_topk_prob",
            lambda v: v,
            "Megatron-Core renormalises sigmoid top-k weights always; only norm_topk_prob=True maps",
            default=True,
        ),
        fixed_flags(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_pre_softmax=False,
            moe_shared_expert_gate=False,
        ),
    ]


def _deepseek_mlp_tensors() -> list:
    m = "model.layers.{L}.mlp"
    x = "decoder.layers.{L}.mlp"
    return [
        TensorRule(f"{x}.router.weight", f"{m}.gate.weight"),
        TensorRule(f"{x}.router.expert_bias", f"{m}.gate.e_score_correction_bias"),
        TensorRule(
            f"{x}.experts.local_experts.{{E}}.linear_fc1.weight",
            (f"{m}.experts.{{E}}.gate_proj.weight", f"{m}.experts.{{E}}.up_proj.weight"),
            GLU,
        ),
        TensorRule(f"{x}.experts.local_experts.{{E}}.linear_fc2.weight", f"{m}.experts.{{E}}.down_proj.weight"),
        TensorRule(
            f"{x}.shared_experts.linear_fc1.weight",
            (f"{m}.shared_experts.gate_proj.weight", f"{m}.shared_experts.up_proj.weight"),
            GLU,
        ),
        TensorRule(f"{x}.shared_experts.linear_fc2.weight", f"{m}.shared_experts.down_proj.weight"),
        TensorRule(f"{x}.linear_fc1.weight", (f"{m}.gate_proj.weight", f"{m}.up_proj.weight"), GLU),
        TensorRule(f"{x}.linear_fc2.weight", f"{m}.down_proj.weight"),
    ]


GLM4_MOE = Family(
    model_type="glm4_moe",
    architecture="Glm4MoeForCausalLM",
    tensors=TensorTable(_common_tensors("self_attn", mlp_rules=_deepseek_mlp_tensors()), tied_output=TIED),
    config=ConfigTable(
        rules=[
            *[r for r in _common_rules() if "rope_parameters" not in r.hf and r.hf],
            _partial_rope(),
            _head_dim(has_field=True),
            _dense_ffn(),
            *_deepseek_routing("n_routed_experts"),
            same("attention_bias", "add_qkv_bias"),  # q/k/v only: o_proj has none
            same("use_qk_norm", "qk_layernorm"),  # per head
            fixed_flags(
                normalization="RMSNorm",
                swiglu=True,
                disable_bias_linear=True,
                multi_latent_attention=False,
                qk_layernorm_scope="head",
            ),
        ],
        # num_nextn_predict_layers: the MTP layers, which transformers' model neither builds nor
        # loads; a checkpoint holding their weights is refused (tensors not in the table).
        carry=COMMON_CARRY + ("num_nextn_predict_layers",),
    ),
)


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3 (deepseek_v3): multi-latent attention, and the routing, shared experts and first
# dense layers of glm4_moe (one owner: _deepseek_routing, _deepseek_mlp_tensors)
# ----------------------------------------------------------------------------------------------
# HF's q_a_layernorm and kv_a_layernorm are built with DeepseekV3RMSNorm's default eps, Megatron's
# q_layernorm and kv_layernorm with the model's norm epsilon: exact only when the two agree.
_DEEPSEEK_LATENT_NORM_EPS = 1e-6


def _deepseek_norm_eps() -> ConfigRule:
    def to_flags(v):
        eps = v.get("rms_norm_eps")
        if eps is None:
            raise ConversionError("config.json lacks required field 'rms_norm_eps'")
        if eps != _DEEPSEEK_LATENT_NORM_EPS:
            raise ConversionError(
                f"config.json field rms_norm_eps={eps!r} is not supported: DeepSeek-V3's q_a_layernorm and "
                f"kv_a_layernorm always use eps={_DEEPSEEK_LATENT_NORM_EPS}, Megatron-Core's MLA norms use "
                "rms_norm_eps; only rms_norm_eps=1e-06 maps exactly"
            )
        return {"norm_epsilon": eps}

    def to_hf(f):
        if f["norm_epsilon"] != _DEEPSEEK_LATENT_NORM_EPS:
            raise ConversionError(
                f"model flag norm_epsilon={f['norm_epsilon']!r} cannot be expressed by deepseek_v3 (its latent "
                f"norms use eps={_DEEPSEEK_LATENT_NORM_EPS})"
            )
        return {"rms_norm_eps": f["norm_epsilon"]}

    return ConfigRule(("rms_norm_eps",), to_flags, to_hf)


def _mla_heads() -> ConfigRule:
    """MLA expands its latent keys to every head: HF's num_key_value_heads must be the head count."""

    def to_flags(v):
        heads, kv = v["num_attention_heads"], v.get("num_key_value_heads") or v["num_attention_heads"]
        if kv != heads:
            raise ConversionError(
                f"config.json num_key_value_heads={kv} is not supported: multi-latent attention has one key "
                f"and value per head (num_key_value_heads = num_attention_heads = {heads})"
            )
        return {"group_query_attention": False, "num_query_groups": 1}

    def to_hf(f):
        if f["group_query_attention"]:
            raise ConversionError("model flag group_query_attention cannot be expressed by deepseek_v3 (MLA)")
        return {"num_key_value_heads": f["num_attention_heads"]}

    return ConfigRule(("num_key_value_heads",), to_flags, to_hf)


def _mla_sizes() -> list:
    """HF's MLA sizes == megatron-core's MLATransformerConfig sizes; q_lora_rank None == a full
    query projection (linear_q_proj). HF's apply_rotary_pos_emb_interleave de-interleaves the RoPE
    part of q and k and rotates halves, as megatron-core's MLA always does: rope_interleave=True
    maps with the weights unchanged. Unscaled RoPE only (megatron-core's rope_type 'rope'); the
    softmax scale is then 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) on both sides."""

    def q_to_flags(v):
        return {"q_lora_rank": v.get("q_lora_rank")}

    return [
        ConfigRule(("q_lora_rank",), q_to_flags, lambda f: {"q_lora_rank": f["q_lora_rank"]}),
        same("kv_lora_rank"),
        same("qk_nope_head_dim", "qk_head_dim"),
        same("qk_rope_head_dim", "qk_pos_emb_head_dim"),
        same("v_head_dim"),
        check(
            "rope_interleave",
            lambda r: r,
            "megatron-core's MLA de-interleaves the RoPE dimensions (HF rope_interleave=True); "
            "only rope_interleave=True maps with the weights as they are",
            default=True,
        ),
        check(
            "attention_bias",
            lambda b: not b,
            "megatron-core's MLA projections take a bias only with add_bias_linear (every linear, not "
            "allowed with MoE)",
            default=False,
        ),
        # derived by DeepseekV3Config from the sizes above (qk_head_dim = nope + rope, head_dim = rope)
        ConfigRule(("qk_head_dim", "head_dim"), lambda v: {}, lambda f: {}, carried=True),
        fixed_flags(multi_latent_attention=True, rope_type="rope", qk_layernorm=True, kv_channels=None),
    ]


def _mla_tensors() -> list:
    a, x = "model.layers.{L}.self_attn", "decoder.layers.{L}.self_attention"
    return [
        TensorRule(f"{x}.linear_q_down_proj.weight", f"{a}.q_a_proj.weight"),
        TensorRule(f"{x}.q_layernorm.weight", f"{a}.q_a_layernorm.weight"),
        TensorRule(f"{x}.linear_q_up_proj.weight", f"{a}.q_b_proj.weight"),
        TensorRule(f"{x}.linear_q_proj.weight", f"{a}.q_proj.weight"),
        TensorRule(f"{x}.linear_kv_down_proj.weight", f"{a}.kv_a_proj_with_mqa.weight"),
        TensorRule(f"{x}.kv_layernorm.weight", f"{a}.kv_a_layernorm.weight"),
        TensorRule(f"{x}.linear_kv_up_proj.weight", f"{a}.kv_b_proj.weight"),
        TensorRule(f"{x}.linear_proj.weight", f"{a}.o_proj.weight"),
    ]


# HF DeepSeek-V3 checkpoints keep their MTP modules as layers num_hidden_layers + i (enorm, hnorm,
# eh_proj, shared_head.norm, a decoder layer, and copies of embed_tokens and lm_head); transformers
# builds none of them. megatron-core's MultiTokenPredictionLayer has the same pieces and the same
# order (eh_proj over [enorm(embedding), hnorm(hidden)], the hidden after the final norm) and
# shares the embedding and output layer; its decoder layer is transformer_layer in 0.16,
# mtp_model_layer in 0.19 (the plan takes the rows the built model has).
_MTP_LAYER_NAMES = ("transformer_layer", "mtp_model_layer")


def _mtp_tensors(layer_rules: list) -> list:
    m, x = "model.layers.{N}", "mtp.layers.{M}"
    rules = [
        TensorRule(f"{x}.enorm.weight", f"{m}.enorm.weight"),
        TensorRule(f"{x}.hnorm.weight", f"{m}.hnorm.weight"),
        TensorRule(f"{x}.eh_proj.weight", f"{m}.eh_proj.weight"),
        TensorRule(f"{x}.final_layernorm.weight", f"{m}.shared_head.norm.weight"),
    ]
    for r in layer_rules:
        if r.mcore.startswith("decoder.layers.{L}."):
            for name in _MTP_LAYER_NAMES:
                mcore = r.mcore.replace("decoder.layers.{L}.", f"{x}.{name}.")
                rules.append(
                    TensorRule(mcore, tuple(h.replace("model.layers.{L}.", f"{m}.") for h in r.hf), r.transform)
                )
    return rules


def _mtp_layers() -> ConfigRule:
    """num_nextn_predict_layers == mtp_num_layers. A checkpoint without MTP tensors imports with
    none (hf_to_mcore), and export then keeps the recorded field as transformers' save does."""

    def to_flags(v):
        return {"mtp_num_layers": v.get("num_nextn_predict_layers") or None}

    def to_hf(f):
        return {"num_nextn_predict_layers": f["mtp_num_layers"]} if f["mtp_num_layers"] else {}

    return ConfigRule(("num_nextn_predict_layers",), to_flags, to_hf, carried=True)


_DEEPSEEK_V3_LAYER_TENSORS = [
    *_mla_tensors(),
    *[r for r in _common_tensors("self_attn", mlp_rules=_deepseek_mlp_tensors()) if ".self_attention." not in r.mcore],
]

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    tensors=TensorTable(
        [*_DEEPSEEK_V3_LAYER_TENSORS, *_mtp_tensors(_DEEPSEEK_V3_LAYER_TENSORS)],
        tied_output=TIED,
        copies=(
            ("model.layers.{N}.embed_tokens.weight", "model.embed_tokens.weight"),
            ("model.layers.{N}.shared_head.head.weight", "lm_head.weight"),
        ),
        mtp_layer="model.layers.{N}.",
    ),
    config=ConfigTable(
        rules=[
            *[r for r in _common_rules() if r.hf and r.hf[0] not in ("num_key_value_heads", "rms_norm_eps")],
            _deepseek_norm_eps(),
            _mla_heads(),
            *_mla_sizes(),
            _dense_ffn(),
            *_deepseek_routing("n_routed_experts"),
            _mtp_layers(),
            fixed_flags(normalization="RMSNorm", swiglu=True, disable_bias_linear=True, qk_layernorm_scope="head"),
        ],
        # pretraining_tp: unused by transformers' DeepSeek-V3 forward; num_mtp_layers: the alias
        # of num_nextn_predict_layers.
        carry=COMMON_CARRY + ("pretraining_tp", "num_mtp_layers"),
    ),
)

# ----------------------------------------------------------------------------------------------
# OLMoE (olmoe): q_norm/k_norm over the whole q/k projection (qk_layernorm_scope='projection'),
# softmax top-k with or without renormalisation (norm_topk_prob, as Qwen's), no shared expert
# ----------------------------------------------------------------------------------------------
OLMOE = Family(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    tensors=TensorTable(
        _common_tensors(
            "self_attn",
            mlp_rules=[
                TensorRule("decoder.layers.{L}.mlp.router.weight", "model.layers.{L}.mlp.gate.weight"),
                TensorRule(
                    "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
                    (
                        "model.layers.{L}.mlp.experts.{E}.gate_proj.weight",
                        "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
                    ),
                    GLU,
                ),
                TensorRule(
                    "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
                    "model.layers.{L}.mlp.experts.{E}.down_proj.weight",
                ),
            ],
        ),
        tied_output=TIED,
    ),
    config=ConfigTable(
        rules=[
            *_common_rules(qk_layernorm_scope="projection"),
            # OLMoE sizes q_norm and k_norm by hidden_size/num_attention_heads: no head_dim field
            _head_dim(has_field=False),
            _mixtral_ffn(),
            _experts("num_experts"),
            _all_moe_layers(),
            negated("norm_topk_prob", "moe_router_pre_softmax", hf_default=False),
            check(
                "attention_bias",
                lambda b: not b,
                "OLMoE puts the bias on q/k/v *and* o_proj; Megatron-Core has add_qkv_bias (q/k/v only) or "
                "add_bias_linear (every linear, not allowed with MoE)",
                default=False,
            ),
            check(
                "clip_qkv",
                lambda c: c is None,
                "OLMoE then clamps q, k and v after the projection (and the q/k norm); Megatron-Core's "
                "attention has no such clamp",
                default=None,
            ),
            fixed_flags(
                qk_layernorm=True,
                add_qkv_bias=False,
                moe_shared_expert_intermediate_size=None,
                moe_shared_expert_gate=False,
            ),
        ],
        carry=COMMON_CARRY,
    ),
)

# The Hugging Face families: the one table ``get_family`` validates a model type against and
# dispatches by, and ``infer_family`` tries in order (their flags do not overlap: Qwen2-MoE has
# the gated shared expert, Qwen3-MoE the per-head q/k norms, Mixtral neither, GLM-4.5 MoE the
# sigmoid router the others refuse, DeepSeek-V3 the multi-latent attention the others refuse,
# OLMoE the q/k norm over the whole projection the others refuse).
FAMILIES: Dict[str, Family] = {f.model_type: f for f in (QWEN2_MOE, QWEN3_MOE, MIXTRAL, GLM4_MOE, DEEPSEEK_V3, OLMOE)}

# Families we know and refuse, with the reason (Megatron-Core 0.16.1 cannot express them exactly,
# or the mapping is not clear enough to ship).
REFUSED: Dict[str, str] = {
    "deepseek_v2": (
        "DeepSeek-V2 uses multi-latent attention with interleaved/YaRN RoPE and group-limited "
        "routing; no mapping table is shipped for it"
    ),
    "bailing_moe": (
        "Ling/Bailing-MoE is not part of transformers (remote code), so no tiny model can check a "
        "table; Ling 2.0 (BailingMoeV2) follows the glm4_moe mapping (docs/convert.md)"
    ),
}


def get_family(model_type: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED:
        raise ConversionError(f"model_type {model_type!r} is refused: {REFUSED[model_type]}")
    raise ConversionError(
        f"model_type {model_type!r} is not in the mapping tables (supported: {', '.join(sorted(FAMILIES))})"
    )


def infer_family(flags: Dict[str, Any]) -> Family:
    """The first family that can express ``flags`` (for checkpoints without HF metadata)."""
    reasons = []
    for fam in FAMILIES.values():
        try:
            fam.config.to_hf(flags)
            return fam
        except ConversionError as e:
            reasons.append(f"{fam.model_type}: {e}")
    raise ConversionError("no Hugging Face family can express these model flags:\n  " + "\n  ".join(reasons))
