"""A sweep's results: one row per setting with the per-seed values, mean and standard deviation;
written as JSON, CSV (one line per cell), a Markdown table and a PNG."""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from ordmoe_megatron.runtime.outputs import staged_file  # noqa: E402
from ordmoe_megatron.sweep.config import SweepConfig  # noqa: E402
from ordmoe_megatron.sweep.plan import BASELINE, Cell  # noqa: E402

# (key, column title, from a cell's result, format)
METRICS = (
    ("path1_ppl", "path-1 ppl", lambda r: r["path_perplexity"][0], ".2f"),
    (
        "lowest_path_ppl",
        "path-C ppl",
        lambda r: r["path_perplexity"][-1] if len(r["path_perplexity"]) > 1 else None,
        ".2f",
    ),
    ("tier_order_acc", "tier order acc", lambda r: r.get("tier_order_acc"), ".3f"),
    (
        "exact_match",
        "exact match",
        lambda r: statistics.mean(r["exact_match"].values()) if r.get("exact_match") else None,
        ".3f",
    ),
    (  # --setting vl: held-out answer accuracy, the mean over the question kinds
        "answer_accuracy",
        "answer acc",
        lambda r: statistics.mean(r["answer_accuracy"].values()) if r.get("answer_accuracy") else None,
        ".3f",
    ),
)
OPTIONAL = ("answer_accuracy",)
# Path-1 perplexity over the same seed's same-steps baseline's: seeds differ far more from each
# other (each builds its own corpus) than settings do within a seed, so the paired ratio is the
# comparison to read.
PAIRED = ("path1_vs_baseline", "path-1 ppl / baseline's", ".3f")


def summarize(config: SweepConfig, results: dict[Cell, dict]) -> dict:
    """``{"rows": [...], "cells": [...]}``: per setting (baseline first), steps, training compute
    relative to the same-steps baseline's, and each metric per seed with mean and std."""
    cells = [c for c in results if c.kind != "base"]
    labels = list(
        dict.fromkeys(
            [BASELINE]
            + [c.label for c in cells if c.kind == "ordmoe"]
            + [c.label for c in cells if c.kind == "matched"]
        )
    )
    baseline_flops = {
        c.seed: results[c]["step_flops"] * c.steps for c in cells if c.label == BASELINE and "failed" not in results[c]
    }
    value_of = lambda c: METRICS[0][2](results[c])  # noqa: E731  (path-1 perplexity)
    baseline_ppl = {c.seed: value_of(c) for c in cells if c.label == BASELINE and "failed" not in results[c]}
    rows = []
    for label in labels:
        mine = sorted((c for c in cells if c.label == label), key=lambda c: c.seed)
        ok = [c for c in mine if "failed" not in results[c]]
        row = {
            "setting": label,
            "steps": mine[0].steps if mine else None,
            "seeds": [c.seed for c in ok],
            "failed_seeds": [c.seed for c in mine if c not in ok],
        }
        compute = [results[c]["step_flops"] * c.steps / baseline_flops[c.seed] for c in ok if c.seed in baseline_flops]
        row["compute"] = statistics.mean(compute) if compute else None
        for key, _, value, _ in METRICS:
            row[key] = _spread([value(results[c]) for c in ok])
        row[PAIRED[0]] = _spread([value_of(c) / baseline_ppl[c.seed] for c in ok if c.seed in baseline_ppl])
        rows.append(row)
    per_cell = [
        {"setting": c.label, "kind": c.kind, "seed": c.seed, "steps": c.steps, **_flat(results[c])}
        for c in sorted(results, key=lambda c: (c.kind, c.label, c.seed))
    ]
    return {
        "grid": config.grid.name,
        "title": config.grid.title,
        "setting": config.setting,
        "preset": config.uses_preset,
        "rows": rows,
        "cells": per_cell,
    }


def _spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    return {
        "values": values,
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
    }


def _number(value: float, fmt: str) -> str:
    # A lower path's perplexity can reach 1e40: in full digits it would fill the table.
    return format(value, fmt) if abs(value) < 1e5 else f"{value:.2e}"


def _flat(result: dict) -> dict:
    if "failed" in result:
        return {"status": "failed", "log": result["log"]}
    out = {"status": "done"}
    for key, _, value, _ in METRICS:
        out[key] = value(result)
    out.update(step_flops=result["step_flops"], train_lm_loss=result["train_lm_loss"], seconds=result["seconds"])
    return out


def markdown(summary: dict) -> str:
    """The table: per setting, steps, compute, then each metric's per-seed values and mean ± std."""
    columns = [METRICS[0][:2] + METRICS[0][3:], PAIRED] + [m[:2] + m[3:] for m in METRICS[1:]]
    # A column only some settings have (answer accuracy: --setting vl) is left out where no row has it.
    columns = [
        c
        for c in columns
        if c[0] not in OPTIONAL or any((row.get(c[0]) or {}).get("mean") is not None for row in summary["rows"])
    ]
    header = ["setting", "steps", "compute"]
    for _, title, _ in columns:
        header += [f"{title} per seed", f"{title} mean ± std"]
    lines = [
        f"**{summary['title']}** ({summary['setting']})",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for row in summary["rows"]:
        cells = [
            row["setting"] + (f" (failed: seeds {row['failed_seeds']})" if row["failed_seeds"] else ""),
            str(row["steps"]),
            "-" if row["compute"] is None else f"{row['compute']:.2f}x",
        ]
        for key, _, fmt in columns:
            m = row[key]
            if m["mean"] is None:
                cells += ["-", "-"]
            else:
                cells += [
                    " / ".join(_number(v, fmt) for v in m["values"]),
                    f"{_number(m['mean'], fmt)} ± {_number(m['std'], fmt)}",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for r in summary["rows"] for s in r["seeds"]})
    corpus = " (each builds its own corpus with the tiny preset)" if summary["preset"] else ""
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))}{corpus}; per-seed values in seed order; std is the sample "
        "standard deviation over seeds; compute is the training FLOPs the run reports, relative to the "
        "same-steps baseline; path-1 ppl / baseline's is each seed's path-1 perplexity over that seed's "
        "same-steps baseline's (below 1: better than the baseline).",
    ]
    return "\n".join(lines) + "\n"


def write(summary: dict, out: str) -> list[str]:
    """results.json, results.csv, results.md and results.png in ``out``; their paths."""
    paths = {ext: os.path.join(out, f"results.{ext}") for ext in ("json", "csv", "md", "png")}
    with staged_file(paths["json"]) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    with staged_file(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        fields = list(dict.fromkeys(k for cell in summary["cells"] for k in cell))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary["cells"])
    with staged_file(paths["md"]) as tmp, open(tmp, "w") as f:
        f.write(markdown(summary))
    with staged_file(paths["png"]) as tmp:
        plot(summary, tmp)
    return list(paths.values())


def task_metric(rows: list) -> Optional[str]:
    """The score of the task the rows were trained for: held-out answer accuracy (vl), else
    exact match (a preset with exact-answer tasks), else None."""
    for key in ("answer_accuracy", "exact_match"):
        if any(r.get(key, {}).get("mean") is not None for r in rows):
            return key
    return None


def plot(summary: dict, path: str) -> None:
    """Per setting: path-1 perplexity (mean ± std, each seed a dot), the paired ratio to the
    same-steps baseline, tier-ordering accuracy, and the task score where the cells have one
    (held-out answer accuracy, else exact match: what a reader of a vl or sft sweep looks for)."""
    rows = [r for r in summary["rows"] if r["path1_ppl"]["mean"] is not None]
    task = task_metric(rows)
    ratios = [3, 2, 1] + ([1.5] if task else [])
    fig, axes = plt.subplots(
        1, len(ratios), figsize=(15 + (3 if task else 0), 0.5 * len(rows) + 2), gridspec_kw={"width_ratios": ratios}
    )
    ax, paired, acc = axes[:3]
    y = list(range(len(rows)))
    colors = ["#888888" if r["setting"].startswith("baseline") else "#3b75af" for r in rows]
    for axis, key in ((ax, "path1_ppl"), (paired, PAIRED[0])) + (((axes[3], task),) if task else ()):
        means = [r[key]["mean"] if r[key]["mean"] is not None else 0 for r in rows]
        axis.barh(y, means, xerr=[r[key]["std"] or 0 for r in rows], color=colors, alpha=0.7, capsize=3)
        for i, r in enumerate(rows):
            axis.plot(r[key]["values"], [i] * len(r[key]["values"]), "k.", ms=5)
        values = [v for r in rows for v in r[key]["values"]]
        if values and key != task:
            axis.set_xlim(left=0.8 * min(values))  # the differences, not the distance from zero
        axis.invert_yaxis()
    ax.set_yticks(
        y, [r["setting"] if "steps" in r["setting"] else f"{r['setting']} ({r['steps']} steps)" for r in rows]
    )
    ax.set_xlabel("held-out path-1 perplexity (lower is better; dots: seeds)")
    paired.axvline(1.0, color="k", lw=0.8)
    paired.set_yticks(y, [""] * len(rows))
    paired.set_xlabel("path-1 ppl / same seed's same-steps baseline")
    accuracies = [r["tier_order_acc"]["mean"] for r in rows]
    acc.barh(y, [a if a is not None else 0 for a in accuracies], color=colors, alpha=0.7)
    acc.set_yticks(y, [""] * len(rows))
    acc.invert_yaxis()
    acc.set_xlim(0, 1)
    acc.set_xlabel("tier order acc")
    if task:
        axes[3].set_yticks(y, [""] * len(rows))
        axes[3].set_xlim(0, 1.05)
        title = next(title for key, title, *_ in METRICS if key == task)
        axes[3].set_xlabel(f"path-1 {title} (higher is better)")
    fig.suptitle(f"{summary['title']} ({summary['setting']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def flops_ratios(results: dict[Cell, dict]) -> dict[str, float]:
    """Each OrdMoE setting's training FLOPs per step over the same-steps baseline's (mean over
    the seeds where both finished): what the runs themselves report."""
    baseline = {c.seed: r["step_flops"] for c, r in results.items() if c.label == BASELINE and "failed" not in r}
    ratios: dict[str, list] = {}
    for cell, result in results.items():
        if cell.kind == "ordmoe" and "failed" not in result and cell.seed in baseline:
            ratios.setdefault(cell.label, []).append(result["step_flops"] / baseline[cell.seed])
    return {label: statistics.mean(values) for label, values in ratios.items()}


def failed(results: dict[Cell, dict]) -> list[Cell]:
    return [c for c, r in results.items() if "failed" in r]
