"""Checkpoint conversion between Hugging Face MoE models and Megatron-Core dist checkpoints.

One declarative table per family (:mod:`.families`), a small generic engine (:mod:`.engine`),
and Megatron-LM's checkpoint layout (:mod:`.mcore_io`). OrdMoE adds no parameters, so an OrdMoE
run's checkpoint converts back like any Megatron-Core GPT MoE checkpoint.
"""

from .api import flags_to_hf_config, hf_config_to_flags, hf_to_mcore, mcore_to_hf
from .engine import ConversionError
from .families import FAMILIES, REFUSED, get_family, infer_family
from .mcore_io import (
    load_model_weights,
    read_model_args,
    resolve_checkpoint_dir,
)

__all__ = [
    "ConversionError",
    "FAMILIES",
    "REFUSED",
    "flags_to_hf_config",
    "get_family",
    "hf_config_to_flags",
    "hf_to_mcore",
    "infer_family",
    "load_model_weights",
    "mcore_to_hf",
    "read_model_args",
    "resolve_checkpoint_dir",
]
