"""Transformer Engine absent: the names megatron-core uses without defining them then.

``moe_utils.te_general_gemm`` -- megatron-core 0.16 references it unconditionally in the router
gating GEMM but defines it only when Transformer Engine imports; without TE (on a GPU too) the
first router call raises a NameError. Defined as ``None`` so the plain ``torch.mm`` fallback runs
(0.17 on define it as ``None`` themselves).

``CLIPViTModel``'s norms -- without TE its ``ln_pre``/``ln_post`` default to ``torch.nn.LayerNorm``,
which it then builds with Megatron's norm arguments (``config=``): a TypeError, so no CLIP ViT
(nor ``LLaVAModel``) can be built. Defaulted to ``WrappedTorchNorm``, Megatron's torch norm that
takes those arguments (the same ``torch.nn.LayerNorm`` inside).
"""

from __future__ import annotations

import inspect

import megatron.core.models.vision.clip_vit_model as clip_vit_model
import megatron.core.transformer.moe.moe_utils as moe_utils
import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from ordmoe_megatron.runtime.bridges.guards import BridgeError, check_params


def bridge_missing_transformer_engine() -> None:
    """Whenever Transformer Engine is absent, on a GPU too (``bridges.enable()`` calls it)."""
    _bridge_vision_norm()
    if hasattr(moe_utils, "te_general_gemm"):
        return
    if getattr(moe_utils, "HAVE_TE", None) is not False:
        raise BridgeError(
            "bridges: moe_utils.te_general_gemm missing but HAVE_TE is not False; unexpected megatron-core"
        )
    moe_utils.te_general_gemm = None


def _bridge_vision_norm() -> None:
    init = clip_vit_model.CLIPViTModel.__init__
    if clip_vit_model.NORM_IMPL is not torch.nn.LayerNorm or init.__defaults__ is None:
        return  # Transformer Engine's TENorm, or already bridged
    check_params(
        init,
        (
            "self",
            "transformer_config",
            "transformer_layer_spec",
            "ln_pre_impl",
            "ln_post_impl",
            *tuple(inspect.signature(init).parameters)[5:],
        ),
        "CLIPViTModel.__init__",
    )
    init.__defaults__ = tuple(WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in init.__defaults__)
    clip_vit_model.NORM_IMPL = WrappedTorchNorm
