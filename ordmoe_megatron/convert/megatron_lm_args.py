"""The model flags of a Megatron-LM checkpoint, read from the checkpoint itself.

``pretrain_gpt.py --save`` writes no ``model_args.json``: its arguments are the ``args`` namespace
in each iteration's ``common.pt``. ``megatron_lm_model_flags`` reads it with
``torch.load(weights_only=True)``, allowing only ``argparse.Namespace`` and the plain ``Enum``
classes the namespace holds (``AttnBackend``, ``ModelType``, ``signal.Signals``: rebuilt from their
values, nothing runs), and maps Megatron-LM's stored names onto the model flags
(``runtime.model_flags``): mostly the same names; ``add_bias_linear`` is the negation of
``disable_bias_linear``; ``layernorm_epsilon`` is ``norm_epsilon``.

A checkpoint trained with a setting the conversion does not map (``REFUSED``) is refused with the
flag's name before anything is read further.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ordmoe_megatron.runtime.checkpointing import checkpoint_dir, latest_iteration
from ordmoe_megatron.runtime.model_flags import MODEL_FLAGS

from .engine import ConversionError

COMMON = "common.pt"
# Megatron-LM argument -> model flag, where the names differ (value -> value).
RENAMED: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "add_bias_linear": ("disable_bias_linear", lambda v: not v),
    "layernorm_epsilon": ("norm_epsilon", float),
}
# Settings whose weights or arithmetic the conversion does not map: (argument, is it plain?, why).
REFUSED: Tuple[Tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "transformer_impl",
        lambda v: v in (None, "local"),
        "its layer norms are stored inside linear_qkv / linear_fc1; convert a run trained with "
        "--transformer-impl local",
    ),
    ("moe_grouped_gemm", lambda v: not v, "grouped expert weights are not mapped; train without --moe-grouped-gemm"),
    ("use_legacy_models", lambda v: not v, "legacy models have another layout"),
    ("spec", lambda v: v is None, "a custom layer spec has other modules"),
    ("heterogeneous_layers_config_path", lambda v: v is None, "heterogeneous layers are not mapped"),
    ("multi_latent_attention", lambda v: not v, "multi-latent attention is not mapped"),
    ("mtp_num_layers", lambda v: not v, "multi-token prediction layers are not mapped"),
    ("moe_router_enable_expert_bias", lambda v: not v, "the router's expert bias is not mapped"),
    ("squared_relu", lambda v: not v, "only GeLU and SwiGLU MLPs are mapped"),
    ("openai_gelu", lambda v: not v, "only GeLU and SwiGLU MLPs are mapped"),
    ("quick_geglu", lambda v: not v, "only GeLU and SwiGLU MLPs are mapped"),
    ("glu_linear_offset", lambda v: not v, "only the plain SwiGLU is mapped"),
    ("activation_func_clamp_value", lambda v: v is None, "only unclamped activations are mapped"),
    ("layernorm_zero_centered_gamma", lambda v: not v, "zero-centred norm weights are not mapped"),
    ("apply_layernorm_1p", lambda v: not v, "zero-centred norm weights are not mapped"),
    ("apply_residual_connection_post_layernorm", lambda v: not v, "post-norm residuals are not mapped"),
    ("rotary_interleaved", lambda v: not v, "interleaved RoPE is not mapped"),
    ("use_rope_scaling", lambda v: not v, "RoPE scaling is not mapped"),
    ("rotary_seq_len_interpolation_factor", lambda v: v is None, "RoPE interpolation is not mapped"),
    ("rope_type", lambda v: v in (None, "rope"), "only plain RoPE is mapped"),
    ("no_rope_freq", lambda v: v is None, "layers without RoPE are not mapped"),
    ("mrope_section", lambda v: v is None, "multimodal RoPE is not mapped"),
    ("window_size", lambda v: v is None, "sliding-window attention is not mapped"),
    ("attention_output_gate", lambda v: not v, "the attention output gate is not mapped"),
    ("softmax_type", lambda v: v in (None, "vanilla"), "only the vanilla attention softmax is mapped"),
    ("qk_l2_norm", lambda v: not v, "L2-normalised queries and keys are not mapped"),
    ("experimental_attention_variant", lambda v: v is None, "attention variants are not mapped"),
    ("moe_latent_size", lambda v: v is None, "latent MoE projections are not mapped"),
)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _allowed_globals(path: str) -> list:
    """``argparse.Namespace`` and the ``Enum`` classes (of the standard library's ``signal`` or of
    ``megatron``) that ``path`` refers to; any other global refuses the file."""
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        module, _, qualname = name.rpartition(".")
        if name == "argparse.Namespace":
            allowed.append(argparse.Namespace)
            continue
        cls = None
        if module == "signal" or module.split(".")[0] == "megatron":
            try:
                cls = getattr(importlib.import_module(module), qualname, None)
            except ImportError:
                cls = None
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise ConversionError(
                f"{path} holds {name}, which is not read without running code from the file; "
                "write the model flags to model_args.json next to the tracker instead"
            )
        allowed.append(cls)
    return allowed


def read_megatron_lm_args(path: str) -> Optional[argparse.Namespace]:
    """The ``args`` namespace of one ``common.pt``; None when it holds none (a converted or
    ``ordmoe-pretrain`` checkpoint)."""
    try:
        with torch.serialization.safe_globals(_allowed_globals(path)):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ConversionError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    args = common.get("args") if isinstance(common, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


def flags_from_megatron_lm_args(args: argparse.Namespace, where: str = "") -> Dict[str, Any]:
    """Model flags (``runtime.model_flags`` names) from Megatron-LM's stored arguments; a setting
    in ``REFUSED`` ends it with the flag's name and the way out."""
    stored = vars(args)
    for name, plain, why in REFUSED:
        if name in stored and not plain(stored[name]):
            value = stored[name]
            shown = _option(name) + ("" if value is True else f" {value}")
            raise ConversionError(f"{where}the Megatron-LM run was trained with {shown}: {why}")
    flags: Dict[str, Any] = {}
    for flag in MODEL_FLAGS:
        if flag.name in stored:
            flags[flag.name] = stored[flag.name]
    for name, (flag, convert) in RENAMED.items():
        if name in stored and stored[name] is not None:
            flags[flag] = convert(stored[name])
    return flags


def megatron_lm_model_flags(root: str, flag: str) -> Optional[Dict[str, Any]]:
    """The model flags of the checkpoint under ``root`` that the tracker names, from its
    ``common.pt``; None when that iteration has no ``common.pt`` or it holds no args."""
    path = os.path.join(checkpoint_dir(root, latest_iteration(root, flag)), COMMON)
    args = read_megatron_lm_args(path) if os.path.isfile(path) else None
    return None if args is None else flags_from_megatron_lm_args(args, where=f"{flag} {root}: ")
