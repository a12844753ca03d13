"""Evaluation documents for the tier report: token-id files, plain text, Megatron data files.

A document longer than ``seq_length + 1`` tokens is cut into consecutive windows (each window's
first token is the previous window's last, so every token after the first is a target exactly
once; no context crosses a window boundary). ``micro_batches`` right-pads windows into batches
(padding: token 0, loss mask 0).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterable, Iterator, Optional

import torch

from ordmoe_megatron.data.megatron_data import build_gpt_datasets, check_data_files
from ordmoe_megatron.data.tokenizer import load_tokenizer
from ordmoe_megatron.errors import OrdMoEError

DOCUMENT_MODES = ("paragraphs", "lines")


class DocumentError(OrdMoEError):
    """Evaluation data that cannot be read or does not fit the model; the message names the file."""


class HFTokenizer:
    """A Hugging Face tokenizer with the megatron-core tokenizer surface the report needs
    (``tokenize``, ``eod``, ``vocab_size``); no special tokens are added."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # optional (the convert extra): only for HF tokenizers

        self.path = path
        self._tok = AutoTokenizer.from_pretrained(path)
        self.eod = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        # What megatron-core's datasets hash to name their index caches.
        self.unique_identifiers = {"class": "HFTokenizer", "path": os.path.abspath(path), "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_any_tokenizer(path: str):
    """SentencePiece model file (``load_tokenizer``) or Hugging Face tokenizer directory."""
    if not os.path.exists(path):
        raise DocumentError(f"--tokenizer-model {path} does not exist")
    try:
        if os.path.isdir(path):
            return HFTokenizer(path)
        return load_tokenizer(path)
    except OrdMoEError:
        raise
    except Exception as err:  # sentencepiece / transformers raise many types; name the file
        raise DocumentError(
            f"--tokenizer-model {path}: cannot load it as a SentencePiece model or a Hugging Face "
            f"tokenizer directory: {type(err).__name__}: {err}"
        ) from None


def read_token_ids(path: str) -> list[list[int]]:
    """Documents of a JSON-lines token file: ``{"tokens": [...]}`` or a plain list per line."""
    if not os.path.isfile(path):
        raise DocumentError(f"--token-ids {path}: no such file")
    documents = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DocumentError(f"--token-ids {path}, line {lineno}: not JSON ({err.msg})") from None
            ids = record.get("tokens") if isinstance(record, dict) else record
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
            ):
                raise DocumentError(
                    f'--token-ids {path}, line {lineno}: expected {{"tokens": [ids]}} or a list of '
                    "non-negative integer token ids"
                )
            documents.append(ids)
    if not documents:
        raise DocumentError(f"--token-ids {path}: no documents")
    return documents


def read_text_documents(path: str, mode: str) -> list[str]:
    if not os.path.isfile(path):
        raise DocumentError(f"--text-file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DocumentError(f"--text-file {path}: cannot read it as UTF-8 text: {err}") from None
    if mode == "lines":
        documents = [line for line in text.splitlines() if line.strip()]
    else:
        documents = [block.strip("\n") for block in re.split(r"\n[ \t\r\f\v]*\n", text) if block.strip()]
    if not documents:
        raise DocumentError(f"--text-file {path}: no documents (the file is empty or blank)")
    return documents


def document_windows(documents: Iterable[list[int]], seq_length: int) -> Iterator[list[int]]:
    """Windows of at most ``seq_length + 1`` tokens; consecutive windows of a document share one
    token, so every token after a document's first is a target exactly once. Documents of fewer
    than two tokens have no target and give no window."""
    for ids in documents:
        for start in range(0, len(ids) - 1, seq_length):
            yield ids[start : start + seq_length + 1]


def windows_to_samples(windows: Iterable[list[int]]) -> Iterator[dict]:
    for w in windows:
        n = len(w) - 1
        yield {"tokens": torch.tensor(w[:-1]), "labels": torch.tensor(w[1:]), "loss_mask": torch.ones(n)}


def dataset_samples(prefix: str, tokenizer, seq_length: int, max_sequences: int, seed: int) -> list[dict]:
    """The first ``max_sequences`` samples of one epoch of a GPTDataset over the whole file."""
    check_data_files(prefix, "--data-path")
    with tempfile.TemporaryDirectory(prefix="tier-report-index-") as cache:  # write nothing next to the data
        try:
            dataset, _, _ = build_gpt_datasets(
                prefix,
                tokenizer,
                seq_length,
                num_samples=(None, None, None),
                seed=seed,
                split="100,0,0",
                path_to_cache=cache,
                create_attention_mask=False,
            )
        except OrdMoEError:
            raise
        except (AssertionError, OSError, ValueError) as err:  # megatron-core's dataset builder
            raise DocumentError(f"--data-path {prefix}: megatron-core cannot build a dataset from it: {err}") from None
        if dataset is None or len(dataset) == 0:
            raise DocumentError(f"--data-path {prefix}: no {seq_length + 1}-token sample fits in the data")
        samples = []
        for i in range(min(max_sequences, len(dataset))):
            s = dataset[i]
            samples.append({k: torch.as_tensor(s[k]) for k in ("tokens", "labels", "loss_mask")})
    return samples


def load_samples(
    seq_length: int,
    vocab_size: int,
    max_sequences: int,
    seed: int = 1234,
    *,
    token_ids: Optional[str] = None,
    text_file: Optional[str] = None,
    data_path: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    documents: str = "paragraphs",
    append_eod: bool = True,
) -> tuple[list[dict], dict]:
    """The evaluation sequences (``tokens``, ``labels``, ``loss_mask``, 1-D each) of exactly one
    source, and a description of it."""
    if token_ids:
        described = {"source": "token-ids", "path": os.path.abspath(token_ids), "documents": "one per line"}
        docs = read_token_ids(token_ids)
    else:
        tokenizer = load_any_tokenizer(tokenizer_model)
        described = {"tokenizer_model": os.path.abspath(tokenizer_model)}
        if data_path:
            described.update(
                source="data-path",
                path=os.path.abspath(data_path),
                documents=f"GPTDataset samples (packed, shuffled with seed {seed})",
            )
            samples = dataset_samples(data_path, tokenizer, seq_length, max_sequences, seed)
            docs = None
        else:
            texts = read_text_documents(text_file, documents)
            eod = [tokenizer.eod] if append_eod and tokenizer.eod is not None else []
            docs = [tokenizer.tokenize(t) + eod for t in texts]
            described.update(
                source="text-file",
                path=os.path.abspath(text_file),
                documents=("separated by blank lines" if documents == "paragraphs" else "one per line")
                + (", end-of-document token appended" if eod else ""),
            )
    if docs is not None:
        described["num_documents"] = len(docs)
        windows = []
        for window in document_windows(docs, seq_length):
            windows.append(window)
            if len(windows) == max_sequences:
                break
        samples = list(windows_to_samples(windows))
    samples = [s for s in samples if s["loss_mask"].sum() > 0]
    if not samples:
        raise DocumentError(
            f"{described['source']} {described['path']}: no sequence with a target token "
            "(every document has fewer than two tokens)"
        )
    top = max(int(torch.cat([s["tokens"], s["labels"]]).max()) for s in samples)
    if top >= vocab_size:
        raise DocumentError(
            f"{described['source']} {described['path']}: token id {top} is outside the model's "
            f"vocabulary of {vocab_size}: the data was made with another tokenizer"
        )
    return samples, described


def micro_batches(samples: list[dict], micro_batch_size: int) -> Iterator[dict]:
    """Right-padded micro-batches (padding: token 0, loss mask 0), each as long as its longest."""
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start : start + micro_batch_size]
        length = max(len(s["tokens"]) for s in chunk)
        batch = {}
        for key, dtype in (("tokens", torch.long), ("labels", torch.long), ("loss_mask", torch.float32)):
            rows = torch.zeros(len(chunk), length, dtype=dtype)
            for i, s in enumerate(chunk):
                rows[i, : len(s[key])] = s[key].to(dtype)
            batch[key] = rows
        batch["position_ids"] = torch.arange(length).unsqueeze(0).expand(len(chunk), -1).contiguous()
        yield batch
