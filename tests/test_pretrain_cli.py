"""``ordmoe-pretrain`` end to end, as a user runs it (a subprocess on CPU)."""
import json
import subprocess
import sys

import pytest

SMALL = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32",
         "--seq-length", "32", "--max-position-embeddings", "32", "--train-iters", "4", "--log-interval", "2",
         "--lr-warmup-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data"]


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "ordmoe_megatron.pretrain", *SMALL, *args],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"ordmoe-pretrain failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def ordmoe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "metrics.jsonl"
    proc = run_cli("--ordmoe", "--metrics-out", str(out))
    return proc, read_metrics(out)


def test_metrics_and_log_lines(ordmoe_run):
    proc, metrics = ordmoe_run
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert {"iteration", "lm_loss", "rank_loss", "aux_loss", "path_logprob", "tier_order_acc"} <= m.keys()
        assert len(m["path_logprob"]) == 3 and 0.0 <= m["tier_order_acc"] <= 1.0
        assert m["aux_loss"] > 0 and m["lm_loss"] > 0
        # Path 1's log-likelihood is the negative LM loss: both are means over the same tokens.
        assert m["path_logprob"][0] == pytest.approx(-m["lm_loss"], rel=1e-5)
    log_lines = [l for l in proc.stdout.splitlines() if l.startswith(" iteration")]
    assert len(log_lines) == 2
    for key in ("lm loss:", "rank loss:", "aux loss:", "path logprob:", "tier order acc:", "tier load max/mean:"):
        assert all(key in l for l in log_lines)


def test_runs_are_deterministic(ordmoe_run, tmp_path):
    out = tmp_path / "again.jsonl"
    run_cli("--ordmoe", "--metrics-out", str(out))
    first = [(m["lm_loss"], m["rank_loss"], m["path_logprob"]) for m in ordmoe_run[1]]
    again = [(m["lm_loss"], m["rank_loss"], m["path_logprob"]) for m in read_metrics(out)]
    assert first == again


def test_single_tier_prints_the_same_lm_loss_as_no_ordmoe(tmp_path):
    one, plain = tmp_path / "one.jsonl", tmp_path / "plain.jsonl"
    run_cli("--ordmoe", "--ordmoe-num-tiers", "1", "--metrics-out", str(one))
    run_cli("--no-ordmoe", "--metrics-out", str(plain))
    assert [m["lm_loss"] for m in read_metrics(one)] == [m["lm_loss"] for m in read_metrics(plain)]
    assert [m["aux_loss"] for m in read_metrics(one)] == [m["aux_loss"] for m in read_metrics(plain)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ordmoe-num-tiers", "5"], "--ordmoe-num-tiers=5 needs 5x2=10 experts"),
        (["--ordmoe-rewards", "1", "0"], "one reward per tier"),
        (["--ordmoe-layer-scope", "9"], "the model has layers 1-2"),
        (["--global-batch-size", "3"], "--global-batch-size=3 must be a multiple"),
    ],
)
def test_bad_flags_fail_before_training(args, message):
    proc = run_cli("--ordmoe", *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert " iteration" not in proc.stdout


def test_existing_metrics_file_is_not_overwritten(tmp_path):
    out = tmp_path / "keep.jsonl"
    out.write_text("precious\n")
    proc = run_cli("--metrics-out", str(out), check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert out.read_text() == "precious\n"
