"""``pretrain_gpt.py --ordmoe-dry-run``: the configuration, parallel layout and tier layout that
Megatron-LM's validated arguments describe, printed without building anything."""

from __future__ import annotations

import argparse
import copy
from typing import Optional

from ordmoe_megatron.megatron_lm import hooks
from ordmoe_megatron.method import OrdMoEConfig, moe_layer_numbers
from ordmoe_megatron.runtime.model_flags import padded_vocab_size


def describe_run(args: argparse.Namespace, ordmoe: Optional[OrdMoEConfig], config) -> str:
    a = args
    world = a.world_size
    tp, pp, cp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size
    dp = a.data_parallel_size
    ep, etp = a.expert_model_parallel_size, a.expert_tensor_parallel_size
    num_micro = a.global_batch_size // (a.micro_batch_size * dp)
    if a.fp8:
        precision = f"fp8 {a.fp8} (recipe {getattr(a, 'fp8_recipe', 'delayed')}), params {_dtype(a.params_dtype)}"
    else:
        precision = _dtype(a.params_dtype)
    moe = moe_layer_numbers(config.num_layers, config.moe_layer_freq) if config.num_moe_experts else []
    lines = [
        "OrdMoE dry run (Megatron-LM): arguments parsed and validated; nothing was built.",
        "configuration:",
        f"  model: {config.num_layers} layers, hidden {a.hidden_size}, ffn {a.ffn_hidden_size}, "
        f"{a.num_attention_heads} heads"
        + (f" ({a.num_query_groups} query groups)" if a.group_query_attention else "")
        + f", seq length {a.seq_length}, max positions {a.max_position_embeddings}",
        f"  moe: {config.num_moe_experts or 0} experts, top-{config.moe_router_topk}, expert ffn "
        f"{config.moe_ffn_hidden_size}, shared expert {config.moe_shared_expert_intermediate_size or 0}, "
        f"{len(moe)} MoE layers, router {config.moe_router_score_function}"
        f"{' pre-softmax' if config.moe_router_pre_softmax else ''}, balancing "
        f"{config.moe_router_load_balancing_type} (coeff {config.moe_aux_loss_coeff}), dispatcher "
        f"{config.moe_token_dispatcher_type}, grouped gemm {bool(a.moe_grouped_gemm)}",
        f"  implementation: {a.transformer_impl}, precision {precision}",
        *(
            [f"  (no GPU here: TransformerConfig checks that need one were skipped: {config.skipped_checks})"]
            if getattr(config, "skipped_checks", None)
            else []
        ),
        f"  training: micro batch {a.micro_batch_size}, global batch {a.global_batch_size}, "
        f"{num_micro} micro-batches per step, {a.train_iters} iterations, lr {a.lr}",
        "parallel layout:",
        f"  world size {world} = TP {tp} x PP {pp} x CP {cp} x DP {dp}",
        f"  experts: EP {ep} x expert TP {etp} x expert DP {world // (pp * ep * etp)} "
        f"({(config.num_moe_experts or 0) // ep} experts per EP rank)",
        f"  sequence parallel {bool(a.sequence_parallel)}, virtual pipeline stages "
        f"{a.virtual_pipeline_model_parallel_size or 1}, layers per pipeline stage {config.num_layers // pp}, "
        f"distributed optimizer {bool(a.use_distributed_optimizer)}",
        f"  activations between pipeline stages: [{a.seq_length // (tp if a.sequence_parallel else 1)}, "
        f"{ordmoe.stage_batch_rows(a.micro_batch_size) if ordmoe is not None else a.micro_batch_size}, "
        f"{a.hidden_size}]",
        "tier layout:",
    ]
    if ordmoe is None:
        lines.append("  OrdMoE off (--no-ordmoe): plain top-K training")
        return "\n".join(lines)
    layout = ordmoe.describe_layout(
        config.num_moe_experts,
        config.moe_router_topk,
        config.num_layers,
        config.moe_layer_freq,
        hooks.shared_prefix_layers(a, ordmoe),
    )
    lines += ["  " + line for line in layout]
    lines.append("  FLOPs counted per step: " + _flops_factor_text(a, ordmoe))
    return "\n".join(lines)


def _flops_factor_text(args, ordmoe: OrdMoEConfig) -> str:
    args = copy.copy(args)
    if getattr(args, "padded_vocab_size", None) is None:
        if args.vocab_size is None:  # the tokenizer decides; a dry run does not load it
            return (
                f"{ordmoe.num_tiers} x the plain model's, less the layers run once "
                "(exact factor needs the tokenizer's vocabulary size)"
            )
        args.padded_vocab_size = padded_vocab_size(
            {"vocab_size": args.vocab_size, "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by},
            args.tensor_model_parallel_size,
        )
    return f"{hooks.flops_factor(args, ordmoe):.3f} x the plain model's"


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")
