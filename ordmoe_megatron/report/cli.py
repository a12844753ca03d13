"""``ordmoe-tier-report`` (also ``tools/tier_report.py``): the tier report from the command line.

Data sources (exactly one): ``--token-ids F`` (JSON lines, each ``{"tokens": [...]}`` or a plain
list), ``--text-file F --tokenizer-model M`` (documents separated by blank lines, or one per line
with ``--documents lines``), ``--data-path PREFIX --tokenizer-model M`` (Megatron ``.bin/.idx``,
read through megatron-core's ``GPTDataset`` as training reads it). ``M`` is a SentencePiece
``.model`` file or a Hugging Face tokenizer directory. Nothing is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ordmoe_megatron.data.documents import DOCUMENT_MODES
from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.flags import add_ordmoe_args, ordmoe_config_from_args
from ordmoe_megatron.report import plot, report
from ordmoe_megatron.report.config import DEFAULT_MAX_SEQ_LENGTH, ReportConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tier_report",
        description="Tier report: how each OrdMoE tier path of a checkpoint does on evaluation data.",
        epilog="Example: python tools/tier_report.py --load ckpt --token-ids eval.jsonl --out-json r.json "
        "--out-png r.png",
    )
    parser.add_argument(
        "--load",
        required=True,
        help="Checkpoint directory (the one holding latest_checkpointed_iteration.txt): converted by "
        "ordmoe-convert hf-to-mcore or saved by ordmoe-pretrain --save.",
    )
    parser.add_argument(
        "--model-args",
        default=None,
        help="A JSON object of the model flags (as model_args.json holds them), for a checkpoint "
        "that records none (one saved by Megatron-LM); it replaces what the checkpoint records.",
    )
    data = parser.add_argument_group("evaluation data (give exactly one source)")
    data.add_argument(
        "--token-ids",
        default=None,
        help='JSON lines of token ids, one document per line: {"tokens": [...]} or a plain list.',
    )
    data.add_argument(
        "--text-file", default=None, help="Plain text, tokenized with --tokenizer-model (see --documents)."
    )
    data.add_argument("--data-path", default=None, help="Megatron .bin/.idx prefix (needs --tokenizer-model).")
    data.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model file or Hugging Face tokenizer directory (the checkpoint's tokenizer).",
    )
    data.add_argument(
        "--documents",
        choices=DOCUMENT_MODES,
        default="paragraphs",
        help="--text-file: documents separated by blank lines (paragraphs, default) or one per line.",
    )
    data.add_argument(
        "--no-eod",
        dest="append_eod",
        action="store_false",
        help="--text-file: do not append the end-of-document token to each document.",
    )
    run = parser.add_argument_group("evaluation")
    run.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help=f"Targets per sequence (default: the checkpoint's seq_length, at most {DEFAULT_MAX_SEQ_LENGTH}).",
    )
    run.add_argument("--max-sequences", type=int, default=256, help="Evaluate at most this many sequences (windows).")
    run.add_argument("--micro-batch-size", type=int, default=4, help="Sequences per forward (times C paths).")
    run.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="GPTDataset shuffle and the random grouping's draws (a vision-language checkpoint's scenes "
        "come from its run's seed).",
    )
    add_ordmoe_args(parser, tier_flags_only=True)
    out = parser.add_argument_group("outputs")
    out.add_argument("--out-json", default=None, help="Write the report as JSON here.")
    out.add_argument(
        "--out-png",
        default=None,
        help="Write per-path log-likelihood/perplexity bars and the per-tier expert-load heatmap here.",
    )
    out.add_argument("--force", action="store_true", help="Replace existing --out-json/--out-png files.")
    return parser


def report_config_from_args(args: argparse.Namespace) -> ReportConfig:
    config = ReportConfig(
        load=args.load,
        ordmoe=ordmoe_config_from_args(args),
        token_ids=args.token_ids,
        text_file=args.text_file,
        data_path=args.data_path,
        tokenizer_model=args.tokenizer_model,
        documents=args.documents,
        append_eod=args.append_eod,
        seq_length=args.seq_length,
        max_sequences=args.max_sequences,
        micro_batch_size=args.micro_batch_size,
        seed=args.seed,
        model_args=args.model_args,
    )
    return config  # make_report checks the sources (a vision-language checkpoint takes none)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # the one place the tier report turns a refusal into its exit message
        config = report_config_from_args(args)
        plot.check_outputs([args.out_json, args.out_png], args.force)
        result = report.make_report(config)
        plot.write_outputs(result, args.out_json, args.out_png, args.force)
    except OrdMoEError as err:
        print(f"tier_report: error: {err}", file=sys.stderr)
        return 2
    print(plot.format_table(result))
    written = [p for p in (args.out_json, args.out_png) if p]
    if written:
        print("wrote " + ", ".join(written))
    return 0
