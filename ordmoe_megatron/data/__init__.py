"""Built-in tiny pretraining data (no download): corpus, tokenizer, megatron-core datasets.

Typical use::

    paths = prepare_tiny_data("runs/tiny_data")
    tokenizer = load_tokenizer(paths["tokenizer_model"])
    train, valid, _ = build_gpt_datasets(
        paths["train_prefix"], tokenizer, seq_length=256, num_samples=(10_000, 500, None),
        valid_prefix=paths["valid_prefix"],
    )

``documents`` reads evaluation documents for the tier report (token ids, text, data files).
"""

from ordmoe_megatron.data.corpus import build_corpus, exact_match, read_jsonl
from ordmoe_megatron.data.megatron_data import (
    build_gpt_datasets,
    check_data_files,
    check_split_sizes,
    check_tokenizer_matches_data,
    prepare_tiny_data,
    write_indexed_dataset,
)
from ordmoe_megatron.data.tokenizer import load_tokenizer, train_sentencepiece

__all__ = [
    "build_corpus",
    "build_gpt_datasets",
    "check_data_files",
    "check_split_sizes",
    "check_tokenizer_matches_data",
    "exact_match",
    "load_tokenizer",
    "prepare_tiny_data",
    "read_jsonl",
    "train_sentencepiece",
    "write_indexed_dataset",
]
