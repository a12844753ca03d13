"""SentencePiece tokenizer for the tiny corpus, loaded through ``megatron.core.tokenizers``.

Training choices, and why:

* BPE with ``byte_fallback``: any text encodes (unknown characters become byte tokens), and
  BPE trains in well under a second on the tiny corpus.
* ``split_digits``: every digit is its own token, so addition is learnable digit by digit.
* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``: text round-trips
  exactly, newlines and indentation included (NFKC would rewrite some characters).
* ``add_dummy_prefix=False``: a line is tokenized the same at the start of a document as after
  a newline, so an eval prompt tokenized on its own matches how it looked in training, and a
  decoded continuation keeps its leading space.
* The model is written through ``model_writer`` rather than ``model_prefix`` so the output
  path is not baked into the model file: the same corpus and seed give byte-identical models.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizer

from ordmoe_megatron.errors import OrdMoEError

# Fixed special-token ids (SentencePiece's defaults leave pad undefined; GPTDataset pads with it).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
METADATA_FILE = "tokenizer_metadata.json"  # the name megatron.core.tokenizers looks for
MEGATRON_METADATA = {"library": "sentencepiece", "model_type": "gpt"}


def iter_training_lines(text_files: Sequence[str]) -> Iterator[str]:
    """Non-blank lines of the given files; ``.jsonl`` files contribute their ``text`` fields."""
    for path in text_files:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                if not raw.strip():
                    continue
                texts = [json.loads(raw)["text"]] if path.endswith(".jsonl") else [raw]
                for text in texts:
                    for line in text.split("\n"):
                        if line.strip():
                            yield line


def train_sentencepiece(
    text_files: Sequence[str],
    out_prefix: str,
    vocab_size: int = 2048,
    seed: int = 1234,
    model_type: str = "bpe",
    input_sentence_size: int = 200_000,
    num_threads: int = 2,
) -> str:
    """Train a SentencePiece model on ``text_files``; write ``<out_prefix>.model``; return its path.

    Also writes ``tokenizer_metadata.json`` next to it, so plain
    ``MegatronTokenizer.from_pretrained(<model path>)`` works too.
    """
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Seeds the sampling of at most input_sentence_size lines (and any other randomness).
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_training_lines(text_files),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        minloglevel=2,  # quiet: the trainer logs every merge otherwise
    )
    model_path = out_prefix + ".model"
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)
    with open(os.path.join(out_dir, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump({**MEGATRON_METADATA, "chat_template": None}, f)
    return model_path


def load_tokenizer(model_path: str):
    """Load a SentencePiece model as a megatron-core tokenizer.

    Returns ``megatron.core.tokenizers`` ' GPT text tokenizer, which provides
    ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``eod`` (the ``</s>`` id),
    ``pad`` and ``vocab_size``; it is what ``GPTDatasetConfig(tokenizer=...)`` expects.
    """
    if not os.path.isfile(model_path):
        raise OrdMoEError(
            f"SentencePiece model not found: {model_path}. Train one with "
            "train_sentencepiece(...) or run prepare_tiny_data(work_dir)."
        )
    # Prefer the metadata file written at training time; fall back to the same dict so that a
    # bare .model file (copied without its directory) still loads.
    metadata_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), METADATA_FILE)
    metadata = metadata_path if os.path.isfile(metadata_path) else dict(MEGATRON_METADATA)
    return MegatronTokenizer.from_pretrained(tokenizer_path=model_path, metadata_path=metadata)


def tokenizer_model_path(tokenizer) -> Optional[str]:
    """The model file behind a tokenizer from :func:`load_tokenizer` (kept in ``.path``)."""
    path = getattr(tokenizer, "path", None)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for data compatibility: model sha256 (None if the tokenizer
    has no model file) and vocab size."""
    path, sha256 = tokenizer_model_path(tokenizer), None
    if path:
        with open(path, "rb") as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()
    return {"sha256": sha256, "vocab_size": int(tokenizer.vocab_size)}


def tokenize_documents(tokenizer, texts: Iterable[str]) -> Iterator[list]:
    """Token ids of each text followed by the end-of-document id, as the .bin files store them."""
    eod = tokenizer.eod
    for text in texts:
        yield tokenizer.tokenize(text) + [eod]
