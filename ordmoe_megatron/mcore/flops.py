"""What a training step costs in FLOPs, and what ``C`` tier paths cost against the plain step.

The paths share nothing but weights: every path is a full forward and backward of every layer
and of the output layer, except the leading layers the model runs once for all paths (the lazy
fan-out, ``OrdMoEConfig.shared_prefix_layers``). Sub-sampled lower paths run on a share
``m / b`` of the sequences. The path schedule (fused or sequential) does not change the count.

``gpt_step_flops`` counts a GPT step's matrix multiplications from a ``TransformerConfig`` with
the terms of Megatron-LM's ``num_floating_point_operations`` (which lives in Megatron-LM, not in
megatron-core): attention projections, causal attention scores, dense or MoE MLPs (router, the
top-K experts, shared experts), the output layer; the backward counts twice the forward.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ordmoe_megatron.method import moe_layer_pattern


def ordmoe_step_flops(
    plain_step_flops: float, shared_prefix_flops: float, num_paths: int, lower_path_share: float = 1.0
) -> float:
    """The plain step, plus ``C - 1`` lower paths on ``lower_path_share`` of the sequences, each
    without the layers the paths share."""
    return plain_step_flops + (num_paths - 1) * lower_path_share * (plain_step_flops - shared_prefix_flops)


def gpt_step_flops(
    config,
    vocab_size: int,
    sequences: int,
    seq_length: int,
    layers: Optional[Sequence[int]] = None,
    output_layer: bool = True,
) -> float:
    """Training FLOPs (forward and backward) of ``sequences`` sequences of ``seq_length`` tokens
    through the 0-based ``layers`` (all by default) and, with ``output_layer``, the output layer."""
    h = config.hidden_size
    kv = (config.num_query_groups or config.num_attention_heads) * (
        config.kv_channels or h // config.num_attention_heads
    )
    gated = 3 if config.gated_linear_unit else 2  # matmuls of a (gated) MLP's input side plus output
    attention = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * seq_length * h  # projections + causal scores
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
    return 3.0 * per_token * sequences * seq_length


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
    return ordmoe_step_flops(plain, shared, ordmoe.num_tiers, share)
