"""Benchmark: what OrdMoE's extra paths cost, and what lazy fan-out saves.

Times forward+backward of one training micro-batch for a GPT-MoE on this machine, alternating
the variants in every round so that they share the machine's noise, and prints a table of
medians and ratios (measured in this one run). Variants:

- plain top-K (C = 1);
- OrdMoE C = 3 on all layers;
- OrdMoE C = 3 on a partial layer scope, with full fan-out (embedding repeated) and with lazy
  fan-out (layers before the first scoped layer run once).

    python tools/bench_fanout.py --rounds 15 --json bench_fanout.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(ordmoe, args):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_ffn_hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=1e-2, hidden_dropout=0.0, attention_dropout=0.0,
        add_bias_linear=False, use_cpu_initialization=True, normalization="RMSNorm",
    )
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False, normalization="RMSNorm")
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    if ordmoe is None:
        return GPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=args.seq)
    return OrdMoEGPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=args.seq, ordmoe=ordmoe)


def time_step(model, batch) -> float:
    start = time.perf_counter()
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    out.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--scope", default="7-8", help="partial layer scope for the fan-out comparison")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from ordmoe_megatron import OrdMoEConfig
    from ordmoe_megatron.runtime.distributed import init_single_process

    init_single_process()

    variants = {
        "plain top-K (C=1)": build(None, args),
        "OrdMoE C=3, all layers": build(OrdMoEConfig(num_tiers=3), args),
        f"OrdMoE C=3, layers {args.scope}, full fan-out": build(
            OrdMoEConfig(num_tiers=3, layer_scope=args.scope, lazy_fanout=False), args),
        f"OrdMoE C=3, layers {args.scope}, lazy fan-out": build(OrdMoEConfig(num_tiers=3, layer_scope=args.scope), args),
    }
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                 position_ids=torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1))
    for model in variants.values():  # warm-up
        time_step(model, batch)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, model in variants.items():
            times[name].append(time_step(model, batch))

    base = statistics.median(times["plain top-K (C=1)"])
    full = statistics.median(times[f"OrdMoE C=3, layers {args.scope}, full fan-out"])
    rows = []
    print(f"{'variant':48s} | {'median ms':>9s} | {'vs C=1':>6s} | {'vs full fan-out':>15s}")
    print("-" * 88)
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_ms": 1000 * median, "ratio_vs_plain": median / base,
                     "ratio_vs_full_fanout": median / full})
        print(f"{name:48s} | {1000 * median:9.1f} | {median / base:6.2f} | {median / full:15.2f}")
    print(f"\n{args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.topk}, "
          f"batch {args.batch} x {args.seq}, {args.rounds} rounds, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
