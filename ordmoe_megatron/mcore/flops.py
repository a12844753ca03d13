"""What a training step costs in FLOPs, and what ``C`` tier paths cost against the plain step.

The paths share nothing but weights: every path is a full forward and backward of every layer
and of the output layer, except the leading layers the model runs once for all paths (the lazy
fan-out, ``OrdMoEConfig.shared_prefix_layers``) and the multi-token-prediction block, which
runs on path 1 only. Sub-sampled lower paths run on a share ``m / b`` of the sequences. The path
schedule (fused or sequential) does not change a GPT model's count (a vision-language model's
encoder runs once per path in the sequential schedule: ``mcore.tiny_vl.vl_step_flops``).

``gpt_step_flops`` counts a GPT step's matrix multiplications from a ``TransformerConfig`` with
the terms of Megatron-LM's ``num_floating_point_operations`` (which lives in Megatron-LM, not in
megatron-core): attention projections (multi-latent attention's low-rank ones included), causal
attention scores, dense or MoE MLPs (router, the top-K experts, shared experts), the MTP layers
(a layer like the last one, the embedding/hidden projection, their own output layer), the output
layer; the backward counts twice the forward.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ordmoe_megatron.method import moe_layer_pattern


def ordmoe_step_flops(
    plain_step_flops: float,
    shared_prefix_flops: float,
    num_paths: int,
    lower_path_share: float = 1.0,
    path_one_only_flops: float = 0.0,
) -> float:
    """The plain step, plus ``C - 1`` lower paths on ``lower_path_share`` of the sequences, each
    without the layers the paths share and without what path 1 alone runs (the MTP block)."""
    lower_path = plain_step_flops - shared_prefix_flops - path_one_only_flops
    return plain_step_flops + (num_paths - 1) * lower_path_share * lower_path


def gpt_step_flops(
    config,
    vocab_size: int,
    sequences: int,
    seq_length: int,
    layers: Optional[Sequence[int]] = None,
    output_layer: bool = True,
    mtp: Optional[bool] = None,
) -> float:
    """Training FLOPs (forward and backward) of ``sequences`` sequences of ``seq_length`` tokens
    through the 0-based ``layers`` (all by default), with ``output_layer`` the output layer, and
    with ``mtp`` (by default: when all layers and the output layer are counted) the MTP layers."""
    h = config.hidden_size
    attention = _attention_per_token(config, seq_length)
    gated = 3 if config.gated_linear_unit else 2  # matmuls of a (gated) MLP's input side plus output
    dense = 2 * h * config.ffn_hidden_size * gated
    moe = 0.0
    if config.num_moe_experts:
        shared = config.moe_shared_expert_intermediate_size or 0
        moe = (
            2 * h * config.num_moe_experts
            + 2 * h * (config.moe_router_topk * config.moe_ffn_hidden_size + shared) * gated
        )
    pattern = (
        moe_layer_pattern(config.num_layers, config.moe_layer_freq)
        if config.num_moe_experts
        else [0] * config.num_layers
    )
    chosen = range(config.num_layers) if layers is None else layers
    per_token = sum(attention + (moe if pattern[i] else dense) for i in chosen)
    if output_layer:
        per_token += 2 * h * vocab_size
    if mtp is None:
        mtp = layers is None and output_layer
    if mtp and getattr(config, "mtp_num_layers", None):
        # Each MTP layer: its norms, the [embedding, hidden] -> hidden projection, a layer of the
        # last decoder layer's kind, and its own output layer (Megatron-LM's terms).
        mtp_layer = 3 * h + 2 * 2 * h * h + attention + (moe if pattern[-1] else dense) + 2 * h * vocab_size
        per_token += config.mtp_num_layers * mtp_layer
    return 3.0 * per_token * sequences * seq_length


def _attention_per_token(config, seq_length: int) -> float:
    """One attention layer's forward FLOPs per token: projections and causal scores."""
    h, heads = config.hidden_size, config.num_attention_heads
    if getattr(config, "multi_latent_attention", False):
        qk = config.qk_head_dim + config.qk_pos_emb_head_dim
        if config.q_lora_rank is None:
            q = h * heads * qk
        else:
            q = config.q_lora_rank * (h + heads * qk + 1)  # down, up, the norm between
        kv = config.kv_lora_rank * (h + heads * (config.qk_head_dim + config.v_head_dim) + 1)
        projections = 2 * (q + kv + h * config.qk_pos_emb_head_dim + heads * config.v_head_dim * h)
        return projections + seq_length * heads * (qk + config.v_head_dim)
    kv = (config.num_query_groups or heads) * (config.kv_channels or h // heads)
    return 2 * h * (h + 2 * kv) + 2 * h * h + 2 * seq_length * h


def ordmoe_run_step_flops(
    config,
    vocab_size: int,
    sequences: int,
    seq_length: int,
    ordmoe=None,
    shared_prefix_layers: int = 0,
    micro_batch_size: int = 1,
) -> float:
    """A training step of ``sequences`` sequences with ``ordmoe``'s paths (None: the plain step)."""
    plain = gpt_step_flops(config, vocab_size, sequences, seq_length)
    if ordmoe is None or not ordmoe.enabled:
        return plain
    shared = (
        gpt_step_flops(config, vocab_size, sequences, seq_length, range(shared_prefix_layers), False)
        if shared_prefix_layers
        else 0.0
    )
    share = ordmoe.lower_path_rows(micro_batch_size) / micro_batch_size
    path_one_only = plain - gpt_step_flops(config, vocab_size, sequences, seq_length, mtp=False)
    return ordmoe_step_flops(plain, shared, ordmoe.num_tiers, share, path_one_only)
