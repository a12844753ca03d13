"""Launch checks without a GPU: Megatron's compute-capability checks see an assumed GPU."""

from __future__ import annotations

import contextlib
import types

import torch


@contextlib.contextmanager
def assumed_gpu_capability():
    """While checking launch arguments on a machine without a GPU (a login node, CI), Megatron's
    compute-capability checks (``--moe-grouped-gemm``, MoE communication overlap) see an sm_90
    GPU; the originals are back afterwards. With CUDA present nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    hopper = types.SimpleNamespace(
        name="assumed sm_90 GPU (no GPU here)", major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132
    )
    originals = {
        "get_device_capability": torch.cuda.get_device_capability,
        "get_device_properties": torch.cuda.get_device_properties,
    }
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_properties = lambda device=None: hopper
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(torch.cuda, name, value)
