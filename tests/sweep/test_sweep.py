"""ordmoe-sweep: the grids, the cells and their commands, the summary's numbers, a real sweep on
mock data that is stopped and resumed, and the refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime.outputs import RunLock
from ordmoe_megatron.sweep import plan, results
from ordmoe_megatron.sweep.config import SweepConfig
from ordmoe_megatron.sweep.grids import Grid, Setting, ready_grids
from tests.support import cpu_env

# The harness runs ordmoe-pretrain and reads its metrics: the rest of the suite covers both
# megatron-core versions of that, so CI runs this module on 0.16.1 only (docs/testing.md).
pytestmark = pytest.mark.one_version

MOCK = [
    "--mock-data",
    "--eval-iters",
    "1",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--log-interval",
    "1",
]


def test_ready_grids_have_the_papers_ablation_structure():
    grids = ready_grids(num_layers=8)
    assert [s.name for s in grids["tiers"].settings] == ["C=1", "C=2", "C=3", "C=4"]
    assert [s.flags[1] for s in grids["grouping"].settings] == ["uniform", "high-only", "random"]
    rewards = grids["rewards"].settings
    assert len(rewards) == 9 and {s.flags[-1] for s in rewards} == {"zscore", "center", "raw"}
    assert {tuple(s.flags[1:4]) for s in rewards} == {("1", ".5", "0"), ("2", "1", "0"), (".5", ".25", "0")}
    assert [s.flags[1] if s.flags else "all" for s in grids["scope"].settings] == ["all", "1-4", "5-8", "2,4,6,8"]
    assert [s.flags[1] for s in grids["floor"].settings] == ["vocab", "none"]
    assert [s.flags[1::2] for s in grids["objective"].settings] == [
        ("advantage", "vocab"),
        ("advantage", "none"),
        ("pairwise-logistic", "none"),
        ("plackett-luce", "none"),
    ]


def _config(tmp_path, **kwargs):
    grid = Grid(
        "custom", "custom", (Setting("C=2", ("--ordmoe-num-tiers", "2")), Setting("C=4", ("--ordmoe-num-tiers", "4")))
    )
    return SweepConfig(grid=grid, out=str(tmp_path), seeds=(1, 2), steps=10, **kwargs)


def test_cells_baselines_and_matched_compute(tmp_path):
    config = _config(tmp_path)
    first = plan.first_cells(config)
    assert [(c.label, c.seed) for c in first] == [
        ("baseline, same steps", 1),
        ("C=2", 1),
        ("C=4", 1),
        ("baseline, same steps", 2),
        ("C=2", 2),
        ("C=4", 2),
    ]
    assert plan.base_cells(config) == []
    matched = plan.matched_cells(config, {"C=2": 2.0, "C=4": 3.96, "C=1": 1.0})
    assert sorted({(c.label, c.steps) for c in matched}) == [
        ("baseline, matched compute (20 steps)", 20),
        ("baseline, matched compute (40 steps)", 40),
    ]
    assert all(c.flags == ("--no-ordmoe",) for c in matched) and {c.seed for c in matched} == {1, 2}


def test_cell_commands_keep_every_output_in_the_cell(tmp_path):
    config = _config(tmp_path, setting="finetune", run_flags=tuple(MOCK))
    base = plan.base_cells(config)
    assert [(c.kind, c.steps, c.seed) for c in base] == [("base", 600, 1), ("base", 600, 2)]
    cell = plan.first_cells(config)[1]
    argv = plan.cell_command(config, cell)
    where = cell.directory(config.out)
    assert argv[argv.index("--eval-out") + 1] == os.path.join(where, "eval.json")
    assert argv[argv.index("--load") + 1] == os.path.join(base[0].directory(config.out), "checkpoints")
    assert "--finetune" in argv and argv[argv.index("--lr") + 1] == "0.001" and "--preset" not in argv
    preset = plan.cell_command(_config(tmp_path), cell)
    assert preset[3:5] == ["--preset", "tiny"]
    assert preset[preset.index("--preset-data-dir") + 1] == os.path.join(config.out, "data", "seed1")
    deepseek = plan.cell_command(_config(tmp_path, run_flags=("--preset", "tiny-deepseek")), cell)
    assert [i for i, flag in enumerate(deepseek) if flag == "--preset"] == [3] and deepseek[4] == "tiny-deepseek"
    assert "--preset-data-dir" in deepseek
    sft = plan.cell_command(_config(tmp_path, setting="sft"), cell)  # fine-tuning on the chat tasks
    assert sft[3:5] == ["--preset", "tiny-sft"] and "--finetune" not in sft and not plan.base_cells(_config(tmp_path))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seeds=(1, 1)), "distinct seeds"),
        (dict(base="/some/ckpt"), "--setting finetune"),
        (dict(run_flags=("--mock-data", "--seed", "3")), "--seed"),
        (dict(setting="rlhf"), "--setting"),
    ],
)
def test_sweep_config_refusals(tmp_path, kwargs, match):
    with pytest.raises(OrdMoEError, match=match):
        SweepConfig(grid=Grid("g", "g", ()), out=str(tmp_path), **kwargs)


def test_summary_means_standard_deviations_and_compute(tmp_path):
    config = _config(tmp_path)
    cells = plan.first_cells(config)

    def result(ppl, flops, acc=None):
        return {
            "path_perplexity": [ppl, ppl + 5],
            "tier_order_acc": acc,
            "step_flops": flops,
            "train_lm_loss": 1.0,
            "seconds": 1.0,
        }

    done = {
        cells[0]: result(10.0, 1.0),
        cells[1]: result(12.0, 2.0, 0.5),
        cells[2]: {"failed": "x", "log": "l", "exit_code": 1, "seconds": 0},
        cells[3]: result(14.0, 1.0),
        cells[4]: result(15.0, 2.0, 1.0),
        cells[5]: result(20.0, 4.0, 1.0),
    }
    summary = results.summarize(config, done)
    rows = {r["setting"]: r for r in summary["rows"]}
    assert rows["baseline, same steps"]["path1_ppl"]["values"] == [10.0, 14.0]
    assert rows["baseline, same steps"]["path1_ppl"]["mean"] == pytest.approx(12.0)
    assert rows["baseline, same steps"]["path1_ppl"]["std"] == pytest.approx(2**0.5 * 2)  # sample std
    assert rows["C=2"]["compute"] == pytest.approx(2.0) and rows["C=2"]["tier_order_acc"]["mean"] == 0.75
    assert rows["C=4"]["failed_seeds"] == [1] and rows["C=4"]["path1_ppl"]["values"] == [20.0]
    assert rows["C=4"]["path1_ppl"]["std"] == 0.0
    assert results.flops_ratios(done) == {"C=2": 2.0, "C=4": 4.0}
    table = results.markdown(summary)
    # Paired with the same seed's baseline: 12/10 and 15/14.
    assert rows["C=2"]["path1_vs_baseline"]["values"] == pytest.approx([1.2, 15 / 14])
    assert rows["baseline, same steps"]["path1_vs_baseline"]["values"] == [1.0, 1.0]
    assert "| C=2 | 10 | 2.00x | 12.00 / 15.00 | 13.50 ± 2.12 | 1.200 / 1.071 | 1.136 ± 0.091 |" in table
    assert "failed: seeds [1]" in table
    assert results._number(4.6e48, ".2f") == "4.60e+48"  # a diverged lower path stays readable
    written = results.write(summary, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in written)
    assert len(open(os.path.join(tmp_path, "results.csv")).readlines()) == 1 + 6


def _png_width(path) -> int:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big")


def _sweep(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "ordmoe_megatron.sweep", "--out", str(out), "--jobs", "1", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cpu_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=cpu_env())


def test_a_stopped_sweep_resumes_without_redoing_finished_cells(tmp_path):
    out = tmp_path / "sweep"
    flags = [
        "--grid",
        "custom",
        "--try",
        "C=2=--ordmoe-num-tiers 2",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--setting",
        "finetune",
        "--base-steps",
        "2",
        "--",
        *MOCK,
    ]
    proc = _sweep(out, *flags, wait=False)
    base_result = out / "base" / "base" / "seed1" / "result.json"
    deadline = time.time() + 1200  # a loaded 2-core machine
    while not base_result.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert base_result.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)  # stopped halfway: the base run is finished, the cells are not
    stopped_log = proc.communicate(timeout=300)[0]
    assert "SIGTERM: waiting for" in stopped_log, stopped_log[-3000:]
    # The cells it ran have ended with it: nothing holds their outputs when the resumed sweep clears them.
    for checkpoints in (out / "cells").glob("*/seed1/checkpoints"):
        RunLock(str(checkpoints), "--save").release()
    kept = base_result.read_text()
    finished_at = base_result.stat().st_mtime_ns

    resumed = _sweep(out, *flags)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "base/seed1: finished before, kept" in resumed.stdout
    assert base_result.read_text() == kept and base_result.stat().st_mtime_ns == finished_at
    summary = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in summary["rows"]] == [
        "baseline, same steps",
        "C=2",
        "baseline, matched compute (4 steps)",
    ]
    assert summary["rows"][1]["compute"] == pytest.approx(2.0, rel=0.05)  # two paths' FLOPs, as reported
    assert all(r["path1_ppl"]["mean"] > 1 for r in summary["rows"])
    for name in ("results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    # The fine-tuning cells started from the base run's weights.
    cell_log = (out / "cells" / "c=2" / "seed1" / "log.txt").read_text()
    assert str(out / "base" / "base" / "seed1" / "checkpoints") in cell_log.splitlines()[0]

    again = _sweep(out, *flags)  # everything finished: nothing runs again
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 4


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--grid", "custom"], "needs at least one --try"),
        (["--grid", "floor", "--", "--mock-data", "--train-iters", "5"], "--train-iters"),
        (["--grid", "custom", "--try", "bad=--ordmoe-num-tiers 9", "--", *MOCK], "--ordmoe-num-tiers=9"),
        (
            ["--grid", "floor", "--setting", "finetune", "--base", "/nonexistent/ckpt", "--", *MOCK],
            "holds no checkpoint",
        ),
    ],
)
def test_bad_sweeps_are_refused_before_any_cell_runs(tmp_path, flags, message):
    proc = _sweep(tmp_path / "out", *flags)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "cells").exists()


def test_another_sweeps_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"grid": "tiers"}))
    proc = _sweep(out, "--grid", "floor", "--", *MOCK)
    assert proc.returncode != 0 and "holds another sweep (grid was 'tiers', here 'floor')" in proc.stderr


def test_the_scope_grid_reads_num_layers_in_either_spelling():
    from ordmoe_megatron.sweep import cli

    for run_flags in (["--num-layers=8"], ["--num-layers", "8"]):
        grid = cli._grid(cli.build_parser().parse_args(["--grid", "scope", "--", "--mock-data", *run_flags]))
        assert [s.flags[1] for s in grid.settings if s.flags] == ["1-4", "5-8", "2,4,6,8"]


def test_the_scope_grid_takes_the_depth_of_the_settings_preset():
    # tiny has 4 layers, tiny-sft and tiny-vl 2: their scopes must name layers they have.
    from ordmoe_megatron.sweep import cli

    for setting, scopes in (
        ("pretrain", ["1-2", "3-4", "2,4"]),
        ("sft", ["1-1", "2-2"]),  # "even" would be "deep" again: one cell, not two
        ("vl", ["1-1", "2-2"]),
    ):
        grid = cli._grid(cli.build_parser().parse_args(["--grid", "scope", "--setting", setting]))
        assert [s.flags[1] for s in grid.settings if s.flags] == scopes
    # A --preset after '--' is the cells' model: tiny-vl's 2 layers, not the setting's tiny's 4.
    grid = cli._grid(cli.build_parser().parse_args(["--grid", "scope", "--", "--preset", "tiny-vl"]))
    assert [s.flags[1] for s in grid.settings if s.flags] == ["1-1", "2-2"]


def test_the_scope_grid_names_each_set_of_layers_once():
    assert [s.name for s in ready_grids(num_layers=1)["scope"].settings] == ["scope all"]
    assert [s.flags[1] for s in ready_grids(num_layers=3)["scope"].settings if s.flags] == ["1-1", "2-3", "2"]
    assert [s.flags[1] for s in ready_grids(num_layers=6)["scope"].settings if s.flags] == ["1-3", "4-6", "2,4,6"]


def test_a_cell_still_held_by_a_run_is_refused_not_cleared(tmp_path):
    from ordmoe_megatron.sweep import runner

    config = _config(tmp_path)
    cell = plan.first_cells(config)[1]
    checkpoints = os.path.join(cell.directory(config.out), "checkpoints")
    held = RunLock(checkpoints, "--save")  # as the cell's ordmoe-pretrain of another sweep would
    try:
        with pytest.raises(OrdMoEError, match=f"cell {cell.key}: --save .* is in use by another run"):
            runner.run_cells(config, plan.first_cells(config), print)  # before any cell runs
        assert os.path.isdir(checkpoints)
        assert not any(os.path.exists(c.directory(config.out)) for c in plan.first_cells(config) if c != cell)
    finally:
        held.release()


def test_a_stop_signal_reaches_the_running_cells_and_the_sweep_waits_for_them(tmp_path):
    # A sweep's cell process stands in: it takes a while to end after SIGTERM, as a saving run does,
    # and a second SIGTERM ends it at once, unsaved (as ordmoe-pretrain's does).
    child = (
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n    signal.signal(signal.SIGTERM, lambda *a: os._exit(3))\n"
        "    time.sleep(1.0)\n    open(sys.argv[1], 'w').write('saved')\n    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n"
    )
    sweep = (  # as run_cells does: the cell waited for in a worker thread, the main thread takes the signal
        "import subprocess, sys, threading, time\n"
        "from ordmoe_megatron.sweep.runner import _CellProcesses\n"
        "with _CellProcesses() as processes:\n"
        f"    p = processes.start([sys.executable, '-c', {child!r}, sys.argv[1], sys.argv[2]])\n"
        "    threading.Thread(target=processes.wait, args=(p,), daemon=True).start()\n"
        "    time.sleep(60)\n"
    )
    saved, ready = tmp_path / "saved", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", sweep, str(saved), str(ready)],
        stdout=subprocess.PIPE,
        text=True,
        env=cpu_env(),
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # to the sweep's process group, as a terminal or a scheduler does
    stdout = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGTERM  # it ends the way the signal ends it
    assert saved.read_text() == "saved"  # but only after its cell had saved
    assert "SIGTERM: waiting for 1 running cell(s) to save and end" in stdout


def test_torn_files_of_a_killed_sweep_are_tolerated_on_resume(tmp_path, capsys):
    from ordmoe_megatron.sweep import cli, runner

    config = _config(tmp_path)
    cell = plan.first_cells(config)[1]
    os.makedirs(cell.directory(config.out))
    with open(os.path.join(cell.directory(config.out), runner.RESULT), "w") as f:
        f.write('{"path_perplexity": [1')
    assert runner.read_result(config, cell) is None and "the cell runs again" in capsys.readouterr().err
    with open(os.path.join(config.out, "sweep.json"), "w") as f:
        f.write('{"grid": "cus')
    cli.check_out(config)  # a torn spec is written again, not a refusal
    assert "is damaged" in capsys.readouterr().err
    metrics = os.path.join(cell.directory(config.out), "metrics.jsonl")
    with open(metrics, "w") as f:
        f.write(json.dumps({"lm_loss": 2.0}) + "\n" + '{"lm_lo')
    with open(os.path.join(cell.directory(config.out), "eval.json"), "w") as f:
        json.dump({"OrdMoE": {"path_perplexity": [3.0]}}, f)
    assert runner.cell_result(cell.directory(config.out), 1.0)["train_lm_loss"] == 2.0


def test_a_full_disk_writing_the_results_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from ordmoe_megatron.sweep import cli

    def finished(config, cells, log):
        result = {"path_perplexity": [3.0], "step_flops": 1.0, "train_lm_loss": 1.0, "seconds": 1}
        return {cell: result for cell in cells}

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "run_cells", finished)
    monkeypatch.setattr(cli.results, "write", full)
    argv = ["--out", str(tmp_path / "out"), "--grid", "custom", "--try", "C=2=--ordmoe-num-tiers 2", "--seeds", "1"]
    assert cli.main([*argv, "--steps", "2", "--", *MOCK]) == 2
    err = capsys.readouterr().err
    assert "cannot write the sweep's results (No space left on device)" in err and "Traceback" not in err


def test_the_vl_setting_runs_tiny_vl_cells_and_reports_answer_accuracy(tmp_path):
    config = _config(tmp_path, setting="vl")
    cell = plan.first_cells(config)[0]
    argv = plan.cell_command(config, cell)
    assert argv[3:5] == ["--preset", "tiny-vl"] and "--finetune" not in argv and not plan.base_cells(config)
    proc = _sweep(tmp_path / "out", "--grid", "tiers", "--setting", "vl", "--seeds", "1", "--steps", "4", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = [line for line in proc.stdout.splitlines() if "ordmoe_megatron.train" in line]
    assert cells and all("--preset tiny-vl" in line for line in cells)
    assert any("--no-ordmoe" in line for line in cells)  # the same-steps baseline

    def result(ppl, accuracy):
        out = {"path_perplexity": [ppl], "tier_order_acc": None, "step_flops": 1.0, "train_lm_loss": 1.0}
        return {**out, "seconds": 1.0, "answer_accuracy": accuracy}

    cells = plan.first_cells(config)
    done = {c: result(10.0 + i, {"count": 0.5, "colour": 1.0, "shape": 0.3 + 0.1 * i}) for i, c in enumerate(cells)}
    summary = results.summarize(config, done)
    baseline = next(r for r in summary["rows"] if r["setting"] == plan.BASELINE)
    assert baseline["answer_accuracy"]["values"] == pytest.approx([0.6, 0.7])
    table = results.markdown(summary)
    assert "answer acc per seed" in table and "0.600 / 0.700" in table
    # The plot gets a fourth panel for the task score: answer accuracy here, none without one.
    assert results.task_metric(summary["rows"]) == "answer_accuracy"
    with_task, without_task = tmp_path / "with.png", tmp_path / "without.png"
    results.plot(summary, str(with_task))
    bare = {**summary, "rows": [{k: v for k, v in r.items() if k != "answer_accuracy"} for r in summary["rows"]]}
    assert results.task_metric(bare["rows"]) is None
    results.plot(bare, str(without_task))
    assert _png_width(with_task) > _png_width(without_task)
    # Without answer accuracy (every other setting) the column is not there: recorded tables stay.
    for r in done.values():
        del r["answer_accuracy"]
    assert "answer acc" not in results.markdown(results.summarize(config, done))
