"""Transformer Engine absent: the names megatron-core uses without defining them then.

``moe_utils.te_general_gemm`` -- megatron-core 0.16 references it unconditionally in the router
gating GEMM but defines it only when Transformer Engine imports; without TE (on a GPU too) the
first router call raises a NameError. Defined as ``None`` so the plain ``torch.mm`` fallback runs
(0.17 on define it as ``None`` themselves).
"""

from __future__ import annotations

import megatron.core.transformer.moe.moe_utils as moe_utils

from ordmoe_megatron.runtime.bridges.guards import BridgeError


def bridge_missing_transformer_engine() -> None:
    """Whenever Transformer Engine is absent, on a GPU too (``bridges.enable()`` calls it)."""
    if hasattr(moe_utils, "te_general_gemm"):
        return
    if getattr(moe_utils, "HAVE_TE", None) is not False:
        raise BridgeError(
            "bridges: moe_utils.te_general_gemm missing but HAVE_TE is not False; unexpected megatron-core"
        )
    moe_utils.te_general_gemm = None
