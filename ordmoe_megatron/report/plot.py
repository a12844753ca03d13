"""The tier report's outputs: the console table, the JSON, and the PNG."""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from ordmoe_megatron.runtime.outputs import check_distinct, check_output, check_writable, staged_file  # noqa: E402


def format_table(report: dict) -> str:
    lines = [
        "path | tier ranks | mean logprob | perplexity | token ppl | load max/mean",
        "--- | --- | --- | --- | --- | ---",
    ]
    for r in report["paths"]:
        load = "-" if r["load_max_over_mean"] is None else f"{r['load_max_over_mean']:.2f}"
        lines.append(
            f"{r['path']} | {r['tier_ranks']} | {r['mean_logprob']:.4f} | {r['perplexity']:.3f} | "
            f"{r['token_perplexity']:.3f} | {load}"
        )
    acc = report["tier_order_acc"]
    d = report["data"]
    lines.append(
        f"tier-ordering accuracy: {'- (one path)' if acc is None else f'{acc:.3f}'} over {d['sequences']} "
        f"sequences, {d['target_tokens']} target tokens"
    )
    return "\n".join(lines)


def plot_report(report: dict, png_path: str) -> str:
    """Per-path log-likelihood and perplexity bars, per-layer max/mean load, and the per-tier
    expert-load heatmap (rows: layer x path; colour: tokens / mean tokens per expert)."""
    rows, layers = report["paths"], report["expert_load"]["layers"]
    paths = len(rows)
    labels = [f"path {r['path']}\n(ranks {r['tier_ranks']})" for r in rows]
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, paths))
    heat = np.array(
        [
            np.asarray(entry["tokens_per_expert"][j], dtype=float) / max(np.mean(entry["tokens_per_expert"][j]), 1e-12)
            for entry in layers
            for j in range(paths)
        ]
    )
    heat_labels = [f"L{entry['layer']} p{j + 1}" for entry in layers for j in range(paths)]
    fig = plt.figure(figsize=(13, max(7.0, 4.0 + 0.22 * len(heat_labels))))
    grid = fig.add_gridspec(3, 2, width_ratios=[1, 1.5])
    ax_lp, ax_ppl, ax_load = (fig.add_subplot(grid[i, 0]) for i in range(3))
    ax_heat = fig.add_subplot(grid[:, 1])
    x = np.arange(paths)
    ax_lp.bar(x, [r["mean_logprob"] for r in rows], color=colors)
    ax_lp.set_ylabel("mean target log-likelihood")
    ax_ppl.bar(x, [r["perplexity"] for r in rows], color=colors)
    ax_ppl.set_ylabel("perplexity")
    ppls = [r["perplexity"] for r in rows]
    if all(math.isfinite(p) and p > 0 for p in ppls) and max(ppls) / min(ppls) > 100:
        ax_ppl.set_yscale("log")
        ax_ppl.set_ylabel("perplexity (log scale)")
    for ax, key, fmt in ((ax_lp, "mean_logprob", "{:.3f}"), (ax_ppl, "perplexity", "{:.4g}")):
        for i, r in enumerate(rows):
            ax.annotate(fmt.format(r[key]), (i, r[key]), ha="center", va="bottom" if r[key] >= 0 else "top", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    acc = report["tier_order_acc"]
    ax_lp.set_title(
        f"tier-ordering accuracy {'-' if acc is None else f'{acc:.3f}'} ({report['data']['sequences']} sequences)",
        fontsize=10,
    )
    width = 0.8 / max(paths, 1)
    lx = np.arange(len(layers))
    for j in range(paths):
        ax_load.bar(
            lx + (j - (paths - 1) / 2) * width,
            [entry["max_over_mean"][j] for entry in layers],
            width,
            color=colors[j],
            label=f"path {j + 1}",
        )
    ax_load.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_load.set_xticks(
        lx, [f"L{entry['layer']}" + ("" if entry["tier_routed"] else "*") for entry in layers], fontsize=8
    )
    ax_load.set_ylabel("expert load max / mean")
    ax_load.set_xlabel("MoE layer (* = not tier-routed)")
    ax_load.legend(fontsize=8)
    if len(heat):
        image = ax_heat.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest")
        ax_heat.set_yticks(np.arange(len(heat_labels)), heat_labels, fontsize=7 if len(heat_labels) < 60 else 5)
        ax_heat.set_xlabel("expert")
        fig.colorbar(image, ax=ax_heat, label="tokens / mean tokens per expert")
    ax_heat.set_title("per-tier expert load (layer x path)", fontsize=10)
    ckpt = report["checkpoint"]
    tag = ckpt["iteration"] if ckpt["iteration"] == "release" else f"iteration {ckpt['iteration']}"
    fig.suptitle(
        f"tier report: {os.path.basename(ckpt['load'].rstrip('/'))} ({ckpt['kind']}, {tag}), "
        f"C={paths}, {report['data']['source']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, format="png")
    plt.close(fig)
    return png_path


def write_outputs(report: dict, out_json: Optional[str], out_png: Optional[str], force: bool) -> None:
    """Write each output next to its place and move it in only when all are written."""
    check_outputs([out_json, out_png], force)
    with contextlib.ExitStack() as stack:
        for path, write in ((out_json, _write_json), (out_png, plot_report)):
            if path:
                write(report, stack.enter_context(staged_file(path)))
        check_outputs([out_json, out_png], force)  # nothing appeared meanwhile


def check_outputs(paths: list, force: bool) -> None:
    """``[--out-json, --out-png]``: distinct, writable (before any evaluation), replaced only with
    ``--force``."""
    check_distinct(paths, "--out-json and --out-png")
    for flag, path in zip(("--out-json", "--out-png"), paths):
        if path:
            check_output(path, force, "--force")
            check_writable(path, flag)


def _write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
