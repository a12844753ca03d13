"""Benchmark: what OrdMoE's extra paths cost in step time and peak memory, per path schedule.

One training micro-batch (forward, loss, backward) through Megatron's own schedule
(``get_forward_backward_func``, or ``mcore.schedules.get_ordmoe_forward_backward_func`` for
OrdMoE), for two MoE layer shapes, on the GPU (bf16) or with ``--device cpu`` on the CPU (fp32,
shapes scaled down unless ``--full-size``). Every variant runs once per round, alternating, and
the table gives medians as ratios to the plain model measured in the same run. Rows:

- plain ``GPTModel``; OrdMoE C=1 (the OrdMoE model running path 1 alone, as a C=1 model does);
- C=3 fused; C=3 sequential; C=3 as three separate passes (one forward and backward per path,
  no schedule: what a user would write without the path schedule);
- C=3 with the layer scope on the last layer and lazy fan-out;
- C=3 with the lower paths on a quarter of the sequences (``rho=0.25``), fused and sequential;
- the routers alone on the same stacked ``[s, 3b, h]`` input: ``TierRouter`` (C=3) against
  Megatron's ``TopKRouter``, forward and backward.

Peak memory: on a GPU, the model's weights plus the step's peak allocation above what was
resident before it (``torch.cuda.max_memory_allocated``), so models built for other rows do not
count; on the CPU (no allocator statistics), weights plus gradients plus the peak of the
activations autograd holds for the backward (counted by ``saved_tensors_hooks``). A variant
that runs out of memory shows ``OOM``.

    python tools/bench_paths.py                       # the GPU, both shapes
    python tools/bench_paths.py --device cpu --rounds 7 --json bench.json --png bench.png
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time
import weakref
from typing import Optional

import torch

# (experts, top-k, MoE FFN, micro-batch) at hidden 2048, 4 layers, 2048 tokens (the shapes).
SHAPES = {
    "8x-top2": dict(experts=8, topk=2, moe_ffn=5632, batch=4),
    "64x-top6": dict(experts=64, topk=6, moe_ffn=1408, batch=8),
}
FULL_SIZE = dict(hidden=2048, heads=16, seq=2048, layers=4, vocab=32000)
CPU_SIZE = dict(hidden=128, heads=8, seq=256, layers=4, vocab=1024)  # FFNs scale with hidden


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--full-size", action="store_true", help="on the CPU too, the full shapes (slow)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--png", default=None, help="also plot the ratios here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def sizes(args, shape: str) -> dict:
    base = dict(SHAPES[shape])
    size = FULL_SIZE if (args.device == "cuda" or args.full_size) else CPU_SIZE
    scale = size["hidden"] / FULL_SIZE["hidden"]
    base["moe_ffn"] = max(8, int(base["moe_ffn"] * scale))
    return {**size, **base}


def build(dims: dict, device: str, ordmoe=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel

    cuda = device == "cuda"
    config = TransformerConfig(
        num_layers=dims["layers"],
        hidden_size=dims["hidden"],
        num_attention_heads=dims["heads"],
        num_moe_experts=dims["experts"],
        moe_router_topk=dims["topk"],
        moe_ffn_hidden_size=dims["moe_ffn"],
        ffn_hidden_size=4 * dims["hidden"],
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        normalization="RMSNorm",
        use_cpu_initialization=not cuda,
        bf16=cuda,
        params_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    spec = get_gpt_layer_local_spec(num_experts=dims["experts"], moe_grouped_gemm=False, normalization="RMSNorm")
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    kwargs = dict(vocab_size=dims["vocab"], max_sequence_length=dims["seq"])
    model = (
        GPTModel(config, spec, **kwargs) if ordmoe is None else OrdMoEGPTModel(config, spec, ordmoe=ordmoe, **kwargs)
    )
    return model.to(device)


def forward_step(batch, data_iterator, model):
    from ordmoe_megatron.mcore.loss import lm_loss

    next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, functools.partial(lm_loss, batch["loss_mask"])


def schedule_step(model, batch, forward_backward) -> None:
    forward_backward(
        forward_step_func=functools.partial(forward_step, batch),
        data_iterator=iter([None] * 1),
        model=[model],
        num_microbatches=1,
        seq_length=batch["tokens"].shape[1],
        micro_batch_size=batch["tokens"].shape[0],
        forward_only=False,
    )


def separate_passes_step(model, batch, num_paths: int) -> None:
    """One forward and backward per path, no schedule: each path's own rank-loss share."""
    from ordmoe_megatron.mcore.loss import MicroBatchPaths, ordmoe_path_loss

    state = MicroBatchPaths()
    try:
        for path in range(num_paths):
            model.set_path_tiers([path])
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            loss, tokens, _ = ordmoe_path_loss(
                batch["loss_mask"],
                out,
                path=path,
                paths_of_micro_batch=state,
                ordmoe=model.ordmoe,
                num_paths=num_paths,
                vocab_size=model.vocab_size,
            )
            (loss / tokens).backward()
    finally:
        model.set_path_tiers(list(range(num_paths)))


def router_step(router, hidden) -> None:
    probs, _ = router(hidden)
    probs.float().sum().backward()


class SavedActivations:
    """Peak bytes of the tensors autograd holds for the backward (storages counted once)."""

    def __init__(self):
        self.live: dict[int, list] = {}
        self.current = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        holder = _Held(tensor)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    @staticmethod
    def unpack(holder):
        return holder.tensor


class _Held:
    def __init__(self, tensor):
        self.tensor = tensor


def peak_memory(step, device: str, resident: int) -> float:
    """Bytes: ``resident`` plus the step's peak (see the module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return resident + torch.cuda.max_memory_allocated() - before
    saved = SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        step()
    return resident + saved.peak


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def variants(dims: dict, device: str):
    """``{row: (step, resident bytes)}``; models are shared between rows where they can be."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from ordmoe_megatron.mcore.router import TierRouter
    from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func
    from ordmoe_megatron.method import OrdMoEConfig

    b, s = dims["batch"], dims["seq"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims["vocab"], (b, s + 1), generator=g)
    batch = {
        k: v.to(device)
        for k, v in dict(
            tokens=tokens[:, :-1],
            labels=tokens[:, 1:],
            loss_mask=torch.ones(b, s),
            position_ids=torch.arange(s).unsqueeze(0).expand(b, -1),
        ).items()
    }
    last = str(dims["layers"])
    configs = {
        "fused": OrdMoEConfig(num_tiers=3),
        "sequential": OrdMoEConfig(num_tiers=3, path_schedule="sequential"),
        "rho fused": OrdMoEConfig(num_tiers=3, lower_path_fraction=0.25),
        "rho sequential": OrdMoEConfig(num_tiers=3, lower_path_fraction=0.25, path_schedule="sequential"),
    }
    plain = build(dims, device)
    ordmoe = build(dims, device, configs["fused"])
    lazy = build(dims, device, OrdMoEConfig(num_tiers=3, layer_scope=last))
    weights = lambda m: 2 * sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731 (+ grads)
    megatron_fb = get_forward_backward_func()

    def with_config(name):  # the schedule and fraction are the schedule's: one OrdMoE model serves all
        fb = get_ordmoe_forward_backward_func(configs[name], dims["vocab"])
        return lambda: schedule_step(ordmoe, batch, fb)

    def c1():
        ordmoe.set_path_tiers([0])
        try:
            schedule_step(ordmoe, batch, megatron_fb)
        finally:
            ordmoe.set_path_tiers([0, 1, 2])

    rows = {
        "plain GPTModel": (lambda: schedule_step(plain, batch, megatron_fb), weights(plain)),
        "OrdMoE C=1": (c1, weights(ordmoe)),
        "C=3 fused": (with_config("fused"), weights(ordmoe)),
        "C=3 sequential": (with_config("sequential"), weights(ordmoe)),
        "C=3 separate passes": (lambda: separate_passes_step(ordmoe, batch, 3), weights(ordmoe)),
        f"C=3 scope layer {last}, lazy fan-out": (
            lambda: schedule_step(lazy, batch, get_ordmoe_forward_backward_func(lazy.ordmoe, dims["vocab"])),
            weights(lazy),
        ),
        "C=3 rho=0.25 fused": (with_config("rho fused"), weights(ordmoe)),
        "C=3 rho=0.25 sequential": (with_config("rho sequential"), weights(ordmoe)),
    }
    config = plain.config
    pgs = get_default_pg_collection()
    top_k = TopKRouter(config=config, pg_collection=pgs).to(device)
    tier = TierRouter(config=config, pg_collection=pgs, ordmoe=configs["fused"]).to(device)
    tier.load_state_dict(top_k.state_dict(), strict=False)
    for router in (top_k, tier):
        router.set_layer_number(1)
    tier.path_tiers = [0, 1, 2]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(s, 3 * b, dims["hidden"], generator=g).to(device, dtype).requires_grad_(True)
    routers = {
        "TopKRouter, stacked input": lambda: router_step(top_k, hidden),
        "TierRouter, stacked input": lambda: router_step(tier, hidden),
    }
    return rows, routers


def measure(steps: dict, rounds: int, device: str, resident: Optional[dict] = None) -> dict:
    """``{row: (median seconds or None if OOM, peak bytes or None)}``, alternating in each round."""
    out_of_memory = set()
    peaks = {}
    for name, step in steps.items():  # warm-up, then the memory pass
        try:
            step()
            peaks[name] = peak_memory(step, device, resident[name]) if resident else None
        except torch.OutOfMemoryError:
            out_of_memory.add(name)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    times = {name: [] for name in steps if name not in out_of_memory}
    for _ in range(rounds):
        for name in times:
            times[name].append(timed(steps[name], device))
    return {name: (statistics.median(times[name]) if name in times else None, peaks.get(name)) for name in steps}


def table(results: dict, base: str, with_memory: bool) -> list[str]:
    base_time, base_mem = results[base]
    header = "| variant | median ms | x plain time |" + (" peak GiB | x plain memory |" if with_memory else "")
    lines = [header, "| --- | ---: | ---: |" + (" ---: | ---: |" if with_memory else "")]
    for name, (seconds, peak) in results.items():
        if seconds is None:
            lines.append(f"| {name} | OOM | OOM |" + (" OOM | OOM |" if with_memory else ""))
            continue
        line = f"| {name} | {1000 * seconds:.1f} | {seconds / base_time:.2f} |"
        if with_memory:
            line += f" {peak / 2**30:.3f} | {peak / base_mem:.2f} |"
        lines.append(line)
    return lines


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(7 * len(report), 4.5), squeeze=False)
    for ax, (shape, entry) in zip(axes[0], report.items()):
        names = [r["variant"] for r in entry["steps"] if r["time_ratio"] is not None]
        t = [r["time_ratio"] for r in entry["steps"] if r["time_ratio"] is not None]
        m = [r["memory_ratio"] for r in entry["steps"] if r["time_ratio"] is not None]
        x = range(len(names))
        ax.barh([i + 0.2 for i in x], t, height=0.4, label="step time / plain")
        ax.barh([i - 0.2 for i in x], m, height=0.4, label="peak memory / plain")
        ax.set_yticks(list(x), names)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{shape} ({entry['device']})")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    from ordmoe_megatron.runtime.distributed import init_single_process

    init_single_process()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {}
    for shape in args.shapes:
        dims = sizes(args, shape)
        print(
            f"\n### {shape}: {dims['experts']} experts top-{dims['topk']}, MoE FFN {dims['moe_ffn']}, hidden "
            f"{dims['hidden']}, {dims['layers']} layers, micro-batch {dims['batch']} x {dims['seq']}, "
            f"{'bf16' if args.device == 'cuda' else 'fp32'}, {where}, median of {args.rounds} rounds\n",
            flush=True,
        )
        rows, routers = variants(dims, args.device)
        steps = measure(
            {k: v[0] for k, v in rows.items()}, args.rounds, args.device, {k: v[1] for k, v in rows.items()}
        )
        print("\n".join(table(steps, "plain GPTModel", with_memory=True)))
        router_times = measure(routers, args.rounds, args.device)
        print()
        print(
            "\n".join(table(router_times, "TopKRouter, stacked input", with_memory=False)).replace(
                "x plain time", "x TopKRouter"
            ),
            flush=True,
        )
        base_t, base_m = steps["plain GPTModel"]
        router_base = router_times["TopKRouter, stacked input"][0]
        report[shape] = {
            "dims": dims,
            "device": where,
            "rounds": args.rounds,
            "steps": [
                {
                    "variant": k,
                    "median_ms": None if t is None else 1000 * t,
                    "time_ratio": None if t is None else t / base_t,
                    "peak_bytes": m,
                    "memory_ratio": None if m is None else m / base_m,
                }
                for k, (t, m) in steps.items()
            ],
            "routers": [
                {"variant": k, "median_ms": 1000 * t, "ratio_vs_topk": t / router_base}
                for k, (t, _) in router_times.items()
            ],
        }
        del rows, routers
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.png:
        plot(report, args.png)


if __name__ == "__main__":
    main()
