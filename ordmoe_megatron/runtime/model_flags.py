"""Megatron-LM-style model architecture flags -> Megatron-Core ``TransformerConfig`` / ``GPTModel``.

This is the one place that knows how the architecture flags (spelled as Megatron-LM spells them,
``--num-layers``, ``--moe-router-topk``, ...) become a ``TransformerConfig`` and a ``GPTModel``.
Parallelism, precision and dropout are *not* model flags: callers pass them as overrides.

A flags dict is a plain ``{name: value}`` dict keyed by the Megatron-LM ``args`` attribute names
(``num_layers``, ``moe_router_topk``, ...). It is what ``model_args.json`` holds next to a converted
checkpoint.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.method.layers import has_dense_layers, parse_moe_layer_freq
from ordmoe_megatron.runtime import bridges, compat, qk_norm
from ordmoe_megatron.runtime.packed_attention import packed_attention_spec

__all__ = [
    "MODEL_FLAGS",
    "Flag",
    "add_model_args",
    "flags_from_args",
    "normalize_flags",
    "flags_to_argv",
    "padded_vocab_size",
    "transformer_config_from_flags",
    "gpt_model_from_flags",
]


def _moe_freq_arg(text: str):
    try:
        return parse_moe_layer_freq(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Flag:
    """One architecture flag. ``kind`` is 'int', 'float', 'str', 'bool' (store_true) or 'freq'.
    ``cli=False`` marks a value Megatron-LM derives rather than takes on the command line."""

    name: str
    kind: str
    default: Any
    help: str
    choices: Optional[tuple] = None
    cli: bool = True
    check: Optional[Callable[[Any], Optional[str]]] = None  # a value's problem in words, or None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


# Defaults are Megatron-LM's defaults.
MODEL_FLAGS: tuple = (
    Flag("num_layers", "int", None, "Number of transformer layers."),
    Flag("hidden_size", "int", None, "Transformer hidden size."),
    Flag("ffn_hidden_size", "int", None, "Dense MLP hidden size (4*hidden_size if unset)."),
    Flag("num_attention_heads", "int", None, "Number of attention heads."),
    Flag("group_query_attention", "bool", False, "Use grouped-query attention."),
    Flag("num_query_groups", "int", 1, "Number of query groups (with --group-query-attention)."),
    Flag("kv_channels", "int", None, "Attention head dim (hidden_size // heads if unset)."),
    Flag("num_experts", "int", None, "Number of routed experts (MoE)."),
    Flag("moe_router_topk", "int", 2, "Experts per token."),
    Flag("moe_ffn_hidden_size", "int", None, "Routed expert MLP hidden size."),
    Flag("moe_shared_expert_intermediate_size", "int", None, "Shared expert MLP hidden size."),
    Flag("moe_shared_expert_gate", "bool", False, "Sigmoid gate on the shared expert output."),
    Flag(
        "moe_router_pre_softmax",
        "bool",
        False,
        "Softmax over all experts before top-k (no renormalisation); default is top-k then softmax.",
    ),
    Flag(
        "moe_router_score_function",
        "str",
        "softmax",
        "Router score function (those of the installed megatron-core).",
        choices=compat.SCORE_FUNCTIONS,
        check=compat.score_function_problem,
    ),
    Flag("moe_router_topk_scaling_factor", "float", None, "Scale applied to routing weights."),
    Flag("moe_router_num_groups", "int", None, "Expert groups of group-limited routing (DeepSeek-V3's n_group)."),
    Flag("moe_router_group_topk", "int", None, "Groups each token may route to (DeepSeek-V3's topk_group)."),
    Flag(
        "moe_router_enable_expert_bias",
        "bool",
        False,
        "Aux-loss-free balancing: a per-expert bias added to the scores the top-K ranks with (sigmoid).",
    ),
    Flag("moe_router_bias_update_rate", "float", None, "Step of the expert-bias update (Megatron's 1e-3 if unset)."),
    Flag(
        "moe_layer_freq",
        "freq",
        1,
        "MoE layer frequency: int N, or a list expression like '([0]+[1]*23)' (0 dense, 1 MoE).",
    ),
    Flag("mtp_num_layers", "int", None, "Multi-token prediction layers (DeepSeek-V3's MTP); none if unset."),
    Flag("mtp_loss_scaling_factor", "float", None, "Weight of the MTP loss (Megatron's 0.1 if unset)."),
    Flag("multi_latent_attention", "bool", False, "Multi-latent attention (DeepSeek-V2/V3's MLA)."),
    Flag("q_lora_rank", "int", None, "MLA: rank of the query down-projection (none: a full query projection)."),
    Flag("kv_lora_rank", "int", None, "MLA: rank of the key-value down-projection (Megatron's 512 if unset)."),
    Flag("qk_head_dim", "int", None, "MLA: query/key head size without RoPE (Megatron's 128 if unset)."),
    Flag("qk_pos_emb_head_dim", "int", None, "MLA: query/key RoPE head size (Megatron's 64 if unset)."),
    Flag("v_head_dim", "int", None, "MLA: value head size (Megatron's 128 if unset)."),
    Flag("rope_type", "str", None, "MLA's RoPE: rope or yarn (Megatron's yarn if unset).", choices=("rope", "yarn")),
    Flag("normalization", "str", "LayerNorm", "Norm type.", choices=("LayerNorm", "RMSNorm")),
    Flag("norm_epsilon", "float", 1e-5, "Norm epsilon."),
    Flag("swiglu", "bool", False, "SwiGLU MLPs (gated linear unit with SiLU)."),
    Flag(
        "position_embedding_type",
        "str",
        "learned_absolute",
        "Position embedding type.",
        choices=("learned_absolute", "rope", "none"),
    ),
    Flag("rotary_base", "int", 10000, "RoPE base (theta)."),
    Flag("rotary_percent", "float", 1.0, "Fraction of the head dim that gets RoPE."),
    Flag("untie_embeddings_and_output_weights", "bool", False, "Separate output layer weights."),
    Flag("disable_bias_linear", "bool", False, "No biases in linear layers."),
    Flag("add_qkv_bias", "bool", False, "Bias on the QKV projection only."),
    Flag("qk_layernorm", "bool", False, "Per-head norm on queries and keys."),
    Flag(
        "qk_layernorm_scope",
        "str",
        "head",
        "What --qk-layernorm normalises over: each head (megatron-core's) or the whole q/k projection "
        "(OLMoE's; RMSNorm, tensor parallelism 1). Not a Megatron-LM flag: ordmoe-pretrain only.",
        choices=("head", "projection"),
    ),
    Flag("vocab_size", "int", None, "Vocabulary size (before padding)."),
    Flag("make_vocab_size_divisible_by", "int", 128, "Pad the vocab to a multiple of this (x TP)."),
    Flag(
        "padded_vocab_size", "int", None, "Embedding rows; derived by Megatron-LM, recorded by converters.", cli=False
    ),
    Flag("max_position_embeddings", "int", None, "Maximum sequence length the model supports."),
    Flag("seq_length", "int", None, "Training sequence length."),
)

_BY_NAME: Dict[str, Flag] = {f.name: f for f in MODEL_FLAGS}
_MLA_SIZES = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type")


def _checked_arg(typ: Callable, check: Callable, text: str):
    value = typ(text)
    problem = check(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every CLI model flag to ``parser`` (an argument group named 'model architecture')."""
    group = parser.add_argument_group("model architecture")
    for f in MODEL_FLAGS:
        if not f.cli:
            continue
        if f.kind == "bool":
            group.add_argument(f.option, action="store_true", default=f.default, help=f.help)
            continue
        typ: Callable = {"int": int, "float": float, "str": str, "freq": _moe_freq_arg}[f.kind]
        if f.check is not None:
            typ = functools.partial(_checked_arg, typ, f.check)
        group.add_argument(f.option, type=typ, default=f.default, choices=f.choices, help=f.help)
    return parser


def flags_from_args(args: Union[argparse.Namespace, Dict[str, Any]]) -> Dict[str, Any]:
    """Pick the model flags out of an argparse Namespace (or dict); missing ones get defaults."""
    src = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return normalize_flags({k: src[k] for k in _BY_NAME if k in src})


def normalize_flags(flags: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Return a complete flags dict: defaults filled in, unknown names rejected, values typed.
    ``where`` starts every refusal (the file the flags come from)."""
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise OrdMoEError(f"{where}unknown model flag(s): {', '.join(unknown)}")
    out: Dict[str, Any] = {}
    for f in MODEL_FLAGS:
        v = flags.get(f.name, f.default)
        if v is not None:
            if f.kind == "freq":
                v = parse_moe_layer_freq(v)  # its refusals name the flag and the value
            elif f.kind in ("int", "float", "bool"):
                try:
                    v = {"int": int, "float": float, "bool": bool}[f.kind](v)
                except (TypeError, ValueError):
                    raise OrdMoEError(f"{where}model flag {f.name}={v!r} is not a valid {f.kind}") from None
            problem = f.check(v) if f.check is not None else None
            if problem:
                raise OrdMoEError(f"{where}{problem}")
            if f.choices and v not in f.choices:
                raise OrdMoEError(f"{where}model flag {f.name}={v!r} not in {f.choices}")
        out[f.name] = v
    return out


def flags_to_argv(flags: Dict[str, Any]) -> List[str]:
    """The Megatron-LM command-line flags equivalent to ``flags``. Every valued flag is spelled
    out, defaults included, so a launcher with other defaults reads the same model; boolean
    flags appear when true; flags that do not apply (MoE flags without experts, query groups
    without GQA) are left out, and so is ``--qk-layernorm-scope head`` (the default, and not a
    Megatron-LM flag: pretrain_gpt.py refuses a checkpoint with the projection scope)."""
    flags = normalize_flags(flags)
    argv: List[str] = []
    for f in MODEL_FLAGS:
        v = flags[f.name]
        if not f.cli or v is None:
            continue
        if f.name.startswith("moe_") and not flags["num_experts"]:
            continue
        if f.name == "mtp_loss_scaling_factor" and not flags["mtp_num_layers"]:
            continue
        if f.name in _MLA_SIZES and not flags["multi_latent_attention"]:
            continue
        if f.name == "num_query_groups" and not flags["group_query_attention"]:
            continue
        if f.name == "qk_layernorm_scope" and v == "head":
            continue
        if f.kind == "bool":
            if v:
                argv.append(f.option)
        elif f.kind == "freq" and isinstance(v, list):
            argv += [f.option, _compact_freq(v)]
        else:
            argv += [f.option, repr(v) if f.kind == "float" else str(v)]
    return argv


def _compact_freq(pattern: List[int]) -> str:
    runs: List[str] = []
    i = 0
    while i < len(pattern):
        j = i
        while j < len(pattern) and pattern[j] == pattern[i]:
            j += 1
        runs.append(f"[{pattern[i]}]*{j - i}" if j - i > 1 else f"[{pattern[i]}]")
        i = j
    return "(" + "+".join(runs) + ")"


def padded_vocab_size(flags: Dict[str, Any], tensor_model_parallel_size: int = 1) -> int:
    """Embedding rows: ``padded_vocab_size`` if recorded, else vocab_size padded as Megatron-LM does."""
    flags = normalize_flags(flags)
    if flags["padded_vocab_size"] is not None:
        return flags["padded_vocab_size"]
    if flags["vocab_size"] is None:
        raise OrdMoEError("model flags need vocab_size (or padded_vocab_size): pass --vocab-size")
    multiple = flags["make_vocab_size_divisible_by"] * tensor_model_parallel_size
    return -(-flags["vocab_size"] // multiple) * multiple


def transformer_config_from_flags(flags: Dict[str, Any], **overrides):
    """Build a ``TransformerConfig`` from model flags; ``overrides`` (parallelism, precision, dropout,
    dispatcher, ...) are TransformerConfig fields applied last."""
    f = normalize_flags(flags)
    for required in ("num_layers", "hidden_size", "num_attention_heads"):
        if f[required] is None:
            raise OrdMoEError(f"model flag {required} is required: pass --{required.replace('_', '-')}")
    problem = qk_norm.projection_scope_problem(f, overrides.get("tensor_model_parallel_size", 1))
    if problem:
        raise OrdMoEError(problem)
    moe = f["num_experts"] is not None
    kw: Dict[str, Any] = dict(
        num_layers=f["num_layers"],
        hidden_size=f["hidden_size"],
        ffn_hidden_size=f["ffn_hidden_size"],
        num_attention_heads=f["num_attention_heads"],
        num_query_groups=f["num_query_groups"] if f["group_query_attention"] else None,
        kv_channels=f["kv_channels"],
        normalization=f["normalization"],
        layernorm_epsilon=f["norm_epsilon"],
        gated_linear_unit=f["swiglu"],
        activation_func=F.silu if f["swiglu"] else F.gelu,
        add_bias_linear=not f["disable_bias_linear"],
        add_qkv_bias=f["add_qkv_bias"],
        qk_layernorm=f["qk_layernorm"],
    )
    if moe:
        kw.update(
            num_moe_experts=f["num_experts"],
            moe_router_topk=f["moe_router_topk"],
            moe_ffn_hidden_size=f["moe_ffn_hidden_size"] or f["ffn_hidden_size"],
            moe_shared_expert_intermediate_size=f["moe_shared_expert_intermediate_size"],
            moe_shared_expert_gate=f["moe_shared_expert_gate"],
            moe_router_pre_softmax=f["moe_router_pre_softmax"],
            moe_router_score_function=f["moe_router_score_function"],
            moe_router_topk_scaling_factor=f["moe_router_topk_scaling_factor"],
            moe_layer_freq=f["moe_layer_freq"],
            moe_router_num_groups=f["moe_router_num_groups"],
            moe_router_group_topk=f["moe_router_group_topk"],
            moe_router_enable_expert_bias=f["moe_router_enable_expert_bias"],
        )
        if f["moe_router_bias_update_rate"] is not None:
            kw["moe_router_bias_update_rate"] = f["moe_router_bias_update_rate"]
    if f["mtp_num_layers"]:
        kw["mtp_num_layers"] = f["mtp_num_layers"]
        if f["mtp_loss_scaling_factor"] is not None:
            kw["mtp_loss_scaling_factor"] = f["mtp_loss_scaling_factor"]
    config_class = TransformerConfig
    if f["multi_latent_attention"]:
        problem = compat.mla_query_projection_problem(f["q_lora_rank"])
        if problem:
            raise OrdMoEError(problem)
        config_class = MLATransformerConfig
        kw["multi_latent_attention"] = True
        kw.update({name: f[name] for name in _MLA_SIZES if f[name] is not None or name == "q_lora_rank"})
        # MLA builds its own rotary embedding from these config fields (GPTModel's arguments are unused)
        kw.update(rotary_base=f["rotary_base"], rotary_percent=f["rotary_percent"])
    kw.update(overrides)
    try:
        return config_class(**kw)
    except (AssertionError, TypeError, ValueError) as err:  # Megatron's own checks of the model
        raise OrdMoEError(f"megatron-core refuses this model configuration: {err or type(err).__name__}") from None


def gpt_model_from_flags(
    flags: Dict[str, Any], config, layer_spec=None, model_class=None, packed_sequences: bool = False, **model_kwargs
):
    """Build ``megatron.core.models.gpt.GPTModel``. Default spec: the local (non-TE) layer spec, or,
    when ``moe_layer_freq`` puts dense layers in, the local decoder block spec. Pass ``layer_spec``
    to swap modules (state-dict keys must stay those of the local spec). ``model_kwargs`` go to
    GPTModel (pre_process, post_process, vp_stage, ...); pre/post_process default to this rank's
    pipeline stage. ``model_class`` builds a GPTModel subclass instead (e.g. ``OrdMoEGPTModel``,
    whose extra keyword arguments go in ``model_kwargs``). With ``mtp_num_layers`` the MTP block's
    layer is the decoder's last layer spec, as Megatron-LM's ``gpt_builder`` makes it (built from
    the spec as given: ``OrdMoEGPTModel`` swaps the routers of the decoder's layers only).
    ``packed_sequences``: the default spec's local attention also runs THD packed sequences
    (``runtime.packed_attention``)."""

    f = normalize_flags(flags)
    if layer_spec is None:
        if f["num_experts"] is not None and has_dense_layers(f["num_layers"], f["moe_layer_freq"]):
            layer_spec = get_gpt_decoder_block_spec(
                config,
                use_transformer_engine=False,
                normalization=f["normalization"],
                vp_stage=model_kwargs.get("vp_stage"),
            )
        else:
            layer_spec = get_gpt_layer_local_spec(
                num_experts=f["num_experts"],
                moe_grouped_gemm=False,
                qk_layernorm=f["qk_layernorm"],
                normalization=f["normalization"],
                multi_latent_attention=f["multi_latent_attention"],
            )
        if f["multi_latent_attention"]:  # the local spec's attention cannot run MLA (bridges)
            layer_spec = bridges.local_mla_attention_spec(layer_spec)
        if config.sequence_parallel and not torch.cuda.is_available():
            # torch's LayerNorm refuses sequence parallelism; the CPU stand-in does not.
            layer_spec = bridges.sequence_parallel_layer_spec(layer_spec)
        if packed_sequences:
            layer_spec = packed_attention_spec(layer_spec)
    if f["qk_layernorm_scope"] == "projection":  # before the MTP block copies the last layer's spec
        problem = qk_norm.projection_scope_problem(f, config.tensor_model_parallel_size)
        if problem:
            raise OrdMoEError(problem)
        layer_spec = qk_norm.projection_qk_norm_spec(layer_spec)
    if "pre_process" not in model_kwargs or "post_process" not in model_kwargs:
        vp = model_kwargs.get("vp_stage")
        try:
            first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=vp)
        except (AssertionError, AttributeError, RuntimeError, TypeError):
            first = last = True
        model_kwargs.setdefault("pre_process", first)
        model_kwargs.setdefault("post_process", last)
    if f["mtp_num_layers"] and "mtp_block_spec" not in model_kwargs:
        # A block spec (dense layers in) holds this stage's layers; MTP sits on the last stage.
        last = layer_spec.layer_specs[-1] if getattr(layer_spec, "layer_specs", None) else layer_spec
        mtp_spec = get_gpt_mtp_block_spec(
            config, last, use_transformer_engine=False, vp_stage=model_kwargs.get("vp_stage")
        )
        if mtp_spec is not None and config.sequence_parallel and not torch.cuda.is_available():
            mtp_spec = bridges.sequence_parallel_layer_spec(mtp_spec)  # its own norms, as the layers'
        model_kwargs["mtp_block_spec"] = mtp_spec
    max_pos = f["max_position_embeddings"] or f["seq_length"]
    if max_pos is None:
        raise OrdMoEError("model flags need max_position_embeddings or seq_length: pass --seq-length")
    return (model_class or GPTModel)(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(f, config.tensor_model_parallel_size),
        max_sequence_length=max_pos,
        share_embeddings_and_output_weights=not f["untie_embeddings_and_output_weights"],
        position_embedding_type=f["position_embedding_type"],
        rotary_percent=f["rotary_percent"],
        rotary_base=f["rotary_base"],
        **model_kwargs,
    )
