"""PNG plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # headless: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def plot_metrics(metrics_jsonl: str, png_path: str, title: str = "OrdMoE training") -> str:
    """Each path's mean log-likelihood, the tier-ordering accuracy and the LM loss over training."""
    records = [json.loads(line) for line in open(metrics_jsonl) if line.strip()]
    if not records:
        raise ValueError(f"{metrics_jsonl} has no metrics to plot")
    iters = [r["iteration"] for r in records]
    fig, (ax_lp, ax_acc) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    paths = len(records[-1].get("path_logprob") or [])
    if paths:
        for j in range(paths):
            ax_lp.plot(iters, [r["path_logprob"][j] for r in records], label=f"path {j + 1} (tier {j + 1})")
    else:
        ax_lp.plot(iters, [-r["lm_loss"] for r in records], label="path 1 (top-K)")
    ax_lp.set_ylabel("mean target log-likelihood")
    ax_lp.legend()
    ax_lp.grid(alpha=0.3)
    ax_lp.set_title(title)
    accs = [(r["iteration"], r["tier_order_acc"]) for r in records if r.get("tier_order_acc") is not None]
    if accs:
        ax_acc.plot(*zip(*accs), color="tab:purple", label="tier-ordering accuracy")
        ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("tier-ordering accuracy")
    ax_acc.set_xlabel("iteration")
    ax_acc.grid(alpha=0.3)
    ax_loss = ax_acc.twinx()
    ax_loss.plot(iters, [r["lm_loss"] for r in records], color="tab:gray", alpha=0.6, label="LM loss (path 1)")
    ax_loss.set_ylabel("LM loss")
    lines = ax_acc.get_legend_handles_labels()[0] + ax_loss.get_legend_handles_labels()[0]
    ax_acc.legend(lines, [line.get_label() for line in lines], loc="center right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
