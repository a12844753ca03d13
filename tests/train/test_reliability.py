"""Nothing lost, nothing silent: what ``ordmoe-pretrain`` refuses before any work, how a resume is
the same run or refused, damaged checkpoints and data, outputs, signals.

Refusals are checked in this process (``cli.main`` stops before it starts any process group);
what needs a real run runs ``ordmoe-pretrain`` as a user would, on the CPU.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ordmoe_megatron.train import cli
from tests.support import cpu_env, read_metrics, run_pretrain

SMALL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--ffn-hidden-size",
    "64",
    "--moe-ffn-hidden-size",
    "32",
    "--seq-length",
    "32",
    "--max-position-embeddings",
    "32",
    "--lr-warmup-iters",
    "1",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "2",
    "--log-interval",
    "1",
    "--mock-data",
]


def refused(*argv) -> str:
    """The one-line message ``ordmoe-pretrain`` stops with, before any work."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    message = str(stop.value)
    assert message.startswith("ordmoe-pretrain: ") and "\n" not in message, message
    return message


def stopped(capsys, *argv) -> str:
    """What ``ordmoe-pretrain`` says when it stops: its message, or argparse's (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    return f"{stop.value} {capsys.readouterr().err}"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """A 4-step OrdMoE run that saved at steps 2 and 4: its checkpoint and metrics."""
    root = tmp_path_factory.mktemp("run_a")
    save, metrics = root / "ckpt", root / "metrics.jsonl"
    run_pretrain(
        *SMALL, "--train-iters", "4", "--save-interval", "2", "--save", str(save), "--metrics-out", str(metrics)
    )
    return save, metrics


def _copy(run_a, tmp_path, at=2):
    """A copy of run A; at step 2 it is as if the run had died after its first save."""
    save, metrics = run_a
    shutil.copytree(save, tmp_path / "ckpt")
    shutil.copy(metrics, tmp_path / "metrics.jsonl")
    if at == 2:
        shutil.rmtree(tmp_path / "ckpt" / "iter_0000004")
        (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    return tmp_path / "ckpt", tmp_path / "metrics.jsonl"


def _resume(save, *extra, iters="4"):
    return [*SMALL, "--train-iters", iters, "--save", str(save), "--load", str(save), *extra]


# ---- 1. a run in a directory that holds another run is not that run ------------------------
@pytest.mark.parametrize(
    "change,flag",
    [
        (["--no-ordmoe"], "--ordmoe is 'on (--ordmoe)' there but 'off (--no-ordmoe)' here"),
        (["--ordmoe-num-tiers", "2"], "--ordmoe-num-tiers is 3 there but 2 here"),
        (["--lr", "0.001"], "--lr is 0.003 there but 0.001 here"),
        (["--seed", "7"], "--seed is 1234 there but 7 here"),
        (["--global-batch-size", "4"], "--global-batch-size is 2 there but 4 here"),
    ],
)
def test_a_resume_with_other_settings_is_refused(run_a, tmp_path, change, flag):
    save, _ = _copy(run_a, tmp_path)
    message = refused(*_resume(save), *change)
    assert "holds another run" in message and flag in message
    assert "a fresh --save, or --overwrite" in message
    if change[0] == "--lr":
        assert "--override-opt-param-scheduler" in message


def test_a_new_schedule_on_purpose_is_said_in_the_log(run_a, tmp_path):
    save, metrics = _copy(run_a, tmp_path)
    proc = run_pretrain(
        *_resume(
            save, "--lr", "0.001", "--min-lr", "0.0001", "--metrics-out", str(metrics), "--override-opt-param-scheduler"
        )
    )
    assert "learning-rate schedule overridden (--override-opt-param-scheduler): --lr 0.003 -> 0.001" in proc.stdout
    records = read_metrics(metrics)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert records[2]["lr"] <= 0.001 + 1e-12  # the new peak holds from the resumed step on


@pytest.mark.one_version  # process and file handling, not megatron-core's
def test_overwrite_starts_a_new_run_and_nothing_of_the_old_comes_back(run_a, tmp_path):
    save, metrics = _copy(run_a, tmp_path)
    old = read_metrics(metrics)
    args = _resume(save, "--metrics-out", str(metrics), "--seed", "7", "--overwrite", iters="8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordmoe_megatron.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
    )
    for line in proc.stdout:  # killed after its first step, before its first save
        if line.startswith(" iteration"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert not (save / "latest_checkpointed_iteration.txt").exists()  # the old run cannot come back
    again = run_pretrain(*_resume(save, "--metrics-out", str(metrics), "--seed", "7", "--overwrite", iters="2"))
    assert "resuming" not in again.stdout
    new = read_metrics(metrics)
    assert [r["iteration"] for r in new] == [1, 2] and {r["run_id"] for r in new} != {r["run_id"] for r in old}


def test_load_must_name_a_checkpoint_directory(run_a, tmp_path):
    save, _ = run_a
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no checkpoint" in refused(*SMALL, "--load", str(empty), "--save", str(tmp_path / "new"))
    message = refused(*SMALL, "--load", str(save / "iter_0000004"), "--save", str(tmp_path / "new"))
    assert "is one iteration of a checkpoint" in message and str(save) in message


def test_a_finished_run_says_there_is_nothing_to_train(run_a, tmp_path):
    save, metrics = _copy(run_a, tmp_path, at=4)
    before = metrics.read_text()
    proc = run_pretrain(*_resume(save, "--metrics-out", str(metrics)))
    assert "nothing to train" in proc.stdout and "Traceback" not in proc.stderr
    assert metrics.read_text() == before


def test_metrics_of_another_run_are_not_appended_to(run_a, tmp_path):
    save, metrics = _copy(run_a, tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"run_id": "someone-else", "iteration": 1}) + "\n")
    assert "holds metrics of another run" in refused(*_resume(save, "--metrics-out", str(other)))


# ---- 2. damaged checkpoints: one check, the file named, before the model is built ----------
def _damage(save, what):
    it = save / "iter_0000002"
    if what == "missing shard":
        next(it.glob("*.distcp")).unlink()
    elif what == "truncated shard":
        shard = next(it.glob("*.distcp"))
        os.truncate(shard, shard.stat().st_size // 2)
    elif what == "missing common.pt":
        if not (it / "common.pt").exists():
            pytest.skip("this megatron-core keeps the common state inside the shards (no common.pt)")
        (it / "common.pt").unlink()
    elif what == "corrupt metadata.json":
        (it / "metadata.json").write_text("{not json")
    elif what == "missing .metadata":
        (it / ".metadata").unlink()
    elif what == "corrupt run.json":
        (it / "run.json").write_text("{")
    elif what == "missing run.json":
        (it / "run.json").unlink()
    elif what == "tracker names a missing iteration":
        (save / "latest_checkpointed_iteration.txt").write_text("5")
    elif what == "missing rng file":
        (it / "rng_rank0.pt").unlink()


@pytest.mark.parametrize(
    "what,named",
    [
        ("missing shard", ".distcp: checkpoint file missing"),
        ("truncated shard", "truncated checkpoint file"),
        ("missing common.pt", "common.pt is missing"),
        ("corrupt metadata.json", "metadata.json is corrupt"),
        ("missing .metadata", "unreadable checkpoint metadata (.metadata)"),
        ("corrupt run.json", "run.json is corrupt"),
        ("missing run.json", "records no run"),
        ("tracker names a missing iteration", "iter_0000005 is missing"),
        ("missing rng file", "rng_rank0.pt is missing"),
    ],
)
def test_a_damaged_checkpoint_is_named_before_any_work(run_a, tmp_path, what, named):
    save, _ = _copy(run_a, tmp_path)
    _damage(save, what)
    assert named in refused(*_resume(save))


# ---- 3. bad values are refused where they are read; --dry-run checks what the run checks ---
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ordmoe-rewards", "nan", "0.5", "0"], "must be finite numbers"),
        (["--ordmoe-rewards", "inf", "0.5", "0"], "must be finite numbers"),
        (["--log-interval", "0"], "--log-interval: '0' must be at least 1"),
        (["--lr", "nan"], "--lr: 'nan' is not a finite number"),
        (["--min-lr", "0.1"], "--min-lr=0.1 is above --lr=0.003"),
    ],
)
def test_bad_values_are_refused(capsys, argv, message):
    assert message in stopped(capsys, *SMALL, *argv)


def test_a_misspelt_load_balancing_type_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([*SMALL, "--moe-router-load-balancing-type", "aux-loss"])
    assert stop.value.code == 2 and "invalid choice: 'aux-loss'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ordmoe-layer-scope", "9"], "--ordmoe-layer-scope names layers [9]; the model has layers 1-2"),
        (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--moe-router-topk", "1"], "Please use --moe-router-pre-softmax when topk is 1"),
    ],
)
def test_the_dry_run_refuses_what_the_run_refuses(argv, message):
    for dry in ([], ["--dry-run"]):
        assert message in refused(*SMALL, *argv, *dry)


# ---- 4. data that would hang -----------------------------------------------------------
def test_a_split_without_documents_is_refused_with_the_count_it_needs(tmp_path):
    from ordmoe_megatron.data import load_tokenizer, train_sentencepiece, write_indexed_dataset

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(10)))
    model = train_sentencepiece([str(corpus)], str(tmp_path / "sp"), vocab_size=280)
    prefix = write_indexed_dataset(str(corpus), load_tokenizer(model), str(tmp_path / "data"))
    message = refused(
        *[a for a in SMALL if a != "--mock-data"],
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--save",
        str(tmp_path / "ckpt"),
    )
    assert "gives the validation split 0 of the 10 documents" in message and "need at least" in message


# ---- 5. outputs ------------------------------------------------------------------------
def test_an_unwritable_save_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "is a file, not a directory" in refused(*SMALL, "--save", str(blocker / "ckpt"))


@pytest.mark.one_version  # process and file handling, not megatron-core's
def test_a_second_run_on_the_same_save_is_refused_with_the_first_ones_pid(tmp_path):
    save = tmp_path / "ckpt"
    first = subprocess.Popen(
        [sys.executable, "-m", "ordmoe_megatron.train", *SMALL, "--train-iters", "200", "--save", str(save)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
    )
    try:
        for line in first.stdout:
            if line.startswith(" iteration"):
                break
        second = run_pretrain(*SMALL, "--train-iters", "2", "--save", str(save), "--load", str(save), check=False)
        assert second.returncode != 0 and f"in use by another run (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)


# ---- 6. signals ------------------------------------------------------------------------
@pytest.mark.one_version  # process and file handling, not megatron-core's
def test_sigterm_saves_and_the_run_resumes(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = [*SMALL, "--train-iters", "200", "--save", str(save), "--metrics-out", str(metrics)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordmoe_megatron.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
    )
    for line in proc.stdout:
        if line.startswith(" iteration        2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < 200 and f"stopped by signal {int(signal.SIGTERM)} at iteration {stopped}" in out
    resumed = run_pretrain(
        *SMALL,
        "--train-iters",
        str(stopped + 1),
        "--save",
        str(save),
        "--load",
        str(save),
        "--metrics-out",
        str(metrics),
        "--override-opt-param-scheduler",
    )
    assert f"resuming at iteration {stopped}" in resumed.stdout
    assert [r["iteration"] for r in read_metrics(metrics)] == list(range(1, stopped + 2))


@pytest.mark.one_version  # process and file handling, not megatron-core's
def test_checkpoint_writers_die_with_a_killed_run(tmp_path):
    args = [*SMALL, "--train-iters", "200", "--save", str(tmp_path / "ckpt"), "--save-interval", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordmoe_megatron.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
    )
    for line in proc.stdout:
        if line.startswith(" saved checkpoint at iteration        2"):
            break
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the checkpoint writer keeps a process"
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, f"orphans left: {alive}"


# ---- 7. average ranking and checkpoints --------------------------------------------------
def test_average_ranking_starts_its_means_from_a_checkpoint_without_them(run_a, tmp_path):
    save, _ = _copy(run_a, tmp_path)
    proc = run_pretrain(
        *SMALL,
        "--train-iters",
        "1",
        "--load",
        str(save),
        "--finetune",
        "--save",
        str(tmp_path / "avg"),
        "--ordmoe-ranking",
        "average",
    )
    assert "no running means of --ordmoe-ranking average: they start afresh" in proc.stdout
    back = run_pretrain(
        *SMALL, "--train-iters", "1", "--load", str(tmp_path / "avg"), "--finetune", "--save", str(tmp_path / "token")
    )
    assert "running means of --ordmoe-ranking average are not used here" in back.stdout


# ---- 8. files in a checkpoint or an output directory cannot be turned against the user -------
class _Payload:
    """A pickle that creates ``marker`` when it is unpickled: code run from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_rng_file_runs_no_code_and_the_real_one_round_trips(tmp_path):
    import random

    import torch

    from ordmoe_megatron.runtime import checkpointing

    marker = tmp_path / "ran"
    crafted = tmp_path / "rng_rank0.pt"
    torch.save({"python": _Payload(marker), "numpy": 0, "torch": 0, "tracker": 0}, crafted)
    with pytest.raises(checkpointing.CheckpointError, match="cannot restore the random states"):
        checkpointing.read_random_states(str(crafted))
    assert not marker.exists()
    saved = tmp_path / "real.pt"
    torch.save(checkpointing.random_states(), saved)
    expected = [random.random(), torch.rand(3)]
    checkpointing.set_random_states(checkpointing.read_random_states(str(saved)))
    again = [random.random(), torch.rand(3)]
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    from ordmoe_megatron.runtime.outputs import OutputError, RunLock

    victim = tmp_path / "victim"
    victim.write_text("precious")
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / ".ordmoe-run.lock").symlink_to(victim)
    with pytest.raises(OutputError, match="is a symbolic link; remove it"):
        RunLock(str(save), "--save")
    assert victim.read_text() == "precious"


def test_a_stale_incomplete_entry_that_is_not_ours_is_refused_before_any_work(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "iter_0000002.incomplete").write_text("")
    message = refused(*SMALL, "--train-iters", "2", "--save", str(save))
    assert "iter_0000002.incomplete is a file, not an interrupted save" in message and "remove it" in message


def test_the_dry_run_does_not_unpickle_the_checkpoint_metadata(run_a, tmp_path):
    import pickle

    save, _ = _copy(run_a, tmp_path)
    marker = tmp_path / "ran"
    (save / "iter_0000002" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    assert cli.main(_resume(save, "--dry-run")) == 0
    assert not marker.exists()


# ---- 9. a diverging run stops and saves only finite weights ------------------------------
@pytest.mark.one_version
def test_a_diverging_run_stops_non_zero_and_keeps_its_last_finite_checkpoint(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    # The default model diverges at step 5 with this learning rate and no clipping.
    diverging = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2", "--clip-grad", "0"]
    args = [*diverging, "--lr", "1e4", "--train-iters", "8", "--save-interval", "2", "--save", str(save)]
    proc = run_pretrain(*args, "--metrics-out", str(metrics), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "not finite; stopped without saving this step" in last and "--override-opt-param-scheduler" in last
    kept = int((save / "latest_checkpointed_iteration.txt").read_text())
    stopped_at = read_metrics(metrics)[-1]["iteration"]
    assert kept < stopped_at and not any((save / f"iter_{i:07d}").exists() for i in range(stopped_at, 9))
    # The step after the last checkpoint diverged whatever the learning rate: go back one further.
    kept = 2
    (save / "latest_checkpointed_iteration.txt").write_text(str(kept))
    resumed = run_pretrain(
        *diverging,
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--override-opt-param-scheduler",
        "--train-iters",
        str(kept + 1),
        "--save",
        str(save),
        "--load",
        str(save),
    )
    assert f"resuming at iteration {kept}" in resumed.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(kept + 1)


def test_a_non_finite_loss_or_grad_norm_is_named():
    from ordmoe_megatron.train.trainer import non_finite

    record = {"lm_loss": 5.0, "rank_loss": None, "grad_norm": float("nan")}
    assert non_finite(record) == ["grad norm nan"]
    assert non_finite({**record, "grad_norm": 1.0, "rank_loss": float("inf")}) == ["rank loss inf"]
    assert non_finite({**record, "grad_norm": 1.0}) == []


# ---- 10. Ctrl-C and a full disk ---------------------------------------------------------
@pytest.mark.one_version  # process and file handling, not megatron-core's
def test_ctrl_c_saves_and_exits_like_sigterm_and_a_planted_tracker_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt.tmp").symlink_to(victim)
    args = [*SMALL, "--train-iters", "200", "--save", str(save)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordmoe_megatron.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cpu_env(),
    )
    for line in proc.stdout:
        if line.startswith(" iteration        2/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "KeyboardInterrupt" not in err, err[-2000:]
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert f"stopped by signal {int(signal.SIGINT)} at iteration {stopped}" in out
    assert victim.read_text() == "precious"


_DISK_FULL = """
import errno, sys, torch
real = torch.save
def save(obj, f, *args, **kwargs):
    if "iter_0000004" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real(obj, f, *args, **kwargs)
torch.save = save
from ordmoe_megatron.entrypoints import pretrain
sys.exit(pretrain(sys.argv[1:]))
"""


@pytest.mark.one_version  # process and file handling, not megatron-core's
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_survives(tmp_path):
    save = tmp_path / "ckpt"
    args = [*SMALL, "--train-iters", "4", "--save-interval", "2", "--save", str(save)]
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, *args], capture_output=True, text=True, timeout=300, env=cpu_env()
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot write the checkpoint of iteration 4 (No space left on device)" in last
    assert "the checkpoint of iteration 2 is kept" in last
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    from ordmoe_megatron.train import checks, trainer

    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"run_id": "r", "iteration": i, "lm_loss": 1.0}) for i in (1, 2, 3)]
    metrics.write_text("\n".join(lines) + '\n{"run_id": "r", "iter')  # killed while writing line 4
    assert checks.metrics_of_other_runs(str(metrics), "r") == ""
    trainer._open_metrics(str(metrics), 2, "r").close()
    assert [r["iteration"] for r in read_metrics(metrics)] == [1, 2]
    assert "its last line is cut short" in capsys.readouterr().err
    metrics.write_text("{broken\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        checks.metrics_of_other_runs(str(metrics), "r")


def test_a_resume_with_another_expert_parallel_size_is_refused_before_the_build(run_a, tmp_path):
    save, _ = _copy(run_a, tmp_path)
    run_file = save / "iter_0000002" / "run.json"
    run = json.loads(run_file.read_text())
    assert run["expert_model_parallel_size"] == 1
    run_file.write_text(json.dumps({**run, "expert_model_parallel_size": 2}))
    message = refused(*_resume(save))
    assert "was saved with --expert-model-parallel-size 2, this run has 1" in message and "--finetune" in message


def test_a_preset_with_its_own_save_in_a_fresh_directory_runs(tmp_path, capsys):
    save = tmp_path / "mine"
    assert cli.main(["--preset", "tiny", "--work-dir", str(tmp_path / "w"), "--save", str(save), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"load                                     {save}\n" in out and "  new" in out


def test_tensor_parallelism_on_a_gpu_without_fused_norms_is_refused(monkeypatch):
    import importlib.util

    import torch

    from ordmoe_megatron.train import checks

    config = cli.run_config_from_args(
        cli.parse_args([*SMALL, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--global-batch-size", "4"])
    )
    assert checks.layout_problems(config, 2, None) == []  # on the CPU the norm is bridged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    problems = checks.layout_problems(config, 2, None)
    assert problems and "needs Transformer Engine or Apex" in problems[0]
