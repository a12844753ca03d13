"""The one place that patches megatron-core or torch: bridges for what a machine lacks.

One role per file:

- ``cpu_emulation``: without CUDA, megatron-core's real code paths on the CPU with gloo (the
  device mode, CUDA stand-ins, host split sizes, uneven gathers, a sequence-parallel norm);
- ``transformer_engine``: without Transformer Engine (a GPU too), the names megatron-core uses
  without defining them;
- ``process_lifetime``: checkpoint writers and watched workers die with the process that
  started them;
- ``launch_check``: Megatron's compute-capability checks see an assumed GPU while launch
  arguments are checked on a machine without one;
- ``guards``: every patch replaces only what is there and looks as expected (``BridgeError``
  otherwise).

``enable()`` installs what this machine needs, and nothing more: with CUDA and Transformer Engine
present it changes nothing. Idempotent. (Megatron-LM's training loop on a CPU needs three more
spots of Megatron-LM itself: ``megatron_lm.cpu_launch``.)
"""

from __future__ import annotations

import torch

from ordmoe_megatron.runtime.bridges.cpu_emulation import (
    CPUSequenceParallelNorm,
    CudaToCPUMode,
    config_overrides,
    is_enabled,
    sequence_parallel_layer_spec,
)
from ordmoe_megatron.runtime.bridges.cpu_emulation import install as install_cpu_emulation
from ordmoe_megatron.runtime.bridges.guards import BridgeError
from ordmoe_megatron.runtime.bridges.launch_check import assumed_gpu_capability
from ordmoe_megatron.runtime.bridges.process_lifetime import checkpoint_writers_die_with_parent, exit_when_parent_exits
from ordmoe_megatron.runtime.bridges.transformer_engine import (
    LocalMLACoreAttention,
    bridge_missing_transformer_engine,
    local_mla_attention_spec,
)

__all__ = [
    "BridgeError",
    "CPUSequenceParallelNorm",
    "CudaToCPUMode",
    "LocalMLACoreAttention",
    "assumed_gpu_capability",
    "bridge_missing_transformer_engine",
    "checkpoint_writers_die_with_parent",
    "config_overrides",
    "enable",
    "exit_when_parent_exits",
    "is_enabled",
    "local_mla_attention_spec",
    "sequence_parallel_layer_spec",
]


def enable() -> None:
    """Install the bridges this machine needs, in this process and the calling thread: the
    Transformer Engine names when TE is absent, the CPU emulation when CUDA is. Idempotent; other
    threads call it themselves (the CPU device mode is per thread)."""
    bridge_missing_transformer_engine()
    if not torch.cuda.is_available():
        install_cpu_emulation()
