"""``ordmoe-pretrain`` on mock data: metrics, log lines, determinism, C = 1, bad flags."""

import pytest

from tests.support import check_pretrain, read_metrics, run_pretrain

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
    "--train-iters",
    "4",
    "--log-interval",
    "2",
    "--lr-warmup-iters",
    "1",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--mock-data",
]


def run_cli(*args, check=True):
    return run_pretrain(*SMALL, *args, check=check)


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
    log_lines = [line for line in proc.stdout.splitlines() if line.startswith(" iteration")]
    assert len(log_lines) == 2
    for key in ("lm loss:", "rank loss:", "aux loss:", "path logprob:", "tier order acc:", "tier load max/mean:"):
        assert all(key in line for line in log_lines)


def test_eval_out_and_the_flops_each_step_reports(tmp_path):
    out = tmp_path / "eval.json"
    metrics = tmp_path / "m.jsonl"
    run_cli(
        "--ordmoe",
        "--ordmoe-lower-path-fraction",
        "0.5",
        "--eval-out",
        str(out),
        "--metrics-out",
        str(metrics),
        "--eval-iters",
        "1",
    )
    import json

    (row,) = json.loads(out.read_text()).values()
    assert len(row["path_perplexity"]) == 3 and row["iteration"] == 4 and 0 <= row["tier_order_acc"] <= 1
    plain = tmp_path / "plain.json"
    run_cli("--no-ordmoe", "--eval-out", str(plain), "--eval-iters", "1")
    (plain_row,) = json.loads(plain.read_text()).values()
    # One plain step plus two lower paths on half of each micro-batch of 2: twice the plain FLOPs.
    assert row["step_flops"] == pytest.approx(2 * plain_row["step_flops"])
    records = read_metrics(metrics)
    assert all(r["flops"] == row["step_flops"] for r in records)
    assert records[0]["tokens"] == 4 * 32 * 2  # global batch x sequence x paths per sequence


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
    proc = check_pretrain(*SMALL, "--ordmoe", *args)
    assert proc.returncode != 0 and message in proc.stderr
    assert " iteration" not in proc.stdout


def test_sqrtsoftplus_trains_where_megatron_core_has_it_and_is_refused_where_not(tmp_path):
    from ordmoe_megatron.runtime import compat

    out = tmp_path / "m.jsonl"
    args = ("--moe-router-score-function", "sqrtsoftplus", "--train-iters", "2", "--metrics-out", str(out))
    proc = run_cli("--ordmoe", *args, check=False)
    if "sqrtsoftplus" in compat.SCORE_FUNCTIONS:  # megatron-core 0.18 on
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = read_metrics(out)
        assert [m["iteration"] for m in metrics] == [1, 2]
        assert all(len(m["path_logprob"]) == 3 and m["lm_loss"] > 0 for m in metrics)
    else:
        assert proc.returncode != 0 and "sqrtsoftplus needs megatron-core 0.18 or later" in proc.stderr
        assert " iteration" not in proc.stdout


def test_existing_metrics_file_is_not_overwritten(tmp_path):
    out = tmp_path / "keep.jsonl"
    out.write_text("precious\n")
    proc = run_cli("--metrics-out", str(out), check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert out.read_text() == "precious\n"


def test_dry_run_prints_the_layouts_and_builds_nothing(tmp_path):
    proc = check_pretrain(
        *SMALL,
        "--ordmoe",
        "--num-experts",
        "64",
        "--moe-router-topk",
        "6",
        "--num-layers",
        "28",
        "--save",
        str(tmp_path / "ckpt"),
        "--metrics-out",
        str(tmp_path / "m.jsonl"),
        "--dry-run",
    )
    out = proc.stdout
    assert "configuration:" in out and "parallel layout:" in out and "tier layout:" in out
    assert "3 tiers (uniform: 1-6, 25-30, 59-64)" in out
    assert "world 1 = TP 1 x PP 1 x DP 1; EP 1" in out
    assert not list(tmp_path.iterdir())


def test_dry_run_shows_the_path_schedule_and_refuses_what_it_cannot_run():
    pp2 = ["--pipeline-model-parallel-size", "2", "--dry-run"]
    sequential = check_pretrain(
        *SMALL, "--ordmoe-path-schedule", "sequential", "--ordmoe-lower-path-fraction", "0.5", *pp2, WORLD_SIZE="2"
    )
    assert "activations between pipeline stages: [32, 2 or 1 (one path at a time), 32]" in sequential.stdout
    fused = check_pretrain(*SMALL, "--ordmoe-lower-path-fraction", "0.5", *pp2, WORLD_SIZE="2")
    assert "activations between pipeline stages: [32, 2 + 2 x 1, 32]" in fused.stdout
    vpp = ["--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "8"]
    refused = check_pretrain(
        *SMALL,
        "--ordmoe-path-schedule",
        "sequential",
        "--ordmoe-lower-path-fraction",
        "0.5",
        *pp2,
        *vpp,
        WORLD_SIZE="2",
    )
    assert refused.returncode != 0 and "mis-pairs its messages with 2 pipeline stages" in refused.stderr
    uneven = check_pretrain(
        *SMALL, *pp2, "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "6", WORLD_SIZE="2"
    )
    assert uneven.returncode != 0 and "must be a multiple of --pipeline-model-parallel-size=2" in uneven.stderr


def test_bf16_trains(tmp_path):
    out = tmp_path / "bf16.jsonl"
    run_cli("--ordmoe", "--bf16", "--metrics-out", str(out))
    records = read_metrics(out)
    assert len(records) == 4 and all(r["lm_loss"] > 0 and len(r["path_logprob"]) == 3 for r in records)


def test_fp8_is_refused_with_the_reason():
    # ordmoe-pretrain builds no Transformer Engine layers: with or without TE it cannot do FP8.
    fp8 = check_pretrain(*SMALL, "--ordmoe", "--bf16", "--fp8-format", "hybrid", "--dry-run")
    assert fp8.returncode != 0 and "builds no Transformer Engine layers" in fp8.stderr
    assert "configuration:" not in fp8.stdout
