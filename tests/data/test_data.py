"""Tests of the built-in tiny data pipeline: corpus -> tokenizer -> .bin/.idx -> GPTDataset.

The pipeline is built once per module (about 10 s on 2 CPU cores); every test that damages
files does so on a copy.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy
import pytest
import torch

from ordmoe_megatron.data import (
    build_corpus,
    build_gpt_datasets,
    check_data_files,
    check_tokenizer_matches_data,
    exact_match,
    load_tokenizer,
    prepare_tiny_data,
    read_jsonl,
    train_sentencepiece,
)
from ordmoe_megatron.data.corpus import sha256_file
from ordmoe_megatron.errors import OrdMoEError

SEQ_LENGTH = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_data(str(tmp_path_factory.mktemp("tiny_data")), seed=1234)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny["tokenizer_model"])


def _copy_prefix(prefix, dest_dir):
    """Copy <prefix>.bin/.idx/.tokenizer.json to dest_dir; return the new prefix."""
    new_prefix = os.path.join(str(dest_dir), os.path.basename(prefix))
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        shutil.copy2(prefix + suffix, new_prefix + suffix)
    return new_prefix


def _truncate(path, keep_fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep_fraction))


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------


def test_corpus_same_seed_same_fingerprint(tiny, tmp_path):
    manifest = build_corpus(str(tmp_path / "again"), seed=1234)
    with open(tiny["manifest"]) as f:
        original = json.load(f)
    assert manifest["sha256"] == original["sha256"]
    assert manifest["seed"] == 1234 and manifest["sizes"]["heldout_problems"] == 600


def test_corpus_seed_changes_content(tmp_path):
    small = dict(max_text_chars=20_000, train_problems_per_task=50)
    a = build_corpus(str(tmp_path / "a"), seed=1, **small)
    b = build_corpus(str(tmp_path / "b"), seed=2, **small)
    assert a["sha256"]["content"] != b["sha256"]["content"]


def test_corpus_has_text_and_tasks_with_document_level_split(tiny):
    train = list(read_jsonl(tiny["train_jsonl"]))
    valid = list(read_jsonl(tiny["valid_jsonl"]))
    for docs in (train, valid):
        sources = {d["source"] for d in docs}
        assert "tasks" in sources and any(s.startswith("stdlib:") for s in sources)
        assert all(d["text"].strip() for d in docs)
    train_files = {d["source"] for d in train if d["source"] != "tasks"}
    valid_files = {d["source"] for d in valid if d["source"] != "tasks"}
    assert not train_files & valid_files, "a stdlib file contributes to both splits"
    assert not any("/test/" in s or "site-packages" in s for s in train_files | valid_files)


def _task_prompts(jsonl_path):
    """Every prompt (line up to and including its marker) of the task lines in a split."""
    prompts = set()
    for doc in read_jsonl(jsonl_path):
        if doc["source"] != "tasks":
            continue
        for line in doc["text"].split("\n"):
            marker = "->" if "->" in line else "="
            prompts.add(line[: line.index(marker) + len(marker)])
    return prompts


def test_heldout_problems_are_correct_and_never_trained_on(tiny):
    heldout = list(read_jsonl(tiny["heldout_tasks"]))
    assert {p["task"] for p in heldout} == {"add", "reverse", "sort"}
    assert len({p["prompt"] for p in heldout}) == len(heldout)
    train_prompts = _task_prompts(tiny["train_jsonl"])
    valid_prompts = _task_prompts(tiny["valid_jsonl"])
    assert len(train_prompts) == 24_000
    for problem in heldout:
        prompt, answer = problem["prompt"], problem["answer"]
        assert prompt not in train_prompts and prompt not in valid_prompts
        if problem["task"] == "add":
            a, b = prompt[:-1].split("+")
            assert prompt.endswith("=") and answer == str(int(a) + int(b))
        else:
            items = prompt[: -len("->")].split(":", 1)[1].split()
            expected = items[::-1] if problem["task"] == "reverse" else sorted(items)
            assert prompt.endswith("->") and answer == " " + " ".join(expected)
    assert not train_prompts & valid_prompts


def test_exact_match():
    assert exact_match("572\n13+4=17", "572")
    assert exact_match("c b a", " c b a")
    assert not exact_match("57", "572")
    assert not exact_match("\n572", "572")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def test_tokenizer_is_megatron_core_sentencepiece(tokenizer):
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == 2048
    assert tokenizer.eod == 2 and tokenizer.pad == 3


@pytest.mark.parametrize(
    "text",
    [
        "Return the number of items in the container.",
        "12+345=357\n9999+1=10000",
        "reverse: a b c -> c b a",
        "    indented code:\n\tx = {'k': [1, 2]}  # comment",
        "unicode: héllo ☃ 漢字 — byte fallback",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.detokenize(ids) == text


def test_tokenizer_splits_digits(tokenizer):
    ids = tokenizer.tokenize("1234567890")
    assert [tokenizer.detokenize([i]) for i in ids] == list("1234567890")


def test_heldout_prompt_tokens_are_a_prefix_of_the_full_line(tiny, tokenizer):
    # What exact-match eval relies on: generating after the prompt tokens can reproduce the
    # training-format line, and the decoded continuation is the answer.
    for problem in read_jsonl(tiny["heldout_tasks"]):
        prompt_ids = tokenizer.tokenize(problem["prompt"])
        full_ids = tokenizer.tokenize(problem["prompt"] + problem["answer"])
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert tokenizer.detokenize(full_ids[len(prompt_ids) :]) == problem["answer"]


def test_tokenizer_training_is_deterministic(tiny, tmp_path):
    model = train_sentencepiece([tiny["train_jsonl"]], str(tmp_path / "other" / "sp"), seed=1234)
    assert sha256_file(model) == sha256_file(tiny["tokenizer_model"])


# ----------------------------------------------------------------------------------------------
# .bin/.idx files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "valid"])
def test_indexed_dataset_matches_retokenized_jsonl(tiny, tokenizer, split):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(tiny[f"{split}_prefix"])
    docs = [d["text"] for d in read_jsonl(tiny[f"{split}_jsonl"])]
    assert len(dataset) == len(docs)
    assert len(dataset.document_indices) == len(docs) + 1
    assert dataset.index.dtype == numpy.uint16
    for i, text in enumerate(docs):
        assert dataset[i].tolist() == tokenizer.tokenize(text) + [tokenizer.eod]
    summary = check_data_files(tiny[f"{split}_prefix"])
    assert summary["num_documents"] == len(docs)
    assert summary["num_tokens"] == int(dataset.sequence_lengths.sum())


# ----------------------------------------------------------------------------------------------
# GPTDataset
# ----------------------------------------------------------------------------------------------


def _assert_gpt_sample(sample):
    tokens, labels, loss_mask = sample["tokens"], sample["labels"], sample["loss_mask"]
    assert tokens.shape == labels.shape == loss_mask.shape == (SEQ_LENGTH,)
    assert torch.equal(labels[:-1], tokens[1:])
    assert loss_mask.sum() > 0


def test_gpt_datasets_without_torch_distributed(tiny, tokenizer, monkeypatch):
    # Another test module may have initialised a session-wide process group; megatron's
    # builder only asks torch.distributed.is_initialized(), so hide it to test that path.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    train, valid, test = build_gpt_datasets(
        tiny["train_prefix"],
        tokenizer,
        SEQ_LENGTH,
        (300, 20, None),
        valid_prefix=tiny["valid_prefix"],
        seed=7,
    )
    assert test is None and len(train) >= 300 and len(valid) >= 20
    for dataset in (train, valid):
        for idx in (0, 5, len(dataset) - 1):
            _assert_gpt_sample(dataset[idx])
    # The index cache lives under the data directory.
    assert any(n.endswith("document_index.npy") for n in os.listdir(tiny["data_cache"]))


def test_gpt_datasets_from_one_prefix_with_split(tiny, tokenizer, tmp_path):
    train, valid, test = build_gpt_datasets(
        tiny["train_prefix"],
        tokenizer,
        SEQ_LENGTH,
        (100, 10, 10),
        split="90,5,5",
        path_to_cache=str(tmp_path / "cache"),
    )
    for dataset in (train, valid, test):
        _assert_gpt_sample(dataset[0])


@contextlib.contextmanager
def _gloo_world_of_one(tmp_path):
    """A single-rank gloo process group, or the one a conftest fixture already set up."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gpt_datasets_with_gloo_initialised(tiny, tokenizer, tmp_path):
    with _gloo_world_of_one(tmp_path):
        train, valid, _ = build_gpt_datasets(
            tiny["train_prefix"],
            tokenizer,
            SEQ_LENGTH,
            (50, 5, None),
            valid_prefix=tiny["valid_prefix"],
            path_to_cache=str(tmp_path / "cache"),
        )
        _assert_gpt_sample(train[0])
        _assert_gpt_sample(valid[0])
    assert os.listdir(tmp_path / "cache")


def _two_rank_worker(rank, tiny, store_path, cache_dir, out_path):
    """One of two gloo ranks: build the datasets (rank 0 writes the index cache first)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        tokenizer = load_tokenizer(tiny["tokenizer_model"])
        train, _, _ = build_gpt_datasets(
            tiny["train_prefix"],
            tokenizer,
            SEQ_LENGTH,
            (64, 8, None),
            valid_prefix=tiny["valid_prefix"],
            path_to_cache=cache_dir,
        )
        torch.save(torch.stack([train[i]["tokens"] for i in range(8)]), out_path)
    finally:
        dist.destroy_process_group()


def test_gpt_datasets_on_two_gloo_ranks_agree(tiny, tmp_path):
    # Plain subprocesses running this file (see __main__ below): cheaper than
    # torch.multiprocessing.spawn, whose children re-import pytest's whole session.
    args = [json.dumps(tiny), str(tmp_path / "pg"), str(tmp_path / "cache")]
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p),
    }  # the package importable even when it is not installed
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), *args, str(tmp_path / f"{rank}.pt")], env=env)
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert torch.equal(torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt"))


# ----------------------------------------------------------------------------------------------
# prepare_tiny_data re-use
# ----------------------------------------------------------------------------------------------


def _file_mtimes(work_dir):
    mtimes = {}
    for root, dirs, files in os.walk(work_dir):
        dirs[:] = [d for d in dirs if d != "index_cache"]  # written by dataset builds, not here
        for name in files:
            if name != ".prepare.lock":
                path = os.path.join(root, name)
                mtimes[path] = os.stat(path).st_mtime_ns
    return mtimes


def test_prepare_again_reuses_everything(tiny):
    before = _file_mtimes(tiny["work_dir"])
    start = time.perf_counter()
    again = prepare_tiny_data(tiny["work_dir"], seed=1234)
    elapsed = time.perf_counter() - start
    assert again["rebuilt"] == []
    assert _file_mtimes(tiny["work_dir"]) == before
    assert elapsed < 2.0
    assert again["corpus_sha256"] == tiny["corpus_sha256"]


def test_prepare_rebuilds_only_damaged_data(tiny, tmp_path):
    work_dir = str(tmp_path / "copy")
    shutil.copytree(tiny["work_dir"], work_dir)
    _truncate(os.path.join(work_dir, "megatron", "valid.bin"))
    again = prepare_tiny_data(work_dir, seed=1234)
    assert again["rebuilt"] == ["valid_data"]
    assert check_data_files(again["valid_prefix"])["num_tokens"] > 0


# ----------------------------------------------------------------------------------------------
# Bad inputs fail clearly
# ----------------------------------------------------------------------------------------------


def test_missing_bin_is_reported(tiny, tmp_path):
    prefix = _copy_prefix(tiny["valid_prefix"], tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(OrdMoEError, match=r"missing: .*valid\.bin.*write_indexed_dataset"):
        check_data_files(prefix)


def test_truncated_idx_is_reported(tiny, tmp_path):
    prefix = _copy_prefix(tiny["valid_prefix"], tmp_path)
    _truncate(prefix + ".idx")
    with pytest.raises(ValueError, match=r"Truncated index file .*valid\.idx"):
        check_data_files(prefix)


def test_truncated_bin_is_reported(tiny, tmp_path):
    prefix = _copy_prefix(tiny["valid_prefix"], tmp_path)
    _truncate(prefix + ".bin", 0.9)
    with pytest.raises(ValueError, match=r"valid\.bin is truncated"):
        check_data_files(prefix)


def test_garbage_idx_is_reported(tiny, tmp_path):
    prefix = _copy_prefix(tiny["valid_prefix"], tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    with pytest.raises(ValueError, match=r"not a megatron-core index file"):
        check_data_files(prefix)


@pytest.fixture(scope="module")
def other_tokenizer(tiny, tmp_path_factory):
    """A different, smaller tokenizer than the one the data was written with."""
    model = train_sentencepiece(
        [tiny["valid_jsonl"]], str(tmp_path_factory.mktemp("other_tok") / "sp"), vocab_size=1024
    )
    return load_tokenizer(model)


def test_tokenizer_mismatch_is_reported(tiny, other_tokenizer):
    with pytest.raises(ValueError, match=r"Tokenizer mismatch .*valid\.bin"):
        check_tokenizer_matches_data(other_tokenizer, tiny["valid_prefix"])
    with pytest.raises(ValueError, match=r"Tokenizer mismatch"):
        build_gpt_datasets(
            tiny["train_prefix"], other_tokenizer, SEQ_LENGTH, (10, 1, None), valid_prefix=tiny["valid_prefix"]
        )


def test_too_small_vocab_is_reported_without_a_record(tiny, other_tokenizer, tmp_path):
    prefix = _copy_prefix(tiny["valid_prefix"], tmp_path)
    os.remove(prefix + ".tokenizer.json")  # e.g. data written by another tool
    with pytest.raises(ValueError, match=r"token id \d+ but the tokenizer .* vocab_size 1024"):
        check_tokenizer_matches_data(other_tokenizer, prefix)


def test_missing_tokenizer_model_is_reported(tmp_path):
    with pytest.raises(OrdMoEError, match=r"SentencePiece model not found"):
        load_tokenizer(str(tmp_path / "nope.model"))


if __name__ == "__main__":  # a rank of test_gpt_datasets_on_two_gloo_ranks_agree
    _rank, _tiny, _store, _cache, _out = sys.argv[1:]
    _two_rank_worker(int(_rank), json.loads(_tiny), _store, _cache, _out)
