"""The built-in trainer end to end: the tiny preset, bit-identical resume, and bad input."""

import json
import os
import shutil

import pytest
import torch

from ordmoe_megatron.data.corpus import DEFAULT_TASKS
from ordmoe_megatron.train.evaluation import exact_match_accuracy
from tests.support import read_metrics as metrics
from tests.support import run_pretrain as cli

SMALL_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--moe-ffn-hidden-size",
    "64",
    "--seq-length",
    "64",
    "--max-position-embeddings",
    "64",
    "--micro-batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "2",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset at reduced steps, with the baseline comparison."""
    work = tmp_path_factory.mktemp("tiny")
    proc = cli(
        "--preset",
        "tiny",
        "--work-dir",
        str(work),
        *SMALL_MODEL,
        "--train-iters",
        "6",
        "--eval-interval",
        "3",
        "--eval-iters",
        "1",
        "--compare-baseline",
    )
    return work, proc


def test_tiny_preset_end_to_end(tiny):
    work, proc = tiny
    data = work / "data"
    assert (data / "megatron" / "train.bin").exists() and (data / "megatron" / "train.idx").exists()
    assert (data / "tokenizer").is_dir()
    assert (work / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "6"
    records = metrics(work / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, 7)) and len(records[0]["path_logprob"]) == 3
    assert (work / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "baseline" / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
    evaluation = json.loads((work / "eval.json").read_text())
    assert set(evaluation) == {"OrdMoE (C=3)", "top-K baseline"}
    for row in evaluation.values():
        assert len(row["path_perplexity"]) == 3 and all(p > 1 for p in row["path_perplexity"])
        assert set(row["exact_match"]) == set(DEFAULT_TASKS)  # the corpus's own task names
    out = proc.stdout
    assert " iteration        6/       6" in out and "validation at iteration" in out
    assert "held-out evaluation" in out and "path 1 ppl" in out and "top-K baseline" in out


def test_rerun_reuses_data_and_does_not_retrain(tiny):
    work, _ = tiny
    bin_file = work / "data" / "megatron" / "train.bin"
    before = bin_file.stat().st_mtime_ns
    proc = cli("--preset", "tiny", "--work-dir", str(work), *SMALL_MODEL, "--train-iters", "6", "--eval-iters", "1")
    assert bin_file.stat().st_mtime_ns == before
    assert "resuming at iteration 6" in proc.stdout and " iteration " not in proc.stdout.replace("at iteration", "")


def test_data_files_are_readable_by_megatron_indexed_dataset(tiny):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work, _ = tiny
    dataset = IndexedDataset(str(work / "data" / "megatron" / "train"))
    assert len(dataset) > 10 and len(dataset[0]) > 0


def test_resume_is_bit_identical(tiny, tmp_path):
    work, _ = tiny
    data = [
        "--data-path",
        str(work / "data" / "megatron" / "train"),
        "--valid-data-path",
        str(work / "data" / "megatron" / "valid"),
        "--tokenizer-model",
        _tokenizer(work),
    ]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    cli(*data, *SMALL_MODEL, "--train-iters", "6", "--save", str(straight), "--metrics-out", str(tmp_path / "a.jsonl"))
    cli(
        *data,
        *SMALL_MODEL,
        "--train-iters",
        "6",
        "--save",
        str(parts),
        "--save-interval",
        "3",
        "--metrics-out",
        str(tmp_path / "b.jsonl"),
    )
    # Interrupt: throw away everything after iteration 3, as if the run had died there.
    shutil.rmtree(parts / "iter_0000006")
    (parts / "latest_checkpointed_iteration.txt").write_text("3")
    proc = cli(
        *data,
        *SMALL_MODEL,
        "--train-iters",
        "6",
        "--save",
        str(parts),
        "--load",
        str(parts),
        "--metrics-out",
        str(tmp_path / "b.jsonl"),
    )
    assert "resuming at iteration 3" in proc.stdout
    keys = ("lm_loss", "rank_loss", "aux_loss", "path_logprob", "tier_order_acc", "grad_norm")
    a = [{k: r[k] for k in keys} for r in metrics(tmp_path / "a.jsonl")]
    b = [{k: r[k] for k in keys} for r in metrics(tmp_path / "b.jsonl")]
    assert len(a) == len(b) == 6 and a == b


def _tokenizer(work):
    tok_dir = work / "data" / "tokenizer"
    return str(next(p for p in tok_dir.iterdir() if p.suffix == ".model"))


# Bad files and flags are refused by the trainer's own checks, the same on either megatron-core.
@pytest.mark.one_version
def test_bad_inputs_fail_early_with_clear_errors(tiny, tmp_path):
    work, _ = tiny
    prefix = str(work / "data" / "megatron" / "train")
    tokenizer = _tokenizer(work)

    missing = cli("--data-path", str(tmp_path / "nothing"), "--tokenizer-model", tokenizer, *SMALL_MODEL, check=False)
    assert missing.returncode != 0 and "nothing" in missing.stderr and " iteration" not in missing.stdout

    no_tokenizer = cli("--data-path", prefix, "--tokenizer-model", str(tmp_path / "x.model"), check=False)
    assert no_tokenizer.returncode != 0 and "does not exist" in no_tokenizer.stderr

    from ordmoe_megatron.data import train_sentencepiece

    other = train_sentencepiece(
        [str(work / "data" / "corpus" / "valid.jsonl")], str(tmp_path / "other"), vocab_size=512
    )
    mismatch = cli("--data-path", prefix, "--tokenizer-model", other, *SMALL_MODEL, check=False)
    assert mismatch.returncode != 0 and "tokenizer" in mismatch.stderr.lower()

    wrong_model = cli(
        "--data-path",
        prefix,
        "--tokenizer-model",
        tokenizer,
        *SMALL_MODEL,
        "--hidden-size",
        "32",
        "--load",
        str(work / "checkpoints"),
        "--save",
        str(tmp_path / "s"),
        check=False,
    )
    assert wrong_model.returncode != 0 and "--hidden-size is 32 here but 64 in the checkpoint" in wrong_model.stderr

    layout = cli("--mock-data", *SMALL_MODEL, "--tensor-model-parallel-size", "2", check=False)
    assert layout.returncode != 0 and "impossible parallel layout" in layout.stderr

    exists = cli("--mock-data", *SMALL_MODEL, "--save", str(work / "checkpoints"), check=False)
    assert exists.returncode != 0 and "--overwrite" in exists.stderr
    assert (work / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "6"


def test_interrupted_save_never_loads(tiny, tmp_path):
    work, _ = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work / "checkpoints", ckpt)
    # A save that died before it was renamed into place: the tracker still names iteration 6.
    shutil.copytree(ckpt / "iter_0000006", ckpt / "iter_0000009.incomplete")
    os.remove(ckpt / "iter_0000009.incomplete" / "metadata.json")
    from ordmoe_megatron.runtime.checkpointing import latest_iteration

    assert latest_iteration(str(ckpt)) == 6
    # A tracker naming a checkpoint whose files are incomplete is refused, not half-loaded.
    (ckpt / "latest_checkpointed_iteration.txt").write_text("9")
    os.rename(ckpt / "iter_0000009.incomplete", ckpt / "iter_0000009")
    proc = cli(
        "--preset",
        "tiny",
        "--work-dir",
        str(work),
        *SMALL_MODEL,
        "--load",
        str(ckpt),
        "--save",
        str(tmp_path / "out"),
        "--metrics-out",
        str(tmp_path / "m.jsonl"),
        "--plot-out",
        str(tmp_path / "m.png"),
        check=False,
    )
    assert proc.returncode != 0 and "incomplete" in proc.stderr


def test_exact_match_is_keyed_by_the_corpus_task_name_not_the_prompt_text():
    """The task kind is each record's own ``task`` (the corpus's name), whatever the prompt looks like."""

    class Chars:  # one token per character; id 0 ends a document
        vocab_size, eod = 128, 0

        def tokenize(self, text):
            return [ord(c) for c in text]

        def detokenize(self, ids):
            return "".join(chr(i) for i in ids)

    class Newline(torch.nn.Module):  # always completes with an empty line
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, positions, mask):
            logits = torch.zeros(*tokens.shape, Chars.vocab_size)
            logits[..., ord("\n")] = 1.0
            return logits

    tasks = [
        {"task": "add", "prompt": "12+34=", "answer": " 46"},
        {"task": "sort", "prompt": "12+34=", "answer": " "},  # an empty answer: the newline is right
        {"task": "sort", "prompt": "sort: 2 1 ->", "answer": " 1 2"},
    ]
    assert exact_match_accuracy(Newline(), Chars(), tasks) == {"add": 0.0, "sort": 0.5}


def test_the_logged_aux_loss_is_whichever_balancing_loss_the_model_uses():
    from ordmoe_megatron.train.trainer import _balancing_loss, format_log_line

    assert _balancing_loss({"seq_load_balancing_loss": 0.25, "z_loss": 3.0}) == 0.25
    assert _balancing_loss({"load_balancing_loss": 0.5, "global_load_balancing_loss": 0.25}) == 0.75
    assert _balancing_loss({"z_loss": 3.0}) is None  # aux-loss-free: nothing to show, not a 0
    values = dict(lr=1e-3, lm_loss=2.0, aux_loss=None)
    assert "aux loss" not in format_log_line(1, 2, values, 10.0, 100.0)
    assert "aux loss: 2.500000E-01" in format_log_line(1, 2, dict(values, aux_loss=0.25), 10.0, 100.0)


def test_exact_match_never_emits_the_output_layers_padding_ids():
    """The output layer is padded past the tokenizer's vocabulary; an untrained padding logit
    that wins must not be emitted (the tokenizer cannot detokenize it)."""

    class Chars:
        vocab_size, eod = 128, 0

        def tokenize(self, text):
            return [ord(c) for c in text]

        def detokenize(self, ids):
            assert all(i < self.vocab_size for i in ids), ids
            return "".join(chr(i) for i in ids)

    class PaddingWins(torch.nn.Module):  # a padding id scores highest; then "7", then a newline
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, positions, mask):
            logits = torch.zeros(*tokens.shape, 256)
            logits[..., 200] = 9.0
            last = tokens[:, -1:]
            logits[..., ord("7")] = torch.where(last == ord("7"), 0.0, 2.0)
            logits[..., ord("\n")] = 1.0
            return logits

    tasks = [{"task": "add", "prompt": "3+4=", "answer": "7"}]
    assert exact_match_accuracy(PaddingWins(), Chars(), tasks) == {"add": 1.0}
