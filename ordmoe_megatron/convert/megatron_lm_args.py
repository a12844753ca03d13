"""The model flags of a Megatron-LM checkpoint, read from the checkpoint itself.

``pretrain_gpt.py --save`` writes no ``model_args.json``: its arguments are the ``args`` namespace
of each iteration's common state, in ``common.pt`` (core_v0.16) or, from core_v0.19, in the
``torch_dist`` checkpoint itself as the bytes item ``common_state``. ``megatron_lm_model_flags``
reads it with
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
import io
import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from ordmoe_megatron.runtime.checkpointing import checkpoint_dir, latest_iteration
from ordmoe_megatron.runtime.model_flags import MODEL_FLAGS

from .engine import ConversionError

COMMON = "common.pt"
COMMON_STATE = "common_state/"  # the bytes item that holds it inside a core_v0.19 checkpoint
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


class _Unavailable:
    """Stands for an enum value of a Megatron-LM newer than the megatron-core here (e.g.
    core_v0.19's ``InferenceCudaGraphScope``): it keeps the value and nothing else; no model flag
    is such a value."""

    def __init__(self, *value):
        self.value = value


def _allowed_globals(path: str, source: Union[str, io.BytesIO]) -> list:
    """``argparse.Namespace`` and the ``Enum`` classes (of the standard library's ``signal`` or of
    ``megatron``) that ``source`` refers to, ``_Unavailable`` for a ``megatron`` one this
    megatron-core lacks; any other global refuses the file ``path``."""
    allowed = []
    names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    for name in names:
        module, _, qualname = name.rpartition(".")
        if name == "argparse.Namespace":
            allowed.append(argparse.Namespace)
            continue
        if module != "signal" and module.split(".")[0] != "megatron":
            cls = None
        else:
            try:
                cls = getattr(importlib.import_module(module), qualname, _Unavailable)
            except ImportError:
                cls = _Unavailable
        if cls is _Unavailable and module.split(".")[0] == "megatron":
            allowed.append((_Unavailable, name))
            continue
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise ConversionError(
                f"{path} holds {name}, which is not read without running code from the file; "
                "write the model flags to model_args.json next to the tracker instead"
            )
        allowed.append(cls)
    return allowed


class _RawBytesPlanner(DefaultLoadPlanner):
    """Keeps a bytes item as it is stored: torch's planner would unpickle it with
    ``weights_only=False``, which runs whatever the file says."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn].write(value.read())  # the caller's BytesIO


def _common_state_bytes(ckpt_dir: str) -> Optional[io.BytesIO]:
    """The ``common_state`` bytes item of a core_v0.19 ``torch_dist`` checkpoint; None if none."""
    try:
        items = FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - not a torch_dist checkpoint: the conversion names it later
        return None
    keys = [k for k, v in items.items() if k.startswith(COMMON_STATE) and isinstance(v, BytesStorageMetadata)]
    if len(keys) != 1:
        return None
    state = {keys[0]: io.BytesIO()}
    try:
        dcp_load(
            state,
            storage_reader=FileSystemReader(ckpt_dir),
            planner=_RawBytesPlanner(flatten_state_dict=False),
            no_dist=True,
        )
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ConversionError(f"{ckpt_dir}: its {keys[0]} cannot be read ({type(err).__name__})") from None
    state[keys[0]].seek(0)
    return state[keys[0]]


def read_megatron_lm_args(path: str, source: Union[str, io.BytesIO, None] = None) -> Optional[argparse.Namespace]:
    """The ``args`` namespace of one common state (``path``, or ``source`` read from ``path``);
    None when it holds none (a converted or ``ordmoe-pretrain`` checkpoint)."""
    source = path if source is None else source
    try:
        allowed = _allowed_globals(path, source)
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with torch.serialization.safe_globals(allowed):
            common = torch.load(source, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ConversionError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    if isinstance(common, io.BytesIO) and isinstance(source, io.BytesIO):  # saved as a BytesIO: unwrap once
        common.seek(0)
        return read_megatron_lm_args(path, common)
    if isinstance(common, list) and len(common) == 1:  # a ShardedObject's data: [state]
        common = common[0]
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
    common state; None when that iteration has none or it holds no args."""
    ckpt_dir = checkpoint_dir(root, latest_iteration(root, flag))
    path = os.path.join(ckpt_dir, COMMON)
    if os.path.isfile(path):
        args = read_megatron_lm_args(path)
    else:
        state = _common_state_bytes(ckpt_dir)
        args = None if state is None else read_megatron_lm_args(f"{ckpt_dir} ({COMMON_STATE[:-1]})", state)
    return None if args is None else flags_from_megatron_lm_args(args, where=f"{flag} {root}: ")
