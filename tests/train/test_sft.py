"""``ordmoe-pretrain --sft-data``: chat fine-tuning with a Hugging Face tokenizer, packed rows,
``--load`` of a checkpoint, exact match per task; the refusals of packing."""

import json

import pytest

from ordmoe_megatron.data import sft
from tests.support import check_pretrain, hf_char_tokenizer, read_metrics, run_pretrain

SMALL = [
    "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32",
    "--seq-length", "80", "--max-position-embeddings", "80", "--lr-warmup-iters", "1", "--log-interval", "1",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1",
]  # fmt: skip


def _chats(path, count, seed):
    with open(path, "w") as f:
        for c in sft.tiny_sft_conversations(count, seed=seed, max_digits=3):
            f.write(json.dumps(c) + "\n")
    return str(path)


@pytest.mark.one_version
def test_fine_tuning_from_a_checkpoint_on_packed_chats(tmp_path):
    pytest.importorskip("transformers")
    tok = hf_char_tokenizer(tmp_path / "hf")
    data = ["--sft-data", _chats(tmp_path / "train.jsonl", 8, 1), "--tokenizer-model", tok]
    base = tmp_path / "base"
    run_pretrain(*SMALL, *data, "--train-iters", "2", "--save", str(base), "--no-sft-pack")
    out = tmp_path / "ft"
    proc = run_pretrain(
        *SMALL, *data,
        "--sft-valid-data", _chats(tmp_path / "valid.jsonl", 2, 9),
        "--load", str(base), "--finetune", "--sft-pack", "--train-iters", "2",
        "--metrics-out", str(out / "metrics.jsonl"), "--eval-out", str(out / "eval.json"),
    )  # fmt: skip
    assert "iteration" in proc.stdout
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(m["tier_order_acc"] is not None for m in metrics)
    result = json.loads((out / "eval.json").read_text())["OrdMoE (C=3)"]
    assert sorted(result["exact_match"]) == sorted(sft.TINY_SFT_TASKS)
    assert len(result["path_perplexity"]) == 3 and all(p > 1 for p in result["path_perplexity"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sft-pack", "--mock-data"], "--sft-data is the training data"),
        (["--sft-pack", "--ordmoe-lower-path-fraction", "0.5"], "--sft-pack with --ordmoe-lower-path-fraction"),
        (["--sft-pack", "--pipeline-model-parallel-size", "2"], "--sft-pack with tensor or pipeline"),
    ],
)
def test_packing_refusals(tmp_path, args, message):
    data = ["--sft-data", _chats(tmp_path / "train.jsonl", 2, 1), "--tokenizer-model", str(tmp_path / "none")]
    proc = check_pretrain(*SMALL, *data, *args, "--dry-run", WORLD_SIZE="2")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
