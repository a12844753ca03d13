"""What a step with ``C`` tier paths costs in FLOPs, against the plain model's step.

The paths share nothing but weights: every path is a full forward and backward of every layer
and of the output layer, except the leading layers the model runs once for all paths (the lazy
fan-out, ``OrdMoEConfig.shared_prefix_layers``).
"""
from __future__ import annotations


def ordmoe_step_flops(plain_step_flops: float, shared_prefix_flops: float, num_paths: int) -> float:
    """``C`` plain steps, less the ``C - 1`` extra copies of the layers the paths share."""
    return num_paths * plain_step_flops - (num_paths - 1) * shared_prefix_flops
