"""Tier report: how each OrdMoE tier path of a checkpoint does on evaluation data.

For any Megatron checkpoint (converted from Hugging Face by ``tools/hf_to_mcore.py``, or saved by
``ordmoe-pretrain``; trained with any number of tiers, or none), the report builds an
``OrdMoEGPTModel`` with ``C`` tier paths on top of the checkpoint's plain weights (OrdMoE adds no
parameters), runs the evaluation data through all paths at once and reports, per path:

- the mean target log-likelihood and the perplexity,
- the tier-ordering accuracy: the fraction of sequences with ``L_1 > L_2 > ... > L_C``,
- the per-tier expert load: tokens per expert per path in every MoE layer, and max/mean.

Conventions (also written into the JSON):

- A *sequence* is one evaluation window of at most ``seq_length`` targets. Its log-likelihood
  ``L_j`` is the mean over its target tokens of ``log p_j(y_t | y_<t)`` (method page, Eq. 7);
  ``mean_logprob`` is the plain mean of ``L_j`` over sequences and ``perplexity`` is
  ``exp(-mean_logprob)``, as ``evaluate_paths`` and the training logs compute them.
  ``token_mean_logprob`` / ``token_perplexity`` pool all target tokens instead.
- Log-likelihoods are the model's own per-token loss, over its (padded) output vocabulary,
  exactly what Megatron's LM loss uses; converted Hugging Face models are not padded.
- Expert load counts each real (non-padding) token once for every expert it is routed to on
  that path, so a path's row sums to tokens x tier width. MoE layers before the first
  tier-routed layer run once for all paths (the lazy fan-out): their rows are the same.

Data sources (exactly one):

- ``--token-ids F``: JSON lines, each ``{"tokens": [...]}`` or a plain list: one document each.
- ``--text-file F --tokenizer-model M``: documents separated by blank lines
  (``--documents paragraphs``, the default) or one per line (``--documents lines``), each
  tokenized and followed by the end-of-document token, as Megatron's ``.bin`` files hold them.
  ``M`` is a SentencePiece ``.model`` file or a Hugging Face tokenizer directory.
- ``--data-path PREFIX --tokenizer-model M``: a Megatron ``.bin/.idx`` pair, read through
  megatron-core's ``GPTDataset`` (documents packed into ``seq_length + 1`` token samples,
  shuffled with ``--seed``) exactly as training reads it.

A document of the first two sources longer than ``seq_length + 1`` tokens is cut into
consecutive windows (each window's first token is the previous window's last, so every token
after the first is a target exactly once; no context crosses a window boundary).

Runs in one process (gloo on CPU through the CPU emulation, or one GPU). Nothing is
overwritten without ``--force``; the checkpoint, the data and the flags are checked before the
model is built.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ordmoe_megatron.config import RANKINGS, OrdMoEConfig
from ordmoe_megatron.tiers import GROUPINGS, format_tiers

DEFAULT_MAX_SEQ_LENGTH = 1024
DOCUMENT_MODES = ("paragraphs", "lines")
CONVENTION = (
    "mean_logprob: per sequence (one evaluation window), the mean log-likelihood of its target "
    "tokens; then the plain mean over sequences. perplexity = exp(-mean_logprob). "
    "token_mean_logprob pools all target tokens; token_perplexity = exp(-token_mean_logprob). "
    "tier_order_acc: fraction of sequences whose per-sequence log-likelihoods satisfy "
    "L1 > L2 > ... > LC (null for one path). expert_load.tokens_per_expert[path][expert]: real "
    "tokens routed to the expert on that path (a token counts once per expert it uses)."
)


class ReportError(ValueError):
    """A bad input: missing or corrupt checkpoint or data, impossible flags, existing output."""


# ----------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tier_report", description=__doc__.split("\n\n")[0],
        epilog="Example: python tools/tier_report.py --load ckpt --token-ids eval.jsonl --out-json r.json --out-png r.png",
    )
    parser.add_argument("--load", required=True,
                        help="Checkpoint directory (the one holding latest_checkpointed_iteration.txt): converted by "
                             "tools/hf_to_mcore.py or saved by ordmoe-pretrain --save.")
    data = parser.add_argument_group("evaluation data (give exactly one source)")
    data.add_argument("--token-ids", default=None,
                      help="JSON lines of token ids, one document per line: {\"tokens\": [...]} or a plain list.")
    data.add_argument("--text-file", default=None,
                      help="Plain text, tokenized with --tokenizer-model (see --documents).")
    data.add_argument("--data-path", default=None, help="Megatron .bin/.idx prefix (needs --tokenizer-model).")
    data.add_argument("--tokenizer-model", default=None,
                      help="SentencePiece .model file or Hugging Face tokenizer directory (the checkpoint's tokenizer).")
    data.add_argument("--documents", choices=DOCUMENT_MODES, default="paragraphs",
                      help="--text-file: documents separated by blank lines (paragraphs, default) or one per line.")
    data.add_argument("--no-eod", dest="append_eod", action="store_false",
                      help="--text-file: do not append the end-of-document token to each document.")
    run = parser.add_argument_group("evaluation")
    run.add_argument("--seq-length", type=int, default=None,
                     help=f"Targets per sequence (default: the checkpoint's seq_length, at most {DEFAULT_MAX_SEQ_LENGTH}).")
    run.add_argument("--max-sequences", type=int, default=256, help="Evaluate at most this many sequences (windows).")
    run.add_argument("--micro-batch-size", type=int, default=4, help="Sequences per forward (times C paths).")
    run.add_argument("--seed", type=int, default=1234, help="GPTDataset shuffle and the random grouping's draws.")
    tiers = parser.add_argument_group("OrdMoE tier paths (OrdMoE adds no parameters: any MoE checkpoint works)")
    tiers.add_argument("--ordmoe-num-tiers", type=int, default=3, help="Tier paths C; 1 is the plain top-K model.")
    tiers.add_argument("--ordmoe-grouping", choices=GROUPINGS, default="uniform", help="How tiers are cut from the ranks.")
    tiers.add_argument("--ordmoe-tier-ranks", default=None,
                       help="Explicit tier ranks with --ordmoe-grouping explicit, e.g. '1-6,25-27,59-61'.")
    tiers.add_argument("--ordmoe-layer-scope", default=None,
                       help="1-based layers whose MoE routes paths by tier: 'all' (default), '1-4', '7,14,21,28'.")
    tiers.add_argument("--ordmoe-ranking", choices=RANKINGS, default="token",
                       help="Rank experts per token, or by the running mean scores saved in the checkpoint (average).")
    out = parser.add_argument_group("outputs")
    out.add_argument("--out-json", default=None, help="Write the report as JSON here.")
    out.add_argument("--out-png", default=None, help="Write per-path log-likelihood/perplexity bars and the "
                                                     "per-tier expert-load heatmap here.")
    out.add_argument("--force", action="store_true", help="Replace existing --out-json/--out-png files.")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ReportError as err:
        parser.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations and outputs (cheap, before anything is read)."""
    sources = [name for name in ("token_ids", "text_file", "data_path") if getattr(args, name)]
    if len(sources) != 1:
        raise ReportError("give exactly one evaluation data source: --token-ids F, --text-file F --tokenizer-model M, "
                          f"or --data-path PREFIX --tokenizer-model M (got {len(sources)})")
    if sources[0] in ("text_file", "data_path") and not args.tokenizer_model:
        raise ReportError(f"--{sources[0].replace('_', '-')} needs --tokenizer-model (the checkpoint's tokenizer)")
    for name in ("max_sequences", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise ReportError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.seq_length is not None and args.seq_length < 1:
        raise ReportError(f"--seq-length={args.seq_length} must be at least 1")
    check_outputs([args.out_json, args.out_png], args.force)


def check_outputs(paths: Iterable[Optional[str]], force: bool) -> None:
    paths = [p for p in paths if p]
    if len({os.path.abspath(p) for p in paths}) != len(paths):
        raise ReportError("--out-json and --out-png name the same file")
    for path in paths:
        if os.path.isdir(path):
            raise ReportError(f"output {path} is a directory")
        if os.path.lexists(path) and not force:
            raise ReportError(f"output {path} already exists; pass --force to replace it")
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ReportError(f"output {path}: {parent} is not a directory")


def ordmoe_config_from_args(args: argparse.Namespace) -> OrdMoEConfig:
    try:
        return OrdMoEConfig(num_tiers=args.ordmoe_num_tiers, grouping=args.ordmoe_grouping,
                            tier_ranks=args.ordmoe_tier_ranks, layer_scope=args.ordmoe_layer_scope,
                            ranking=args.ordmoe_ranking)
    except ValueError as err:
        raise ReportError(str(err)) from None


# ----------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------
def inspect_checkpoint(root: str) -> dict:
    """Check a checkpoint without loading its weights: the tracker, the iteration directory, the
    stored files against the metadata (a truncated or missing file is named), the model flags.
    Returns ``{"root", "iteration", "dir", "kind", "flags", "tensors", "hf_model_type"}``."""
    from ordmoe_megatron.checkpointing import (
        CheckpointError,
        checkpoint_dir,
        checkpoint_model_flags,
        latest_iteration,
        read_run,
    )
    from ordmoe_megatron.convert import ConversionError
    from ordmoe_megatron.convert.mcore_io import read_hf_metadata, read_tensor_metadata
    from ordmoe_megatron.model_flags import normalize_flags, padded_vocab_size

    if not os.path.isdir(root):
        raise ReportError(f"--load {root}: no such checkpoint directory")
    try:
        iteration = latest_iteration(root)
        path = checkpoint_dir(root, iteration)
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise CheckpointError(f"{path} is missing or incomplete (no metadata.json); the save may have been "
                                  "interrupted: use an earlier checkpoint")
        tensors = read_tensor_metadata(path)
        flags = checkpoint_model_flags(root)
    except (CheckpointError, ConversionError, OSError, ValueError) as err:
        raise ReportError(f"--load {root}: {err}") from None
    if flags is None:
        raise ReportError(f"--load {root}: the checkpoint records no model flags (model_args.json next to a "
                          "converted checkpoint, or model_flags in the run.json that ordmoe-pretrain writes)")
    try:
        flags = normalize_flags(flags)
        rows = padded_vocab_size(flags)
    except (ValueError, KeyError, TypeError) as err:
        raise ReportError(f"--load {root}: unusable model flags: {err}") from None
    if not flags.get("num_experts"):
        raise ReportError(f"--load {root}: not a MoE model (no num_experts in its model flags); a tier report "
                          "needs routed experts")
    embedding = tensors.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ReportError(f"--load {root}: {path} holds no embedding.word_embeddings.weight: not a GPT checkpoint")
    if flags["padded_vocab_size"] is None:
        rows = int(embedding.size[0])  # a training run's padding depends on its TP size
        flags = dict(flags, padded_vocab_size=rows)
    if int(embedding.size[0]) != rows:
        raise ReportError(f"--load {root}: the embedding has {embedding.size[0]} rows but the model flags imply "
                          f"{rows}: the model flags do not describe this checkpoint")
    kind = "converted" if iteration is None else "trained"  # converters write 'release'; training iter_N
    meta = read_hf_metadata(root)
    return {
        "root": root, "iteration": iteration, "dir": path, "flags": flags, "tensors": tensors, "kind": kind,
        "hf_model_type": (meta or {}).get("model_type"),
        # the OrdMoE settings ordmoe-pretrain trained with (None: converted, or --no-ordmoe)
        "trained_ordmoe": read_run(root).get("ordmoe") if kind == "trained" else None,
    }


def resolve_seq_length(requested: Optional[int], flags: dict) -> int:
    max_pos = flags.get("max_position_embeddings") or flags.get("seq_length")
    seq = requested or min(flags.get("seq_length") or max_pos or DEFAULT_MAX_SEQ_LENGTH, DEFAULT_MAX_SEQ_LENGTH)
    if flags.get("position_embedding_type") == "learned_absolute" and max_pos and seq > max_pos:
        raise ReportError(f"--seq-length={seq} exceeds the model's {max_pos} learned positions "
                          "(max_position_embeddings); use at most that")
    return seq


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class HFTokenizer:
    """A Hugging Face tokenizer with the megatron-core tokenizer surface the report needs
    (``tokenize``, ``eod``, ``vocab_size``); no special tokens are added."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        self._tok = AutoTokenizer.from_pretrained(path)
        self.eod = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        # What megatron-core's datasets hash to name their index caches.
        self.unique_identifiers = {"class": "HFTokenizer", "path": os.path.abspath(path), "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)


def load_any_tokenizer(path: str):
    """SentencePiece model file (``load_tokenizer``) or Hugging Face tokenizer directory."""
    if not os.path.exists(path):
        raise ReportError(f"--tokenizer-model {path} does not exist")
    try:
        if os.path.isdir(path):
            return HFTokenizer(path)
        from ordmoe_megatron.data import load_tokenizer

        return load_tokenizer(path)
    except ReportError:
        raise
    except Exception as err:  # sentencepiece / transformers raise many types; name the file
        raise ReportError(f"--tokenizer-model {path}: cannot load it as a SentencePiece model or a Hugging Face "
                          f"tokenizer directory: {type(err).__name__}: {err}") from None


def read_token_ids(path: str) -> list[list[int]]:
    """Documents of a JSON-lines token file: ``{"tokens": [...]}`` or a plain list per line."""
    if not os.path.isfile(path):
        raise ReportError(f"--token-ids {path}: no such file")
    documents = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReportError(f"--token-ids {path}, line {lineno}: not JSON ({err.msg})") from None
            ids = record.get("tokens") if isinstance(record, dict) else record
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in ids):
                raise ReportError(f"--token-ids {path}, line {lineno}: expected {{\"tokens\": [ids]}} or a list of "
                                  "non-negative integer token ids")
            documents.append(ids)
    if not documents:
        raise ReportError(f"--token-ids {path}: no documents")
    return documents


def read_text_documents(path: str, mode: str) -> list[str]:
    if not os.path.isfile(path):
        raise ReportError(f"--text-file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"--text-file {path}: cannot read it as UTF-8 text: {err}") from None
    if mode == "lines":
        documents = [line for line in text.splitlines() if line.strip()]
    else:
        documents = [block.strip("\n") for block in re.split(r"\n[ \t\r\f\v]*\n", text) if block.strip()]
    if not documents:
        raise ReportError(f"--text-file {path}: no documents (the file is empty or blank)")
    return documents


def document_windows(documents: Iterable[list[int]], seq_length: int) -> Iterator[list[int]]:
    """Windows of at most ``seq_length + 1`` tokens; consecutive windows of a document share one
    token, so every token after a document's first is a target exactly once. Documents of fewer
    than two tokens have no target and give no window."""
    for ids in documents:
        for start in range(0, len(ids) - 1, seq_length):
            yield ids[start:start + seq_length + 1]


def windows_to_samples(windows: Iterable[list[int]]) -> Iterator[dict]:
    for w in windows:
        n = len(w) - 1
        yield {"tokens": torch.tensor(w[:-1]), "labels": torch.tensor(w[1:]), "loss_mask": torch.ones(n)}


def dataset_samples(prefix: str, tokenizer, seq_length: int, max_sequences: int, seed: int) -> list[dict]:
    """The first ``max_sequences`` samples of one epoch of a GPTDataset over the whole file."""
    from ordmoe_megatron.data import build_gpt_datasets, check_data_files

    try:
        check_data_files(prefix)
    except (FileNotFoundError, ValueError) as err:
        raise ReportError(f"--data-path {prefix}: {err}") from None
    with tempfile.TemporaryDirectory(prefix="tier-report-index-") as cache:  # write nothing next to the data
        try:
            dataset, _, _ = build_gpt_datasets(prefix, tokenizer, seq_length, num_samples=(None, None, None), seed=seed,
                                               split="100,0,0", path_to_cache=cache, create_attention_mask=False)
        except (FileNotFoundError, ValueError) as err:
            raise ReportError(f"--data-path {prefix}: {err}") from None
        if dataset is None or len(dataset) == 0:
            raise ReportError(f"--data-path {prefix}: no {seq_length + 1}-token sample fits in the data")
        samples = []
        for i in range(min(max_sequences, len(dataset))):
            s = dataset[i]
            samples.append({k: torch.as_tensor(s[k]) for k in ("tokens", "labels", "loss_mask")})
    return samples


def load_samples(args: argparse.Namespace, seq_length: int, vocab_size: int) -> tuple[list[dict], dict]:
    """The evaluation sequences (``tokens``, ``labels``, ``loss_mask``, 1-D each) and a description."""
    if args.token_ids:
        described = {"source": "token-ids", "path": os.path.abspath(args.token_ids),
                     "documents": "one per line"}
        documents = read_token_ids(args.token_ids)
    else:
        tokenizer = load_any_tokenizer(args.tokenizer_model)
        described = {"tokenizer_model": os.path.abspath(args.tokenizer_model)}
        if args.data_path:
            described.update(source="data-path", path=os.path.abspath(args.data_path),
                             documents=f"GPTDataset samples (packed, shuffled with seed {args.seed})")
            samples = dataset_samples(args.data_path, tokenizer, seq_length, args.max_sequences, args.seed)
            documents = None
        else:
            texts = read_text_documents(args.text_file, args.documents)
            eod = [tokenizer.eod] if args.append_eod and tokenizer.eod is not None else []
            documents = [tokenizer.tokenize(t) + eod for t in texts]
            described.update(source="text-file", path=os.path.abspath(args.text_file),
                             documents=("separated by blank lines" if args.documents == "paragraphs" else "one per line")
                             + (", end-of-document token appended" if eod else ""))
    if documents is not None:
        described["num_documents"] = len(documents)
        samples = []
        for window in document_windows(documents, seq_length):
            samples.append(window)
            if len(samples) == args.max_sequences:
                break
        samples = list(windows_to_samples(samples))
    samples = [s for s in samples if s["loss_mask"].sum() > 0]
    if not samples:
        raise ReportError(f"{described['source']} {described['path']}: no sequence with a target token "
                          "(every document has fewer than two tokens)")
    top = max(int(torch.cat([s["tokens"], s["labels"]]).max()) for s in samples)
    if top >= vocab_size:
        raise ReportError(f"{described['source']} {described['path']}: token id {top} is outside the model's "
                          f"vocabulary of {vocab_size}: the data was made with another tokenizer")
    return samples, described


def micro_batches(samples: list[dict], micro_batch_size: int) -> Iterator[dict]:
    """Right-padded micro-batches (padding: token 0, loss mask 0), each as long as its longest."""
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        length = max(len(s["tokens"]) for s in chunk)
        batch = {}
        for key, dtype in (("tokens", torch.long), ("labels", torch.long), ("loss_mask", torch.float32)):
            rows = torch.zeros(len(chunk), length, dtype=dtype)
            for i, s in enumerate(chunk):
                rows[i, :len(s[key])] = s[key].to(dtype)
            batch[key] = rows
        batch["position_ids"] = torch.arange(length).unsqueeze(0).expand(len(chunk), -1).contiguous()
        yield batch


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def init_single_process(seed: int) -> None:
    """One process: gloo (CPU, with the CPU emulation) or NCCL (one GPU), all parallel sizes 1."""
    from ordmoe_megatron.pretrain import init_parallel

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise ReportError("the tier report runs in one process (world size 1); do not start it under torchrun")
    init_parallel(seed)
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() \
            * parallel_state.get_expert_model_parallel_world_size() != 1:
        raise ReportError("the tier report needs Megatron's parallel state with all sizes 1")


def report_config(flags: dict, ordmoe: OrdMoEConfig):
    """The model's ``TransformerConfig`` (fp32, no dropout); refuses tier settings the model
    cannot honour (a layer scope without MoE layers, ...). Cheap: builds no weights."""
    from ordmoe_megatron import cpu_emulation
    from ordmoe_megatron.model import moe_layer_numbers
    from ordmoe_megatron.model_flags import transformer_config_from_flags

    try:
        config = transformer_config_from_flags(
            flags, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
            perform_initialization=False, params_dtype=torch.float32, moe_token_dispatcher_type="alltoall",
            **cpu_emulation.config_overrides(),
        )
        ordmoe.validate_for_model(config, moe_layer_numbers(config))
    except (ValueError, AssertionError) as err:
        raise ReportError(str(err)) from None
    return config


def build_report_model(flags: dict, config, ordmoe: OrdMoEConfig):
    """``OrdMoEGPTModel`` for the checkpoint's flags, in eval mode, weights not loaded yet."""
    from ordmoe_megatron.model import OrdMoEGPTModel
    from ordmoe_megatron.model_flags import gpt_model_from_flags

    model = gpt_model_from_flags(flags, config, model_class=OrdMoEGPTModel, ordmoe=ordmoe,
                                 pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model.eval()


def load_weights(model, info: dict) -> None:
    from ordmoe_megatron.checkpointing import CheckpointError, load_checkpoint

    try:
        load_checkpoint(info["root"], [model], optimizer=None, load_rng=False)
    except CheckpointError as err:
        raise ReportError(f"--load {info['root']}: {err}") from None


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_tiers(model, batches: Iterable[dict]) -> dict:
    """Run every micro-batch through all of ``model``'s paths (an ``OrdMoEGPTModel`` in eval
    mode, single process); return per-path sums and the per-layer expert load.

    Returns ``{"sequences", "tokens", "logprob_sum" [C], "nll_sum" [C], "order_correct",
    "load": {layer: [C, n] tensor}, "tier_routed": {layer: bool}}``.
    """
    from ordmoe_megatron.loss import sequence_logprobs, tier_order_correct

    paths = model.num_paths
    device = next(model.parameters()).device
    routers = model.tier_routers()
    load = {r.layer_number: torch.zeros(paths, r.config.num_moe_experts, dtype=torch.float64) for r in routers}
    current = {}

    def count(router, _inputs, output):
        routing_map = output[1]
        mask = current["mask"]  # [s, b]: real tokens
        seq, batch = mask.shape
        stacked = routing_map.shape[0] // seq
        per_row = routing_map.view(seq, stacked // batch, batch, -1).to(torch.float64) * mask[:, None, :, None]
        per_path = per_row.sum((0, 2)).cpu()  # [paths routed here, n]
        load[router.layer_number] += per_path.expand(paths, -1) if per_path.shape[0] == 1 else per_path

    hooks = [r.register_forward_hook(count) for r in routers]
    sums = {"sequences": 0, "tokens": 0.0, "logprob_sum": torch.zeros(paths, dtype=torch.float64),
            "nll_sum": torch.zeros(paths, dtype=torch.float64), "order_correct": 0.0}
    try:
        for r in routers:
            r.tier_load = None
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch["loss_mask"]
            current["mask"] = mask.t().to(torch.float64)
            b, s = mask.shape
            nll = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            nll = nll.float().view(paths, b, s)
            per_seq = sequence_logprobs(nll, mask).double()  # [C, b]
            sums["sequences"] += b
            sums["tokens"] += float(mask.sum())
            sums["logprob_sum"] += per_seq.sum(1).cpu()
            sums["nll_sum"] += (nll.double() * mask.double()).sum((1, 2)).cpu()
            sums["order_correct"] += float(tier_order_correct(per_seq).sum())
    finally:
        for h in hooks:
            h.remove()
        for r in routers:
            r.tier_load = None
    sums["load"] = load
    sums["tier_routed"] = {r.layer_number: r.tier_routing_active for r in routers}
    return sums


def summarize(sums: dict, ordmoe: OrdMoEConfig, num_experts: int, topk: int) -> dict:
    """Per-path log-likelihoods, perplexities, tier-ordering accuracy and load statistics."""
    paths = len(sums["logprob_sum"])
    tiers = ordmoe.tiers(num_experts, topk)
    rows = []
    for j in range(paths):
        mean_lp = float(sums["logprob_sum"][j]) / sums["sequences"]
        token_lp = -float(sums["nll_sum"][j]) / sums["tokens"]
        rows.append({"path": j + 1, "tier_ranks": format_tiers([tiers[j]]), "mean_logprob": mean_lp,
                     "perplexity": _exp(-mean_lp), "token_mean_logprob": token_lp, "token_perplexity": _exp(-token_lp)})
    layers = []
    for layer in sorted(sums["load"]):
        counts = sums["load"][layer]
        mean = counts.mean(-1).clamp(min=1e-12)
        layers.append({"layer": layer, "tier_routed": bool(sums["tier_routed"][layer]),
                       "tokens_per_expert": [[int(round(v)) for v in row.tolist()] for row in counts],
                       "max_over_mean": (counts.max(-1).values / mean).tolist(),
                       "min_over_mean": (counts.min(-1).values / mean).tolist()})
    per_path = [sum(l["max_over_mean"][j] for l in layers) / len(layers) for j in range(paths)] if layers else []
    for j, row in enumerate(rows):
        row["load_max_over_mean"] = per_path[j] if per_path else None
    return {
        "paths": rows,
        "tier_order_acc": sums["order_correct"] / sums["sequences"] if paths > 1 else None,
        "expert_load": {"num_experts": num_experts, "max_over_mean": per_path, "layers": layers},
    }


def describe_tiers(ordmoe: OrdMoEConfig, flags: dict) -> str:
    tiers = format_tiers(ordmoe.tiers(flags["num_experts"], flags["moe_router_topk"]))
    return (f"{ordmoe.num_tiers} tier path(s) ({ordmoe.grouping}: ranks {tiers} of {flags['num_experts']} experts), "
            f"ranking {ordmoe.ranking}, layers {ordmoe.layer_scope or 'all'}")


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def make_report(args: argparse.Namespace, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Check everything, build and load the model, evaluate; the report as a dict."""
    start = time.perf_counter()
    check_args(args)
    ordmoe = ordmoe_config_from_args(args)
    info = inspect_checkpoint(args.load)
    flags = info["flags"]
    config = report_config(flags, ordmoe)  # C x K > n, layer scope, ...: before any work
    if ordmoe.ranking == "average" and not any(k.endswith("router.score_sum") for k in info["tensors"]):
        raise ReportError(f"--ordmoe-ranking average ranks by the running mean scores a checkpoint trained with "
                          f"--ordmoe-ranking average saves; {args.load} has none: use --ordmoe-ranking token")
    seq_length = resolve_seq_length(args.seq_length, flags)
    samples, data = load_samples(args, seq_length, flags["vocab_size"] or flags["padded_vocab_size"])
    init_single_process(args.seed)
    model = build_report_model(flags, config, ordmoe)
    load_weights(model, info)
    tag = "release" if info["iteration"] is None else f"iteration {info['iteration']}"
    log(f"tier report: {args.load} ({info['kind']}, {tag}); {len(samples)} sequences of at most {seq_length} "
        f"targets; {describe_tiers(ordmoe, flags)}")
    # Random grouping draws from the default generator: the same draws for the same seed.
    torch.manual_seed(args.seed)
    sums = evaluate_tiers(model, micro_batches(samples, args.micro_batch_size))
    report = {
        "checkpoint": {"load": os.path.abspath(args.load), "kind": info["kind"],
                       "iteration": info["iteration"] if info["iteration"] is not None else "release",
                       "hf_model_type": info["hf_model_type"], "trained_ordmoe": info["trained_ordmoe"],
                       "num_experts": flags["num_experts"],
                       "moe_router_topk": flags["moe_router_topk"], "num_layers": flags["num_layers"]},
        "data": {**data, "seq_length": seq_length, "sequences": sums["sequences"],
                 "target_tokens": int(sums["tokens"])},
        "ordmoe": {"num_tiers": ordmoe.num_tiers, "grouping": ordmoe.grouping,
                   "tier_ranks": ordmoe.tiers(flags["num_experts"], flags["moe_router_topk"]),
                   "layer_scope": ordmoe.layer_scope or "all", "ranking": ordmoe.ranking},
        "convention": CONVENTION,
        **summarize(sums, ordmoe, flags["num_experts"], flags["moe_router_topk"]),
    }
    report["seconds"] = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    lines = ["path | tier ranks | mean logprob | perplexity | token ppl | load max/mean", "--- | --- | --- | --- | --- | ---"]
    for r in report["paths"]:
        load = "-" if r["load_max_over_mean"] is None else f"{r['load_max_over_mean']:.2f}"
        lines.append(f"{r['path']} | {r['tier_ranks']} | {r['mean_logprob']:.4f} | {r['perplexity']:.3f} | "
                     f"{r['token_perplexity']:.3f} | {load}")
    acc = report["tier_order_acc"]
    d = report["data"]
    lines.append(f"tier-ordering accuracy: {'- (one path)' if acc is None else f'{acc:.3f}'} over {d['sequences']} "
                 f"sequences, {d['target_tokens']} target tokens")
    return "\n".join(lines)


def plot_report(report: dict, png_path: str) -> str:
    """Per-path log-likelihood and perplexity bars, per-layer max/mean load, and the per-tier
    expert-load heatmap (rows: layer x path; colour: tokens / mean tokens per expert)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, layers = report["paths"], report["expert_load"]["layers"]
    paths = len(rows)
    labels = [f"path {r['path']}\n(ranks {r['tier_ranks']})" for r in rows]
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, paths))
    heat = np.array([np.asarray(l["tokens_per_expert"][j], dtype=float) / max(np.mean(l["tokens_per_expert"][j]), 1e-12)
                     for l in layers for j in range(paths)])
    heat_labels = [f"L{l['layer']} p{j + 1}" for l in layers for j in range(paths)]
    fig = plt.figure(figsize=(13, max(7.0, 4.0 + 0.22 * len(heat_labels))))
    grid = fig.add_gridspec(3, 2, width_ratios=[1, 1.5])
    ax_lp, ax_ppl, ax_load = (fig.add_subplot(grid[i, 0]) for i in range(3))
    ax_heat = fig.add_subplot(grid[:, 1])
    x = np.arange(paths)
    ax_lp.bar(x, [r["mean_logprob"] for r in rows], color=colors)
    ax_lp.set_ylabel("mean target log-likelihood")
    ax_ppl.bar(x, [r["perplexity"] for r in rows], color=colors)
    ax_ppl.set_ylabel("perplexity")
    ppls = [r["perplexity"] for r in rows]
    if all(math.isfinite(p) and p > 0 for p in ppls) and max(ppls) / min(ppls) > 100:
        ax_ppl.set_yscale("log")
        ax_ppl.set_ylabel("perplexity (log scale)")
    for ax, key, fmt in ((ax_lp, "mean_logprob", "{:.3f}"), (ax_ppl, "perplexity", "{:.4g}")):
        for i, r in enumerate(rows):
            ax.annotate(fmt.format(r[key]), (i, r[key]), ha="center", va="bottom" if r[key] >= 0 else "top", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    acc = report["tier_order_acc"]
    ax_lp.set_title(f"tier-ordering accuracy {'-' if acc is None else f'{acc:.3f}'} "
                    f"({report['data']['sequences']} sequences)", fontsize=10)
    width = 0.8 / max(paths, 1)
    lx = np.arange(len(layers))
    for j in range(paths):
        ax_load.bar(lx + (j - (paths - 1) / 2) * width, [l["max_over_mean"][j] for l in layers], width,
                    color=colors[j], label=f"path {j + 1}")
    ax_load.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_load.set_xticks(lx, [f"L{l['layer']}" + ("" if l["tier_routed"] else "*") for l in layers], fontsize=8)
    ax_load.set_ylabel("expert load max / mean")
    ax_load.set_xlabel("MoE layer (* = not tier-routed)")
    ax_load.legend(fontsize=8)
    if len(heat):
        image = ax_heat.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest")
        ax_heat.set_yticks(np.arange(len(heat_labels)), heat_labels, fontsize=7 if len(heat_labels) < 60 else 5)
        ax_heat.set_xlabel("expert")
        fig.colorbar(image, ax=ax_heat, label="tokens / mean tokens per expert")
    ax_heat.set_title("per-tier expert load (layer x path)", fontsize=10)
    ckpt = report["checkpoint"]
    tag = ckpt["iteration"] if ckpt["iteration"] == "release" else f"iteration {ckpt['iteration']}"
    fig.suptitle(f"tier report: {os.path.basename(ckpt['load'].rstrip('/'))} ({ckpt['kind']}, {tag}), "
                 f"C={paths}, {report['data']['source']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, format="png")
    plt.close(fig)
    return png_path


def write_outputs(report: dict, out_json: Optional[str], out_png: Optional[str], force: bool) -> None:
    """Write into temporary files next to the outputs, then move both into place."""
    check_outputs([out_json, out_png], force)
    staged = []
    try:
        for path, write in ((out_json, _write_json), (out_png, plot_report)):
            if not path:
                continue
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
            os.close(fd)
            staged.append((tmp, path))
            write(report, tmp)
        check_outputs([out_json, out_png], force)  # nothing appeared meanwhile
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def _write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    try:
        report = make_report(args)
        write_outputs(report, args.out_json, args.out_png, args.force)
    except ReportError as err:
        print(f"tier_report: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    written = [p for p in (args.out_json, args.out_png) if p]
    if written:
        print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
