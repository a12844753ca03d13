"""Megatron-LM's training loop (``pretrain_gpt.py``) on a machine without CUDA.

``megatron_lm_on_cpu()`` installs the bridges (``runtime.bridges.enable()``: the CPU emulation)
and rebinds the CUDA-only spots of Megatron-LM's ``megatron.training`` (nothing of Megatron-LM's
files is changed); a launcher calls it, then runs the script. ``typing_override_for_python_311``
is the one stand-in Megatron-LM's imports need on Python 3.11.

``megatron.training`` is Megatron-LM's, not megatron-core's: it is imported where it is used.
"""

from __future__ import annotations

import functools
import typing

import torch
import typing_extensions

from ordmoe_megatron.runtime import bridges
from ordmoe_megatron.runtime.bridges.guards import replace_existing


def megatron_lm_on_cpu() -> None:
    """Run Megatron-LM's ``pretrain()`` here (a machine without CUDA, Python 3.11), after
    ``bridges.enable()``:

    0. Megatron-LM core_v0.18 on imports ``typing.override`` (Python 3.12): on 3.11 it is
       ``typing_extensions.override``.
    1. ``pretrain()`` calls ``initialize_megatron()`` without ``allow_no_cuda``, which asserts
       ``torch.cuda.is_available()``: ``megatron.training.training.initialize_megatron`` gets
       ``allow_no_cuda=True``.
    2. ``_initialize_distributed`` creates Megatron's model-parallel groups, and
       ``_set_random_seed`` the CUDA RNG tracker, only when ``torch.cuda.device_count() > 0``:
       ``device_count`` returns 1 (the device mode maps ``cuda:0`` to the CPU).
    3. core_v0.16's ``_compile_dependencies`` calls ``megatron.legacy.fused_kernels.load``, which
       runs ``nvcc``: a no-op (core_v0.17 on have no fused kernels to build).
    """
    typing_override_for_python_311()
    bridges.enable()
    if torch.cuda.is_available():
        return
    # Megatron-LM's modules (not megatron-core's): only there when a Megatron-LM checkout is.
    import megatron.training.training as training

    replace_existing(
        training,
        "initialize_megatron",
        functools.partial(training.initialize_megatron, allow_no_cuda=True),
        "megatron.training.training",
    )
    torch.cuda.device_count = lambda: 1
    try:
        import megatron.legacy.fused_kernels as fused_kernels
    except ModuleNotFoundError:
        return
    replace_existing(fused_kernels, "load", lambda args: None, "megatron.legacy.fused_kernels")


def typing_override_for_python_311() -> None:
    """Megatron-LM core_v0.18 on imports ``typing.override``, new in Python 3.12 (Megatron-LM
    declares 3.12): on 3.11 it is ``typing_extensions.override``."""
    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override
