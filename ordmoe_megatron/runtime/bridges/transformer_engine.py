"""Transformer Engine absent: the names megatron-core uses without defining them then.

``moe_utils.te_general_gemm`` -- megatron-core 0.16 references it unconditionally in the router
gating GEMM but defines it only when Transformer Engine imports; without TE (on a GPU too) the
first router call raises a NameError. Defined as ``None`` so the plain ``torch.mm`` fallback runs
(0.17 on define it as ``None`` themselves).

``CLIPViTModel``'s norms -- without TE its ``ln_pre``/``ln_post`` default to ``torch.nn.LayerNorm``,
which it then builds with Megatron's norm arguments (``config=``): a TypeError, so no CLIP ViT
(nor ``LLaVAModel``) can be built. Defaulted to ``WrappedTorchNorm``, Megatron's torch norm that
takes those arguments (the same ``torch.nn.LayerNorm`` inside).

``multi_latent_attention.HAVE_TE`` -- megatron-core 0.16's extensions module imports without
Transformer Engine, with mock stand-ins for its classes, so MLA believes TE is there and its
``isinstance(..., TELinear)`` fails on the mock: set to False when ``TELinear`` is not a class.

Multi-latent attention's core attention -- MLA builds its core attention with separate key and
value head sizes (``k_channels``, ``v_channels``), which only Transformer Engine's attention takes;
the local spec's ``DotProductAttention`` refuses them (megatron-core 0.16 to 0.19).
:func:`local_mla_attention_spec` puts :class:`LocalMLACoreAttention` (causal softmax attention in
plain PyTorch, those sizes allowed) into the MLA layers of a spec instead; parameter-free, so the
state dict is unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Optional

import megatron.core.models.vision.clip_vit_model as clip_vit_model
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.transformer.multi_latent_attention as multi_latent_attention
import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from ordmoe_megatron.runtime.bridges.guards import BridgeError, check_params


def bridge_missing_transformer_engine() -> None:
    """Whenever Transformer Engine is absent, on a GPU too (``bridges.enable()`` calls it)."""
    _bridge_vision_norm()
    if multi_latent_attention.HAVE_TE and not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False  # a mock stand-in, not Transformer Engine's class
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


class LocalMLACoreAttention(MegatronModule):
    """MLA's core attention without Transformer Engine: softmax(q k^T * scale) v per head, causal
    (or with Megatron's boolean mask, True = masked), key and value head sizes of their own."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise BridgeError("LocalMLACoreAttention: context parallelism needs Transformer Engine's attention")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(k_channels or config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, **unused):
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and attention_mask is None
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def local_mla_attention_spec(spec: Any) -> Any:
    """A copy of a layer or block spec whose MLA layers use :class:`LocalMLACoreAttention` where
    they would use the local ``DotProductAttention``; other layers unchanged."""

    def swap(obj: Any) -> Any:
        if isinstance(obj, multi_latent_attention.MLASelfAttentionSubmodules):
            core = obj.core_attention
            if core is DotProductAttention or getattr(core, "module", None) is DotProductAttention:
                obj = dataclasses.replace(obj, core_attention=LocalMLACoreAttention)
            return obj
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(
                obj, **{f.name: swap(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
            )
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(o) for o in obj)
        return obj

    return swap(spec)
