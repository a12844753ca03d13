"""``ordmoe-pretrain --preset tiny-vl``: the vision-language model's loss mask, C = 1 equals the
plain LLaVA model, a short run with its evaluation, resume equals an uninterrupted run, and the
flags it refuses."""

import json

import pytest
import torch

from ordmoe_megatron.data import vision
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.mcore.tiny_vl import VISION, encoder_step_flops, image_embeddings, vl_model, vl_step_flops
from ordmoe_megatron.train import build, checks, cli
from tests.support import read_metrics, run_pretrain

SMALL = [
    "--preset", "tiny-vl", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
    "--moe-ffn-hidden-size", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
]  # fmt: skip


def _config(tmp_path, *args):
    return cli.run_config_from_args(cli.parse_args([*SMALL, "--work-dir", str(tmp_path), *args]))


def _model_and_batch(tmp_path, *args, seed=11):
    config, sources = build.prepare_data(_config(tmp_path, *args))
    torch.manual_seed(seed)
    model = vl_model(config.model_flags, build.transformer_config(config), config.ordmoe)
    batch = next(build.stream_factory(config, sources)("train", 0))
    return model, batch


def test_image_positions_are_out_of_the_loss_and_text_positions_keep_theirs(megatron_single_process, tmp_path):
    model, b = _model_and_batch(tmp_path, "--train-iters", "2", "--vl-caption-fraction", "0.5")
    loss, mask = model(b["images"], b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    n = image_embeddings()
    rows, length = b["tokens"].shape
    assert mask.shape == (rows, length - 1 + n) and loss.shape == (3 * rows, length - 1 + n)  # 3 paths
    assert mask[:, :n].sum() == 0
    # Text token i (after the image) sits at combined position n - 1 + i; its target keeps its mask.
    assert torch.equal(mask[:, n:], b["loss_mask"][:, 1:])
    assert b["loss_mask"][:, 0].sum() == 0 and mask.sum() > 0  # nothing lost to the image


def test_one_tier_equals_the_plain_llava_model(megatron_single_process, tmp_path):
    plain, b = _model_and_batch(tmp_path, "--no-ordmoe", "--train-iters", "2")
    single, _ = _model_and_batch(tmp_path, "--ordmoe-num-tiers", "1", "--train-iters", "2")
    assert type(single).__name__ == "OrdMoELLaVAModel" and type(plain).__name__ == "LLaVAModel"
    args = (b["images"], b["tokens"], b["position_ids"], None)
    out_plain, _ = plain(*args, labels=b["labels"], loss_mask=b["loss_mask"])
    out_single, _ = single(*args, labels=b["labels"], loss_mask=b["loss_mask"])
    assert torch.equal(out_plain, out_single)
    out_plain.sum().backward()
    out_single.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), single.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_the_flops_count_the_image_positions_and_the_encoder_once(tmp_path):
    from ordmoe_megatron import OrdMoEConfig
    from ordmoe_megatron.mcore.flops import ordmoe_run_step_flops

    tconfig = build.transformer_config(_config(tmp_path, "--train-iters", "2"))
    n, h, w = image_embeddings(), VISION.hidden_size, tconfig.hidden_size
    # By hand: the ViT layer on n patches and the class token (projections, scores, its 4h MLP),
    # then the projector's two matmuls on the n image embeddings; forward and backward: x3.
    vit = (2 * h * 3 * h + 2 * h * h + 2 * (n + 1) * h + 2 * h * 4 * h * 2) * (n + 1) * VISION.num_layers
    projector = 2 * (h * 2 * w + 2 * w * w) * n
    assert encoder_step_flops(tconfig, 4) == pytest.approx(3 * 4 * (vit + projector))
    c3 = OrdMoEConfig(num_tiers=3)
    language = ordmoe_run_step_flops(tconfig, 40, 4, 20 - 1 + n)  # the image token becomes n positions
    encoder = encoder_step_flops(tconfig, 4)
    assert vl_step_flops(tconfig, 40, 4, 20, None, 0, 2) == pytest.approx(language + encoder)
    assert vl_step_flops(tconfig, 40, 4, 20, c3, 0, 2) == pytest.approx(3 * language + encoder)  # encoder once
    sequential = OrdMoEConfig(num_tiers=3, path_schedule="sequential")  # the whole model once per path
    assert vl_step_flops(tconfig, 40, 4, 20, sequential, 0, 2) == pytest.approx(3 * (language + encoder))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size > 1"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel"], "--tensor-model-parallel-size > 1"),
        (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size > 1"),
        (["--sft-pack"], "--sft-pack"),
        (["--mock-data"], "--mock-data"),
        (["--bf16"], "--bf16"),
        (["--mtp-num-layers", "1"], "--mtp-num-layers"),
        (["--ordmoe-lower-path-fraction", "0.5"], "--ordmoe-lower-path-fraction"),
        (["--vl-caption-fraction", "1.5"], "--vl-caption-fraction"),
        (
            ["--qk-layernorm", "--normalization", "RMSNorm", "--qk-layernorm-scope", "projection"],
            "--qk-layernorm-scope",
        ),
        (["--rotary-percent", "0.5"], "--rotary-percent"),
    ],
)
def test_what_tiny_vl_cannot_honour_is_refused_naming_the_flag(tmp_path, args, message):
    config = _config(tmp_path, *args)
    with pytest.raises(OrdMoEError, match="tiny-vl|vl-caption") as err:
        checks.check_run(config, 1, None, dry_run=True)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_more_than_one_process_is_refused_in_one_line(tmp_path):
    from tests.support import check_pretrain

    proc = check_pretrain(*SMALL, "--work-dir", str(tmp_path), "--dry-run", WORLD_SIZE="2")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("ordmoe-pretrain: --preset tiny-vl with 2 processes")


@pytest.mark.one_version
def test_a_short_run_evaluates_and_resume_equals_an_uninterrupted_run(tmp_path):
    """4 steps (2 on captions, 2 on questions): finite losses, the evaluation's keys; then the
    same run saved at 2 and resumed gives the same metrics."""
    import shutil

    from ordmoe_megatron.runtime.model_flags import normalize_flags, padded_vocab_size

    straight = tmp_path / "straight"
    proc = run_pretrain(*SMALL, "--work-dir", str(straight), "--train-iters", "4", "--eval-interval", "2")
    validation = [line for line in proc.stdout.splitlines() if line.startswith(" validation at iteration")]
    assert len(validation) == 2 and all(f"{kind} acc: " in validation[0] for kind in vision.QUESTIONS)
    metrics = read_metrics(straight / "metrics.jsonl")
    keys = ("lm_loss", "rank_loss", "aux_loss", "path_logprob", "tier_order_acc", "grad_norm")
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    config, sources = build.prepare_data(_config(tmp_path / "again", "--train-iters", "4"))
    vocab = padded_vocab_size(normalize_flags(config.model_flags), 1)  # as vl_model pads it
    counted = vl_step_flops(build.transformer_config(config), vocab, 4, config.seq_length, config.ordmoe, 0, 2)
    assert all(m["flops"] == pytest.approx(counted) for m in metrics)  # the image positions and the encoder
    assert all(torch.isfinite(torch.tensor([m["lm_loss"], m["rank_loss"], m["grad_norm"]])).all() for m in metrics)
    result = json.loads((straight / "eval.json").read_text())["OrdMoE (C=3)"]
    assert sorted(result["answer_accuracy"]) == sorted(vision.QUESTIONS)
    assert all(0.0 <= a <= 1.0 for a in result["answer_accuracy"].values())
    assert len(result["path_perplexity"]) == 3 and all(1 < p < 100 for p in result["path_perplexity"])

    parts = tmp_path / "parts"
    run_pretrain(*SMALL, "--work-dir", str(parts), "--train-iters", "4", "--eval-interval", "2", "--save-interval", "2")
    shutil.rmtree(parts / "checkpoints" / "iter_0000004")
    (parts / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
    proc = run_pretrain(*SMALL, "--work-dir", str(parts), "--train-iters", "4", "--eval-interval", "2")
    assert "resuming at iteration 2" in proc.stdout
    resumed = read_metrics(parts / "metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in metrics]
    again = json.loads((parts / "eval.json").read_text())["OrdMoE (C=3)"]
    assert again["answer_accuracy"] == result["answer_accuracy"]
    torch.testing.assert_close(again["path_perplexity"], result["path_perplexity"], rtol=1e-6, atol=0)
