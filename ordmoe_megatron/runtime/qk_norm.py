"""Query/key RMSNorm over the whole projection (``--qk-layernorm-scope projection``, OLMoE's q/k norm).

megatron-core's ``qk_layernorm`` normalises each head: ``SelfAttention`` builds ``q_layernorm`` and
``k_layernorm`` with ``hidden_size=kv_channels`` and applies them to ``[sq, b, heads, head_dim]``.
OLMoE's ``q_norm``/``k_norm`` normalise q_proj's (k_proj's) whole output instead: one root mean
square over ``heads * head_dim`` features per token, and a weight of that size. The two modules
here take the arguments megatron-core builds its q/k norms with (``config``, ``hidden_size`` = the
head dim, ``eps``), hold a ``heads * head_dim`` weight and normalise the last two dimensions
together. Both megatron-core 0.16 (``build_module``) and 0.19 (a builder it calls) construct a
class named in the spec the same way, so the query and key norms are two classes whose head counts
come from the config (query heads; query groups for keys). With tensor parallelism a rank holds
only some heads, so the norm would need an all-reduce: ``projection_scope_problem`` refuses it.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttentionSubmodules

from ordmoe_megatron.runtime import compat

__all__ = ["ProjectionQNorm", "ProjectionKNorm", "projection_qk_norm_spec", "projection_scope_problem"]


class _ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over ``[..., heads, head_dim]`` taken as one ``heads * head_dim`` vector."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = self.num_heads(config)
        self.head_dim = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.heads * hidden_size, dtype=config.params_dtype))

    @staticmethod
    def num_heads(config: Any) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.heads, self.head_dim):
            raise ValueError(
                f"{type(self).__name__}: expected [..., {self.heads}, {self.head_dim}], got {list(x.shape)}"
            )
        flat = x.reshape(*x.shape[:-2], self.heads * self.head_dim)
        return F.rms_norm(flat, (flat.shape[-1],), self.weight, self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"RMSNorm over {self.heads}x{self.head_dim}, eps={self.eps}"


class ProjectionQNorm(_ProjectionRMSNorm):
    """The query norm: over all ``num_attention_heads`` heads."""

    @staticmethod
    def num_heads(config: Any) -> int:
        return config.num_attention_heads


class ProjectionKNorm(_ProjectionRMSNorm):
    """The key norm: over all ``num_query_groups`` key heads."""

    @staticmethod
    def num_heads(config: Any) -> int:
        return config.num_query_groups or config.num_attention_heads


def projection_scope_problem(flags: dict, tensor_model_parallel_size: int = 1) -> Optional[str]:
    """Why ``qk_layernorm_scope='projection'`` cannot be built with these model flags (None: it can)."""
    if flags.get("qk_layernorm_scope", "head") != "projection":
        return None
    where = "--qk-layernorm-scope projection"
    if not flags.get("qk_layernorm"):
        return f"{where} sets where the q/k norm normalises: pass --qk-layernorm too"
    if flags.get("multi_latent_attention"):
        return f"{where}: multi-latent attention has its own latent norms; drop one of the two"
    if flags.get("normalization") != "RMSNorm":
        return f"{where} is an RMSNorm (OLMoE's): pass --normalization RMSNorm"
    if tensor_model_parallel_size > 1:
        return (
            f"{where} normalises over every head, which tensor parallelism splits across ranks (the norm "
            f"would need an all-reduce): use --tensor-model-parallel-size 1 (got {tensor_model_parallel_size})"
        )
    return None


def projection_qk_norm_spec(spec: Any) -> Any:
    """A copy of a layer or block spec whose self-attention q/k norms are ``ProjectionQNorm`` and
    ``ProjectionKNorm`` (state-dict keys unchanged: ``q_layernorm.weight``, ``k_layernorm.weight``)."""
    spec = copy.deepcopy(spec)
    if not _swap(spec):
        raise ValueError("--qk-layernorm-scope projection: the layer spec has no self-attention to put the norm in")
    return spec


def _swap(node: Any) -> int:
    if isinstance(node, SelfAttentionSubmodules):
        node.q_layernorm, node.k_layernorm = ProjectionQNorm, ProjectionKNorm
        return 1
    return sum(_swap(child) for child in compat.spec_children(node))
