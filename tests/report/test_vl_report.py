"""The tier report on a vision-language checkpoint (``ordmoe-pretrain --preset tiny-vl``): every
path on the run's held-out captions, its expert load and answer accuracy; path 1 equals the plain
LLaVA model's likelihood; text data and another text length are refused."""

import json
from pathlib import Path

import pytest
import torch

from ordmoe_megatron.data import vision
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.router import TierRouter
from ordmoe_megatron.mcore.tiny_vl import image_embeddings, vl_forward, vl_model
from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.report import cli as report_cli
from ordmoe_megatron.report import report
from ordmoe_megatron.report.config import ReportConfig
from ordmoe_megatron.train import cli, vision_language
from tests.support import run_pretrain

SMALL_VL = [
    "--preset", "tiny-vl", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
    "--moe-ffn-hidden-size", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1", "--train-iters", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("vl") / "run"
    proc = run_pretrain(*SMALL_VL, "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(work / "checkpoints")


def test_the_report_reads_a_vision_language_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--load", checkpoint, "--max-sequences", "6", "--micro-batch-size", "4", "--out-json", str(out)]
    assert report_cli.main([*argv, "--out-png", str(tmp_path / "r.png")]) == 0
    got = json.loads(out.read_text())
    assert (
        got["data"]["source"] == "tiny-vl held-out scenes" and got["data"]["sequences"] == 6
    )  # at most --max-sequences: a partial last micro-batch
    assert len(got["paths"]) == 3 and 0.0 <= got["tier_order_acc"] <= 1.0
    assert all(sorted(p["answer_accuracy"]) == sorted(vision.QUESTIONS) for p in got["paths"])
    # The load counts every language position (the image's and the text's) once per expert it uses.
    info = report.inspect(checkpoint)
    positions = 6 * (info.flags["seq_length"] - 1 + image_embeddings())
    for layer in got["expert_load"]["layers"]:
        assert [sum(row) for row in layer["tokens_per_expert"]] == [positions * info.flags["moe_router_topk"]] * 3

    # Path 1 is the plain LLaVA model (megatron-core's, no tier paths) on the same captions.
    config = ReportConfig(load=checkpoint, ordmoe=OrdMoEConfig(num_tiers=3), max_sequences=6, micro_batch_size=4)
    _, batches, _ = report._held_out_scenes(config, info)
    # The trainer's held-out stream (its evaluation's), from the run's own config.
    run = cli.run_config_from_args(
        cli.parse_args([*SMALL_VL, "--work-dir", str(tmp_path / "w"), "--micro-batch-size", "4"])
    )
    trainer_batch = next(iter(vision_language.vl_stream(run, vision.prepare_tiny_vl_data(run.seed), "valid", 0)))
    assert all(torch.equal(batches[0][k], trainer_batch[k]) for k in trainer_batch)
    assert [len(b["tokens"]) for b in batches] == [4, 2]
    # Path 1's answers are those the run's own evaluation gave (eval.json).
    (evaluated,) = json.loads((Path(checkpoint).parent / "eval.json").read_text()).values()
    assert got["paths"][0]["answer_accuracy"] == pytest.approx(evaluated["answer_accuracy"], abs=1e-9)
    plain = vl_model(info.flags, report.report_config(info.flags, OrdMoEConfig(num_tiers=1)), None).eval()
    report.load_checkpoint(checkpoint, [plain], optimizer=None, load_rng=False, optional=TierRouter.is_running_mean)
    per_sequence = []
    with torch.no_grad():
        for b in batches:
            nll, mask = vl_forward(plain, b)
            per_sequence += (-(nll * mask).sum(1) / mask.sum(1)).tolist()
    assert got["paths"][0]["mean_logprob"] == pytest.approx(sum(per_sequence) / len(per_sequence), abs=1e-5)
    assert got["paths"][2]["mean_logprob"] != pytest.approx(got["paths"][0]["mean_logprob"], abs=1e-6)

    with pytest.raises(OrdMoEError, match="held-out scenes; drop --token-ids"):
        report.make_report(ReportConfig(load=checkpoint, ordmoe=OrdMoEConfig(num_tiers=3), token_ids="ids.jsonl"))
    with pytest.raises(OrdMoEError, match="--seq-length=7: a vision-language checkpoint"):
        report.make_report(ReportConfig(load=checkpoint, ordmoe=OrdMoEConfig(num_tiers=3), seq_length=7))
