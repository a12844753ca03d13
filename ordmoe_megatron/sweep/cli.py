"""``ordmoe-sweep``: a grid of OrdMoE settings x seeds, each cell its own ``ordmoe-pretrain`` run,
with plain top-K baselines at the same steps and at matched compute.

    ordmoe-sweep --grid floor                                  # the tiny preset, seeds 1 2 3
    ordmoe-sweep --grid objective --setting finetune --jobs 2
    ordmoe-sweep --grid tiers --out runs/my-tiers -- --data-path my_text --tokenizer-model tok.model \\
        --num-layers 8 --hidden-size 512 ...                   # your data and model (after '--')

Finished cells are kept: run the same command again to resume a stopped sweep. Results go to
``<out>/results.{json,csv,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime.checkpointing import has_checkpoint
from ordmoe_megatron.runtime.outputs import RunLock, check_writable, read_json_file, staged_file
from ordmoe_megatron.sweep import plan, results
from ordmoe_megatron.sweep.config import SETTING_PRESETS, SETTINGS, SweepConfig
from ordmoe_megatron.sweep.grids import GRID_NAMES, Grid, Setting, ready_grids
from ordmoe_megatron.sweep.runner import run_cells
from ordmoe_megatron.train import build
from ordmoe_megatron.train import cli as train_cli

SPEC_FILE = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ordmoe-sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--grid",
        required=True,
        choices=GRID_NAMES + ("custom",),
        help="A ready-made grid (the paper's ablation axes), or 'custom' with --try.",
    )
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="'NAME=FLAGS'",
        help="--grid custom: a setting, e.g. 'beta 2=--ordmoe-objective pairwise-logistic "
        "--ordmoe-beta 2' (repeat for more).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default="pretrain",
        help="pretrain every cell from scratch, finetune every cell from one base checkpoint "
        "per seed (the paper's setting), or sft: fine-tune every cell on the tiny-sft chat tasks "
        "(held-out exact match per task; docs/sft.md), or vl: train every cell's tiny-vl "
        "vision-language model, captions then questions (held-out answer accuracy; docs/multimodal.md).",
    )
    parser.add_argument("--steps", type=int, default=200, help="Steps of every OrdMoE cell and same-steps baseline.")
    parser.add_argument(
        "--base-steps",
        type=int,
        default=600,
        help="--setting finetune: steps of the plain top-K base run the sweep trains per seed.",
    )
    parser.add_argument(
        "--base", default=None, help="--setting finetune: your base checkpoint, shared by every seed (no base runs)."
    )
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="--setting finetune: peak learning rate.")
    parser.add_argument("--out", default=None, help="The sweep's directory (default runs/sweep-<grid>-<setting>).")
    parser.add_argument(
        "--jobs", type=int, default=None, help="Cells at once (default: one per GPU, else one per two CPU cores)."
    )
    parser.add_argument("--threads-per-job", type=int, default=None, help="OMP threads of each cell (CPU).")
    parser.add_argument("--dry-run", action="store_true", help="Check every cell's flags, list the cells, exit.")
    parser.add_argument(
        "run_flags", nargs="*", help="After '--': ordmoe-pretrain flags every cell gets (default: the tiny preset)."
    )
    return parser


def _grid(args) -> Grid:
    if args.grid != "custom":
        if args.tries:
            raise OrdMoEError("--try is for --grid custom")
        layers = _num_layers(args.run_flags, SETTING_PRESETS[args.setting])
        return ready_grids(layers)[args.grid]
    if not args.tries:
        raise OrdMoEError("--grid custom needs at least one --try 'NAME=FLAGS'")
    settings = []
    for text in args.tries:
        name, sep, flags = text.partition("=--")  # the flags start at the first '=--' (a name may hold '=')
        if not sep or not name.strip():
            raise OrdMoEError(f"--try {text!r}: write it as 'NAME=FLAGS', e.g. 'C=4=--ordmoe-num-tiers 4'")
        settings.append(Setting(name.strip(), tuple(("--" + flags).split())))
    return Grid("custom", "custom settings", tuple(settings))


def _num_layers(run_flags: Sequence[str], preset: str) -> int:
    """``--num-layers`` as ordmoe-pretrain reads it (``--num-layers 8`` and ``--num-layers=8``
    alike), else that of the ``--preset`` after ``--``, else of the setting's preset (``tiny`` has
    4 layers, ``tiny-sft`` and ``tiny-vl`` 2)."""
    parser = train_cli.build_parser()
    parser.set_defaults(num_layers=None)
    given = parser.parse_known_args(list(run_flags))[0]
    return given.num_layers if given.num_layers is not None else train_cli.PRESETS[given.preset or preset]["num_layers"]


def sweep_config_from_args(args) -> SweepConfig:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    jobs = args.jobs or gpus or max(1, (os.cpu_count() or 2) // 2)
    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    grid = _grid(args)
    return SweepConfig(
        grid=grid,
        out=args.out or os.path.join("runs", f"sweep-{grid.name}-{args.setting}"),
        seeds=tuple(args.seeds),
        setting=args.setting,
        steps=args.steps,
        base_steps=args.base_steps,
        base=args.base,
        finetune_lr=args.finetune_lr,
        run_flags=tuple(args.run_flags),
        jobs=jobs,
        threads_per_job=threads,
        gpus=gpus,
    )


def check_cells(config: SweepConfig, cells: list) -> None:
    """Every cell's command is one ``ordmoe-pretrain`` accepts, and its model takes the OrdMoE
    settings, before any cell runs."""
    for cell in cells:
        argv = plan.cell_command(config, cell)[3:]
        try:
            run_config = train_cli.run_config_from_args(train_cli.parse_args(argv))
            build.transformer_config(run_config)
        except SystemExit:  # argparse refused a flag, and said so
            raise OrdMoEError(
                f"cell {cell.key}: ordmoe-pretrain refuses its flags (message above): "
                f"{' '.join(cell.flags + config.run_flags)}"
            ) from None
        except OrdMoEError:  # the refusal names the flag; this line names the cell
            log(f"cell {cell.key} is refused: {' '.join(cell.flags + config.run_flags)}")
            raise
    if config.base and not has_checkpoint(config.base):
        raise OrdMoEError(f"--base {config.base} holds no checkpoint (no latest_checkpointed_iteration.txt)")


def check_out(config: SweepConfig) -> None:
    """The directory is writable, and holds no other sweep's cells."""
    check_writable(config.out, "--out", is_dir=True)
    path = os.path.join(config.out, SPEC_FILE)
    spec = read_json_file(path, "it is written again for this sweep") if os.path.isfile(path) else None
    if spec is not None:
        difference = plan.spec_difference(spec, config)
        if difference:
            raise OrdMoEError(
                f"--out {config.out} holds another sweep ({difference}); give another --out, or the "
                "same flags to resume it"
            )


def log(message: str) -> None:
    print(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] sweep | {message}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # the one place ordmoe-sweep turns a refusal into its exit message
        return sweep(args)
    except OrdMoEError as err:
        print(f"ordmoe-sweep: error: {err}", file=sys.stderr)
        return 2


def sweep(args: argparse.Namespace) -> int:
    config = sweep_config_from_args(args)
    check_out(config)
    first = plan.first_cells(config)
    check_cells(config, plan.base_cells(config) + first)
    if args.dry_run:
        for cell in plan.base_cells(config) + first:
            print(f"{cell.key}: {' '.join(plan.cell_command(config, cell))}")
        print("then the matched-compute baselines, from the FLOPs the OrdMoE cells report")
        return 0
    lock = RunLock(config.out, "--out")
    try:
        with staged_file(os.path.join(config.out, SPEC_FILE)) as tmp, open(tmp, "w") as f:
            json.dump(plan.spec(config), f, indent=2)
        log(
            f"grid {config.grid.name} ({config.grid.title}), {config.setting}, seeds {list(config.seeds)}, "
            f"{config.steps} steps, {config.jobs} cell(s) at once, out {config.out}"
        )
        done = run_cells(config, plan.base_cells(config), log)
        if results.failed(done):
            raise OrdMoEError(f"a base run failed ({results.failed(done)[0].key}); fix it and run the sweep again")
        done.update(run_cells(config, first, log))
        matched = plan.matched_cells(config, results.flops_ratios(done))
        done.update(run_cells(config, matched, log))
        summary = results.summarize(config, done)
        try:
            written = results.write(summary, config.out)
        except OSError as err:
            raise OrdMoEError(
                f"--out {config.out}: cannot write the sweep's results ({err.strerror or err}); every finished "
                "cell's result.json is kept: free space and run the same command again (finished cells do not "
                "run again)"
            ) from None
    finally:
        lock.release()
    print("\n" + results.markdown(summary))
    print("wrote " + ", ".join(written))
    failed = results.failed(done)
    if failed:
        print(
            f"ordmoe-sweep: {len(failed)} cell(s) failed ({', '.join(c.key for c in failed)}); their logs are in "
            "their directories; run the same command again to retry them"
        )
        return 1
    return 0
