"""Packed sequences (THD, ``PackedSeqParams(qkv_format="thd")``) on megatron-core's local attention.

megatron-core's ``DotProductAttention`` refuses packed sequences (``assert packed_seq_params is
None``: they are Transformer Engine's). Without Transformer Engine (the CPU) this subclass runs
them: the packed row ``[t, heads, dim]`` becomes a batch of one, and the attention mask is block-
diagonal causal from ``cu_seqlens`` (a token sees the earlier tokens of its own document only;
a position past the last document sees itself), which is what Transformer Engine's THD kernels
compute. ``packed_attention_spec`` puts it into a local layer spec; a Transformer Engine spec is
returned as it is. It materialises a ``t x t`` mask: for CPU tests and the tiny runs, not for
long rows.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from ordmoe_megatron.runtime import compat


def packed_boundaries(packed_seq_params, side: str = "q") -> torch.Tensor:
    """The document boundaries of the packed row on ``side`` (``q`` or ``kv``): the padded
    ``cu_seqlens`` where given (the documents' positions in the row), else the plain ones."""
    padded = getattr(packed_seq_params, f"cu_seqlens_{side}_padded")
    return padded if padded is not None else getattr(packed_seq_params, f"cu_seqlens_{side}")


def block_causal_mask(cu_q: torch.Tensor, cu_kv: torch.Tensor, len_q: int, len_kv: int) -> torch.Tensor:
    """``[1, 1, len_q, len_kv]``, True where attention is masked: other documents and the future."""
    doc_q = _owners(cu_q, len_q)
    doc_kv = _owners(cu_kv, len_kv)
    pos_q = torch.arange(len_q, device=doc_q.device)
    pos_kv = torch.arange(len_kv, device=doc_q.device)
    # Causal within a document: positions are offsets from the document's start on each side.
    start_q = cu_q.to(torch.long).to(doc_q.device)[doc_q.clamp(max=cu_q.numel() - 2)]
    start_kv = cu_kv.to(torch.long).to(doc_q.device)[doc_kv.clamp(max=cu_kv.numel() - 2)]
    visible = (doc_q[:, None] == doc_kv[None, :]) & ((pos_kv - start_kv)[None, :] <= (pos_q - start_q)[:, None])
    return ~visible.view(1, 1, len_q, len_kv)


def _owners(cu: torch.Tensor, length: int) -> torch.Tensor:
    """Each position's document; positions past the last document get their own id each."""
    cu = cu.to(torch.long)
    positions = torch.arange(length, device=cu.device)
    owner = torch.bucketize(positions, cu[1:], right=True)
    docs = cu.numel() - 1
    return torch.where(owner < docs, owner, docs + positions)


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also runs THD packed sequences (see the module docstring)."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: only 'thd' is supported")
        mask = block_causal_mask(
            packed_boundaries(packed_seq_params, "q"),
            packed_boundaries(packed_seq_params, "kv"),
            query.shape[0],
            key.shape[0],
        ).to(query.device)
        # [t, heads, dim] -> [t, 1, heads, dim]: one row; the output is [t, 1, heads * dim].
        return super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type)


def packed_attention_spec(spec):
    """A copy of ``spec`` whose local ``DotProductAttention`` nodes are ``PackedDotProductAttention``
    (the number of nodes swapped is not needed: a spec without any is returned unchanged)."""
    spec = copy.deepcopy(spec)
    _swap(spec)
    return spec


def _swap(node) -> None:
    for child in compat.spec_children(node):
        if hasattr(child, "core_attention") and child.core_attention is DotProductAttention:
            child.core_attention = PackedDotProductAttention
        _swap(child)
