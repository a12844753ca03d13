"""Megatron-Core data files (.bin/.idx) and GPT datasets for the tiny built-in corpus.

``prepare_tiny_data(work_dir)`` runs corpus -> tokenizer -> .bin/.idx, re-using whatever is
already in ``work_dir`` and still matches (parameters and sha256 fingerprints), and
``build_gpt_datasets`` turns the files into megatron-core ``GPTDataset`` splits.

Layout of ``work_dir``::

    corpus/     train.jsonl valid.jsonl tasks_heldout.jsonl manifest.json
    tokenizer/  tiny_sp.model tokenizer_metadata.json training.json
    megatron/   train.{bin,idx,tokenizer.json} valid.{bin,idx,tokenizer.json} index_cache/
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from ordmoe_megatron.data import corpus as corpus_lib
from ordmoe_megatron.data.tokenizer import (
    load_tokenizer,
    tokenize_documents,
    tokenizer_fingerprint,
    train_sentencepiece,
)
from ordmoe_megatron.errors import OrdMoEError

# The .idx layout megatron-core's IndexedDataset reads (version 1, not multimodal):
#   magic(9) version<Q> dtype_code<B> sequence_count<Q> document_count<Q>
#   sequence_lengths int32[S] sequence_pointers int64[S] document_indices int64[D]
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_IDX_DTYPES = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}

TOKENIZER_SIDECAR_SUFFIX = ".tokenizer.json"
DATA_FORMAT_VERSION = 1
DEFAULT_VOCAB_SIZE = 2048


def _fix_hint(prefix: str) -> str:
    return (
        f"Re-create the pair with write_indexed_dataset(<jsonl>, tokenizer, '{prefix}'), or, for "
        "the built-in tiny data, call prepare_tiny_data(work_dir) again (it rebuilds bad files)."
    )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> type:
    """Smallest dtype megatron-core reads for token ids of this vocab (uint16 below 65500)."""
    return DType.optimal_dtype(vocab_size)


def write_indexed_dataset(jsonl_path: str, tokenizer, out_prefix: str) -> str:
    """Tokenize each ``{"text": ...}`` document (+ EOD) into ``<out_prefix>.bin/.idx``.

    Also writes ``<out_prefix>.tokenizer.json`` recording the tokenizer (model sha256, vocab
    size) and the source file's sha256, which ``check_tokenizer_matches_data`` compares against.
    Returns ``out_prefix``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    sidecar = out_prefix + TOKENIZER_SIDECAR_SUFFIX
    if os.path.exists(sidecar):
        os.remove(sidecar)  # the sidecar marks a complete pair: drop it before touching the pair
    bin_tmp, idx_tmp = out_prefix + ".bin.tmp", out_prefix + ".idx.tmp"
    dtype = token_dtype(tokenizer.vocab_size)
    num_documents = num_tokens = 0
    builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
    try:
        texts = (record["text"] for record in corpus_lib.read_jsonl(jsonl_path))
        for ids in tokenize_documents(tokenizer, texts):
            builder.add_document(ids, [len(ids)])
            num_documents += 1
            num_tokens += len(ids)
        builder.finalize(idx_tmp)
        os.replace(bin_tmp, out_prefix + ".bin")
        os.replace(idx_tmp, out_prefix + ".idx")
    finally:
        builder.data_file.close()
        for tmp in (bin_tmp, idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    record = {
        "format_version": DATA_FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eod": int(tokenizer.eod),
        "source": os.path.abspath(jsonl_path),
        "source_sha256": corpus_lib.sha256_file(jsonl_path),
        "num_documents": num_documents,
        "num_tokens": num_tokens,
        "dtype": numpy.dtype(dtype).name,
    }
    with open(sidecar, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return out_prefix


# ----------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------


def _read_exactly(f, nbytes: int, path: str, what: str, prefix: str, given: str = "") -> bytes:
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise OrdMoEError(
            given + f"Truncated index file {path}: {what} needs {nbytes} bytes, found {len(data)}. " + _fix_hint(prefix)
        )
    return data


def _read_index(prefix: str, given: str = "") -> dict:
    """Parse ``<prefix>.idx`` and check it is complete and self-consistent; ``given`` starts every
    refusal (``check_data_files``)."""
    path = prefix + ".idx"
    try:
        with open(path, "rb") as f:
            magic, version, code, n_seq, n_doc = _IDX_HEADER.unpack(
                _read_exactly(f, _IDX_HEADER.size, path, "the header", prefix, given)
            )
            if magic != _IDX_MAGIC or version != 1 or code not in _IDX_DTYPES:
                raise OrdMoEError(
                    given + f"{path} is not a megatron-core index file (magic={magic!r}, "
                    f"version={version}, dtype code={code}). " + _fix_hint(prefix)
                )
            lengths = numpy.frombuffer(
                _read_exactly(f, 4 * n_seq, path, f"{n_seq} sequence lengths", prefix, given), numpy.int32
            )
            pointers = numpy.frombuffer(
                _read_exactly(f, 8 * n_seq, path, f"{n_seq} sequence pointers", prefix, given), numpy.int64
            )
            doc_indices = numpy.frombuffer(
                _read_exactly(f, 8 * n_doc, path, f"{n_doc} document indices", prefix, given), numpy.int64
            )
            trailing = len(f.read())
    except OSError as err:
        raise OrdMoEError(given + f"Cannot read index file {path}: {err}. " + _fix_hint(prefix)) from err
    if trailing or n_doc < 1 or doc_indices[-1] != n_seq or (lengths < 0).any():
        raise OrdMoEError(
            given + f"Corrupt index file {path}: {n_seq} sequences, {n_doc} document boundaries, "
            f"{trailing} unexpected trailing bytes. " + _fix_hint(prefix)
        )
    return {
        "dtype": _IDX_DTYPES[code],
        "lengths": lengths,
        "pointers": pointers,
        "document_indices": doc_indices,
        "num_documents": int(n_doc - 1),
    }


def check_data_files(prefix: str, flag: Optional[str] = None) -> dict:
    """Check ``<prefix>.bin/.idx`` exist, are readable, complete and agree with each other.

    Raises ``OrdMoEError`` (missing, unreadable, truncated, inconsistent) naming the file and the
    fix, after ``'<flag> <prefix>: '`` when the flag that named the prefix is given. Returns a
    summary: num_documents, num_tokens, dtype.
    """
    given = f"{flag} {prefix}: " if flag else ""
    for path in (prefix + ".idx", prefix + ".bin"):
        if not os.path.isfile(path):
            raise OrdMoEError(
                given
                + f"Megatron data file missing: {path} (prefix '{prefix}' needs both .bin and .idx). "
                + _fix_hint(prefix)
            )
    index = _read_index(prefix, given)
    itemsize = numpy.dtype(index["dtype"]).itemsize
    num_tokens = int(index["lengths"].sum(dtype=numpy.int64))
    expected_bin_bytes = num_tokens * itemsize
    bin_path = prefix + ".bin"
    actual = os.path.getsize(bin_path)
    if actual != expected_bin_bytes:
        problem = "truncated" if actual < expected_bin_bytes else "longer than its index describes"
        raise OrdMoEError(
            given + f"Data file {bin_path} is {problem}: {actual} bytes, but {prefix}.idx describes "
            f"{num_tokens} tokens x {itemsize} bytes = {expected_bin_bytes}. " + _fix_hint(prefix)
        )
    # Sequences are stored back to back: each pointer is the sum of the lengths before it.
    lengths = index["lengths"].astype(numpy.int64)
    if not numpy.array_equal(index["pointers"], (numpy.cumsum(lengths) - lengths) * itemsize):
        raise OrdMoEError(
            given + f"Corrupt index file {prefix}.idx: sequence pointers do not match "
            "the sequence lengths. " + _fix_hint(prefix)
        )
    try:
        with open(bin_path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise OrdMoEError(given + f"Cannot read data file {bin_path}: {err}. " + _fix_hint(prefix)) from err
    return {
        "num_documents": index["num_documents"],
        "num_tokens": num_tokens,
        "dtype": numpy.dtype(index["dtype"]).name,
    }


SPLIT_NAMES = ("train", "validation", "test")


def _split_bounds(split: str) -> list:
    """Megatron's reading of ``--split`` ("969,30,1"): each split's share as (begin, end) of the
    documents, None for a split of weight 0 (megatron-core's parse_and_normalize_split)."""
    weights = [float(w) for w in re.findall(r"[.0-9]+", split)]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds, begin = [], 0.0
    for w in weights[:3]:
        end = begin + w / total
        bounds.append((begin, end) if w > 0 else None)
        begin = end
    return bounds


def check_split_sizes(prefix: str, split: str, seq_length: int) -> None:
    """Refuse a ``--split`` that leaves a split of the data without a document, or without one
    ``seq_length + 1``-token sample: megatron-core's GPTDataset would search for one forever."""
    if not re.fullmatch(r"\s*[.0-9]+(\s*,\s*[.0-9]+){0,2}\s*", split or "") or not sum(
        float(w) for w in re.findall(r"[.0-9]+", split)
    ):
        raise OrdMoEError(
            f"--split {split!r} must be up to three non-negative weights with a positive sum, "
            "e.g. 969,30,1 (train, validation, test)"
        )
    index = _read_index(prefix)
    docs = index["num_documents"]
    tokens_per_doc = (
        numpy.add.reduceat(index["lengths"].astype(numpy.int64), index["document_indices"][:-1])
        if docs
        else numpy.zeros(0, numpy.int64)
    )
    bounds = _split_bounds(split)
    for name, bound in zip(SPLIT_NAMES, bounds):
        if bound is None:
            continue
        begin, end = (int(round(b * docs)) for b in bound)
        tokens = int(tokens_per_doc[begin:end].sum())
        if end > begin and tokens >= seq_length + 1:
            continue
        need = next(n for n in range(max(docs, 1), 10**7) if int(round(bound[1] * n)) > int(round(bound[0] * n)))
        raise OrdMoEError(
            f"--split {split} gives the {name} split {end - begin} of the {docs} documents in {prefix} "
            f"({tokens} tokens; it needs at least one {seq_length + 1}-token sample): with this --split the data "
            f"need at least {need} documents (and enough tokens), or give the split its own file "
            "(--valid-data-path) or a --split with a larger share for it"
        )


def read_sidecar(prefix: str) -> Optional[dict]:
    """The tokenizer record written next to the data by ``write_indexed_dataset``, if any."""
    try:
        with open(prefix + TOKENIZER_SIDECAR_SUFFIX, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_tokenizer_matches_data(tokenizer, prefix: str) -> None:
    """Refuse (``OrdMoEError``) a ``tokenizer`` that is not the one ``<prefix>.bin/.idx`` was written with.

    Compares the tokenizer model sha256 / vocab size with ``<prefix>.tokenizer.json`` when it
    exists, and always checks every token id in the data is below the tokenizer's vocab size.
    """
    summary = check_data_files(prefix)
    vocab_size = int(tokenizer.vocab_size)
    recorded = read_sidecar(prefix)
    if recorded is not None:
        written_with = recorded.get("tokenizer") or {}
        given = tokenizer_fingerprint(tokenizer)
        both_hashed = written_with.get("sha256") and given["sha256"]
        if (both_hashed and written_with["sha256"] != given["sha256"]) or written_with.get("vocab_size") != given[
            "vocab_size"
        ]:
            raise OrdMoEError(
                f"Tokenizer mismatch for {prefix}.bin: it was written with tokenizer "
                f"{written_with} (recorded in {prefix}{TOKENIZER_SIDECAR_SUFFIX}), but the "
                f"tokenizer given is {given} ({getattr(tokenizer, 'path', '?')}). Load the "
                "tokenizer the data was written with, or re-write the data with this one "
                "(write_indexed_dataset / prepare_tiny_data)."
            )
    if summary["num_tokens"]:
        tokens = numpy.memmap(prefix + ".bin", dtype=summary["dtype"], mode="r")
        max_id = int(tokens.max())
        del tokens
        if max_id >= vocab_size:
            raise OrdMoEError(
                f"Tokenizer too small for {prefix}.bin: the data holds token id {max_id} but the "
                f"tokenizer ({getattr(tokenizer, 'path', '?')}) has vocab_size {vocab_size}. Use "
                "the tokenizer the data was written with, or re-write the data with this one."
            )


# ----------------------------------------------------------------------------------------------
# GPT datasets
# ----------------------------------------------------------------------------------------------


def build_gpt_datasets(
    data_prefix: str,
    tokenizer,
    seq_length: int,
    num_samples: Sequence[Optional[int]],
    seed: int = 1234,
    *,
    valid_prefix: Optional[str] = None,
    test_prefix: Optional[str] = None,
    split: str = "969,30,1",
    path_to_cache: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    **config_kwargs,
) -> Tuple:
    """(train, valid, test) megatron-core ``GPTDataset`` s (None for a split without data).

    Either one ``data_prefix`` divided by ``split`` (documents "train,valid,test" weights), or
    separate files: ``valid_prefix`` (and optionally ``test_prefix``) given, ``split`` unused.
    ``num_samples`` is the number of samples per split (None: one epoch). Works without
    torch.distributed and with it (any backend): rank 0 builds the index cache in
    ``path_to_cache`` (default ``<data dir>/index_cache``) first, the other ranks then load it,
    so call it on every rank. ``config_kwargs`` go to ``GPTDatasetConfig``.
    """
    prefixes = [p for p in (data_prefix, valid_prefix, test_prefix) if p]
    for prefix in prefixes:  # fail with our messages, not an assert deep inside megatron
        check_tokenizer_matches_data(tokenizer, prefix)

    if valid_prefix:
        per_split = [([data_prefix], None), ([valid_prefix], None), ([test_prefix], None) if test_prefix else None]
        blend_kwargs = {"blend_per_split": per_split}
    else:
        blend_kwargs = {"blend": ([data_prefix], None), "split": split}
    options = {
        "reset_position_ids": False,
        "reset_attention_mask": False,
        "eod_mask_loss": False,
        **config_kwargs,
    }
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=path_to_cache or os.path.join(os.path.dirname(os.path.abspath(data_prefix)), "index_cache"),
        **blend_kwargs,
        **options,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config)
    return tuple(builder.build())


# ----------------------------------------------------------------------------------------------
# The built-in tiny data, end to end
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(directory: str) -> Iterator[None]:
    """Serialise concurrent prepare_tiny_data calls (e.g. every rank calling it) on one dir."""
    os.makedirs(directory, exist_ok=True)
    # O_NOFOLLOW: a link planted under the lock's name is refused, never written through.
    fd = os.open(os.path.join(directory, ".prepare.lock"), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _prepare_tokenizer(
    corpus_dir: str, tok_dir: str, seed: int, vocab_size: int, corpus_fingerprint: str
) -> Tuple[str, bool]:
    """Train the tokenizer unless one trained on this corpus with these settings is there."""
    model_prefix = os.path.join(tok_dir, "tiny_sp")
    model_path = model_prefix + ".model"
    record_path = os.path.join(tok_dir, "training.json")
    wanted = {
        "corpus_sha256": corpus_fingerprint,
        "seed": seed,
        "vocab_size": vocab_size,
        "format_version": DATA_FORMAT_VERSION,
    }
    recorded = _read_json(record_path)
    if (
        recorded
        and os.path.isfile(model_path)
        and {k: recorded.get(k) for k in wanted} == wanted
        and recorded.get("model_sha256") == corpus_lib.sha256_file(model_path)
    ):
        return model_path, False
    train_sentencepiece(
        [os.path.join(corpus_dir, corpus_lib.TRAIN_FILE)], model_prefix, vocab_size=vocab_size, seed=seed
    )
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump({**wanted, "model_sha256": corpus_lib.sha256_file(model_path)}, f, indent=2)
    return model_path, True


def _data_is_current(prefix: str, jsonl_path: str, model_path: str) -> bool:
    recorded = read_sidecar(prefix)
    if not recorded or recorded.get("format_version") != DATA_FORMAT_VERSION:
        return False
    if recorded.get("tokenizer", {}).get("sha256") != corpus_lib.sha256_file(model_path):
        return False
    if recorded.get("source_sha256") != corpus_lib.sha256_file(jsonl_path):
        return False
    try:
        check_data_files(prefix)
    except (OSError, ValueError):
        return False
    return True


def prepare_tiny_data(work_dir: str, seed: int = 1234, vocab_size: int = DEFAULT_VOCAB_SIZE, **corpus_kwargs) -> dict:
    """Build (or re-use) the built-in tiny corpus, tokenizer and megatron data in ``work_dir``.

    Each stage is skipped when its outputs exist and their recorded parameters and sha256
    fingerprints still match, so a second call rewrites nothing. Safe to call from several
    processes at once (a file lock serialises them). ``corpus_kwargs`` are the size knobs of
    ``corpus.corpus_params``. Returns the paths (tokenizer_model, train_prefix, valid_prefix,
    heldout_tasks, ...) and ``rebuilt``, the stages that had to be (re)built.
    """
    work_dir = os.path.abspath(work_dir)
    corpus_dir = os.path.join(work_dir, "corpus")
    tok_dir = os.path.join(work_dir, "tokenizer")
    data_dir = os.path.join(work_dir, "megatron")
    rebuilt = []
    with _exclusive_lock(work_dir):
        params = corpus_lib.corpus_params(seed=seed, **corpus_kwargs)
        if not corpus_lib.corpus_is_current(corpus_dir, params):
            corpus_lib.build_corpus(corpus_dir, seed=seed, **corpus_kwargs)
            rebuilt.append("corpus")
        manifest = corpus_lib.load_manifest(corpus_dir)

        model_path, trained = _prepare_tokenizer(corpus_dir, tok_dir, seed, vocab_size, manifest["sha256"]["content"])
        if trained:
            rebuilt.append("tokenizer")

        tokenizer = None
        prefixes = {}
        splits = (("train", corpus_lib.TRAIN_FILE), ("valid", corpus_lib.VALID_FILE))
        for split, jsonl_name in splits:
            prefix = os.path.join(data_dir, split)
            jsonl_path = os.path.join(corpus_dir, jsonl_name)
            if not _data_is_current(prefix, jsonl_path, model_path):
                tokenizer = tokenizer or load_tokenizer(model_path)  # imports megatron: lazily
                write_indexed_dataset(jsonl_path, tokenizer, prefix)
                rebuilt.append(f"{split}_data")
            prefixes[split] = prefix

    return {
        "work_dir": work_dir,
        "corpus_dir": corpus_dir,
        "train_jsonl": os.path.join(corpus_dir, corpus_lib.TRAIN_FILE),
        "valid_jsonl": os.path.join(corpus_dir, corpus_lib.VALID_FILE),
        "heldout_tasks": os.path.join(corpus_dir, corpus_lib.HELDOUT_FILE),
        "manifest": os.path.join(corpus_dir, corpus_lib.MANIFEST_FILE),
        "tokenizer_model": model_path,
        "vocab_size": vocab_size,
        "train_prefix": prefixes["train"],
        "valid_prefix": prefixes["valid"],
        "data_cache": os.path.join(data_dir, "index_cache"),
        "corpus_sha256": manifest["sha256"]["content"],
        "rebuilt": rebuilt,
    }
