"""Everything that differs between the megatron-core versions this package supports.

One function per difference; nothing else in the package asks which version is installed.
"""
from __future__ import annotations

from megatron.core.transformer.moe import moe_utils


def pop_moe_aux_losses(num_microbatches: int) -> dict:
    """Megatron's per-layer MoE auxiliary losses of the step (``load_balancing_loss``,
    ``z_loss``, ...), each the mean over the layers that logged it and over micro-batches,
    reduced across ranks; the tracker is cleared."""
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    metrics = {}
    for name, entry in moe_utils.get_moe_layer_wise_logging_tracker().items():
        values = entry["values"].float()
        metrics[name] = (values[values != 0].mean() / num_microbatches).item() if (values != 0).any() else 0.0
    moe_utils.clear_aux_losses_tracker()
    return metrics
