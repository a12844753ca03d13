"""Benchmark: what OrdMoE's extra paths cost in step time and peak memory, per path schedule.

One training micro-batch (forward, loss, backward) through Megatron's own schedule
(``get_forward_backward_func``, or ``mcore.schedules.get_ordmoe_forward_backward_func`` for
OrdMoE), for three MoE layer shapes (a Mixtral-like 8 experts top-2; 64 experts top-6; and
Ling-mini-2.0's router, DeepSeek-V3's design: 256 experts top-8, group-limited sigmoid routing
with 8 groups of which 4, an expert bias, a top-K scaling factor and a shared expert), on the GPU
(bf16) or with ``--device cpu`` on the CPU (fp32, shapes scaled down unless ``--full-size``).
Every variant runs once per round, alternating, and the table gives medians as ratios to the
plain model measured in the same run. Rows:

- plain ``GPTModel``; OrdMoE C=1 (the OrdMoE model running path 1 alone, as a C=1 model does);
- C=3 fused; C=3 sequential; C=3 as three separate passes (one forward and backward per path,
  no schedule: what a user would write without the path schedule);
- C=3 with the layer scope on the last layer and lazy fan-out;
- C=3 with the lower paths on a quarter of the sequences (``rho=0.25``), fused and sequential;
- the routers alone on the same stacked ``[s, 3b, h]`` input: ``TierRouter`` (C=3) against
  Megatron's ``TopKRouter``, forward and backward, over ``--router-rounds`` rounds (median and
  fastest; ``--routers-only`` runs just these).

Peak memory: on a GPU, the model's weights plus the step's peak allocation above what was
resident before it (``torch.cuda.max_memory_allocated``), so models built for other rows do not
count; on the CPU (no allocator statistics), weights plus gradients plus the peak of the
activations autograd holds for the backward (counted by ``saved_tensors_hooks``). A variant
that runs out of memory shows ``OOM``.

    python tools/bench_paths.py                       # the GPU, every shape
    python tools/bench_paths.py --device cpu --rounds 7 --json bench.json --png bench.png
    python tools/bench_paths.py --device cpu --routers-only --threads 1
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import statistics
import time
import weakref
from typing import Optional

import torch

# (experts, top-k, MoE FFN, micro-batch) at hidden 2048, 4 layers, 2048 tokens (the shapes);
# routing: the model's other router and shared-expert settings.
LING_MINI_ROUTING = dict(  # Ling-mini-2.0's router (the paper's second model): DeepSeek-V3's design
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_num_groups=8,
    moe_router_group_topk=4,
    moe_router_topk_scaling_factor=2.5,
    moe_router_load_balancing_type="none",  # aux-loss-free balancing (the expert bias)
    moe_aux_loss_coeff=0.0,
)
SHAPES = {
    "8x-top2": dict(experts=8, topk=2, moe_ffn=5632, batch=4),
    "64x-top6": dict(experts=64, topk=6, moe_ffn=1408, batch=8),
    "256x-top8-grouped": dict(experts=256, topk=8, moe_ffn=512, shared_ffn=512, batch=2, routing=LING_MINI_ROUTING),
}
FULL_SIZE = dict(hidden=2048, heads=16, seq=2048, layers=4, vocab=32000)
CPU_SIZE = dict(hidden=128, heads=8, seq=256, layers=4, vocab=1024)  # FFNs scale with hidden


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--full-size", action="store_true", help="on the CPU too, the full shapes (slow)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--router-rounds", type=int, default=100, help="rounds of the routers' rows (short steps)")
    parser.add_argument("--routers-only", action="store_true", help="only the routers' rows (fast)")
    parser.add_argument(
        "--compare-router", default=None, help="also time the TierRouter of this router.py (e.g. an earlier commit's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
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
    for ffn in ("moe_ffn", "shared_ffn"):
        if ffn in base:
            base[ffn] = max(8, int(base[ffn] * scale))
    return {**size, **base}


def transformer_config(dims: dict, device: str):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = device == "cuda"
    settings = dict(
        num_layers=dims["layers"],
        hidden_size=dims["hidden"],
        num_attention_heads=dims["heads"],
        num_moe_experts=dims["experts"],
        moe_router_topk=dims["topk"],
        moe_ffn_hidden_size=dims["moe_ffn"],
        ffn_hidden_size=4 * dims["hidden"],
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2,
        moe_shared_expert_intermediate_size=dims.get("shared_ffn"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        normalization="RMSNorm",
        use_cpu_initialization=not cuda,
        bf16=cuda,
        params_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    return TransformerConfig(**{**settings, **dims.get("routing", {})})


def build(dims: dict, device: str, ordmoe=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ordmoe_megatron.mcore.model import OrdMoEGPTModel

    config = transformer_config(dims, device)
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


def model_variants(dims: dict, device: str) -> dict:
    """``{row: (step, resident bytes)}``; models are shared between rows where they can be."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

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
    return rows


def router_variants(dims: dict, device: str, compare: Optional[str] = None) -> dict:
    """``{row: step}``: ``TierRouter`` (C=3) and ``TopKRouter`` on the same stacked ``[s, 3b, h]``;
    with ``compare``, also the ``TierRouter`` of that source file (another version's router.py)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from ordmoe_megatron.mcore.router import TierRouter
    from ordmoe_megatron.method import OrdMoEConfig

    config = transformer_config(dims, device)
    pgs = get_default_pg_collection()
    torch.manual_seed(0)
    routers = {"TopKRouter": TopKRouter(config=config, pg_collection=pgs)}
    if compare:
        spec = importlib.util.spec_from_file_location("compared_router", compare)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        routers[f"TierRouter of {os.path.basename(compare)}"] = module.TierRouter
    routers["TierRouter"] = TierRouter
    g = torch.Generator().manual_seed(1)
    bias = 0.01 * torch.randn(dims["experts"], generator=g)  # a trained model's bias, not zeros
    for name, cls in list(routers.items())[1:]:
        routers[name] = cls(config=config, pg_collection=pgs, ordmoe=OrdMoEConfig(num_tiers=3))
        routers[name].load_state_dict(routers["TopKRouter"].state_dict(), strict=False)
        routers[name].path_tiers = [0, 1, 2]
    for router in routers.values():
        router.to(device).set_layer_number(1)
        if router.expert_bias is not None:
            router.expert_bias.copy_(bias)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(dims["seq"], 3 * dims["batch"], dims["hidden"], generator=g)
    hidden = hidden.to(device, dtype).requires_grad_(True)
    return {
        f"{name}, stacked input": functools.partial(router_step, router, hidden) for name, router in routers.items()
    }


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


def measure_routers(steps: dict, rounds: int, device: str) -> dict:
    """``{row: (median seconds, fastest seconds)}``, alternating in each round: on a shared
    machine the fastest of many rounds is the least disturbed, the median the typical."""
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def router_table(results: dict, base: str) -> list[str]:
    base_median, base_min = results[base]
    lines = [
        "| variant | median ms | x TopKRouter | fastest ms | x TopKRouter |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (median, fastest) in results.items():
        lines.append(
            f"| {name} | {1000 * median:.1f} | {median / base_median:.2f} | {1000 * fastest:.1f} | "
            f"{fastest / base_min:.2f} |"
        )
    return lines


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

    report = {shape: entry for shape, entry in report.items() if entry["steps"]}
    if not report:
        return
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


def plot_routers(report: dict, path: str) -> None:
    """The routers' time ratios to ``TopKRouter``, median and fastest, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(6 * len(report), 3), squeeze=False)
    for ax, (shape, entry) in zip(axes[0], report.items()):
        rows = entry["routers"]
        names = [r["variant"].replace(", stacked input", "") for r in rows]
        x = range(len(rows))
        ax.barh([i + 0.2 for i in x], [r["ratio_vs_topk"] for r in rows], height=0.4, label="median")
        ax.barh([i - 0.2 for i in x], [r["fastest_ratio_vs_topk"] for r in rows], height=0.4, label="fastest")
        ax.set_yticks(list(x), names)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.axvline(1.3, color="red", lw=0.8, ls="--")
        ax.set_title(f"{shape}, hidden {entry['dims']['hidden']} ({entry['device']})", fontsize=9)
        ax.set_xlim(0, 1.35 * max(max(r["ratio_vs_topk"], r["fastest_ratio_vs_topk"]) for r in rows))
        ax.set_xlabel("time / TopKRouter (forward and backward)")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_rows(steps: dict) -> list[dict]:
    base_t, base_m = steps["plain GPTModel"]
    return [
        {
            "variant": k,
            "median_ms": None if t is None else 1000 * t,
            "time_ratio": None if t is None else t / base_t,
            "peak_bytes": m,
            "memory_ratio": None if m is None else m / base_m,
        }
        for k, (t, m) in steps.items()
    ]


def main(argv=None):
    args = parse_args(argv)
    from ordmoe_megatron.runtime.distributed import init_single_process

    init_single_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {}
    for shape in args.shapes:
        dims = sizes(args, shape)
        print(
            f"\n### {shape}: {dims['experts']} experts top-{dims['topk']}, MoE FFN {dims['moe_ffn']}, hidden "
            f"{dims['hidden']}, {dims['layers']} layers, micro-batch {dims['batch']} x {dims['seq']}, "
            f"{'bf16' if args.device == 'cuda' else 'fp32'}, {where}, median of {args.rounds} rounds "
            f"(routers: {args.router_rounds})\n",
            flush=True,
        )
        steps = None
        if not args.routers_only:
            rows = model_variants(dims, args.device)
            steps = measure(
                {k: v[0] for k, v in rows.items()}, args.rounds, args.device, {k: v[1] for k, v in rows.items()}
            )
            del rows
            print("\n".join(table(steps, "plain GPTModel", with_memory=True)))
        router_times = measure_routers(
            router_variants(dims, args.device, args.compare_router), args.router_rounds, args.device
        )
        print()
        print("\n".join(router_table(router_times, "TopKRouter, stacked input")), flush=True)
        base_median, base_min = router_times["TopKRouter, stacked input"]
        report[shape] = {
            "dims": dims,
            "device": where,
            "rounds": args.rounds,
            "router_rounds": args.router_rounds,
            "steps": [] if steps is None else step_rows(steps),
            "routers": [
                {
                    "variant": k,
                    "median_ms": 1000 * median,
                    "ratio_vs_topk": median / base_median,
                    "fastest_ms": 1000 * fastest,
                    "fastest_ratio_vs_topk": fastest / base_min,
                }
                for k, (median, fastest) in router_times.items()
            ],
        }
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.png:
        (plot_routers if args.routers_only else plot)(report, args.png)


if __name__ == "__main__":
    main()
