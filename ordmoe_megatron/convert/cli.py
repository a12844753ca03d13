"""``ordmoe-convert``: checkpoint conversion as one command with two directions.

    ordmoe-convert hf-to-mcore --hf-dir ./Qwen1.5-MoE-A2.7B --out ./qwen-mcore [--force]
    ordmoe-convert mcore-to-hf --mcore-dir ./ordmoe-run --out ./ordmoe-run-hf [--force]

``hf-to-mcore`` writes Megatron-LM's release layout (``latest_checkpointed_iteration.txt``,
``release/``, ``model_args.json``, ``hf_metadata.json``) and prints the equivalent Megatron-LM model
flags. ``mcore-to-hf`` reads a converted checkpoint, an ``ordmoe-pretrain --save`` checkpoint or a
Megatron-LM ``pretrain_gpt.py --save`` checkpoint (its flags from ``common.pt``'s ``args``), in any
parallel layout, and writes ``config.json`` and safetensors. A refusal ends the command with one
line, ``ordmoe-convert: error: <message>``, and exit status 2, before any output is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.runtime.model_flags import flags_to_argv

from . import hf_io
from .api import hf_to_mcore, mcore_to_hf
from .families import FAMILIES

PROG = "ordmoe-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-mcore,mcore-to-hf}")

    to_mcore = commands.add_parser(
        "hf-to-mcore",
        help="Hugging Face MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5 MoE, DeepSeek-V3, OLMoE) -> "
        "Megatron-LM release checkpoint",
    )
    to_mcore.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    to_mcore.add_argument(
        "--out", "--mcore-dir", dest="out", required=True, help="output Megatron checkpoint directory"
    )
    to_mcore.add_argument("--force", action="store_true", help="replace an existing output directory")

    to_hf = commands.add_parser(
        "mcore-to-hf",
        help="Megatron checkpoint (converted, ordmoe-pretrain or Megatron-LM, any layout) -> Hugging Face model",
    )
    to_hf.add_argument(
        "--mcore-dir", required=True, help="Megatron checkpoint root (with latest_checkpointed_iteration.txt)"
    )
    to_hf.add_argument("--out", "--hf-dir", dest="out", required=True, help="output Hugging Face model directory")
    to_hf.add_argument("--force", action="store_true", help="replace an existing output directory")
    to_hf.add_argument(
        "--model-type",
        default=None,
        help=f"HF model_type ({', '.join(sorted(FAMILIES))}); default: recorded or inferred from the flags",
    )
    to_hf.add_argument(
        "--max-shard-size",
        default=hf_io.DEFAULT_MAX_SHARD_BYTES,
        help="safetensors shard size, e.g. 5GB (default 5GB)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    try:  # the one place the conversion turns a refusal into its exit message
        if args.command == "hf-to-mcore":
            flags = hf_to_mcore(args.hf_dir, args.out, force=args.force, log=log)
            print("# Megatron-LM model flags for this checkpoint:")
            print(" ".join(shlex.quote(a) for a in flags_to_argv(flags)))
            if flags.get("qk_layernorm_scope", "head") != "head":
                print(
                    "# --qk-layernorm-scope projection is ordmoe-pretrain's: pretrain_gpt.py builds per-head q/k "
                    "norms and refuses this checkpoint"
                )
        else:
            mcore_to_hf(
                args.mcore_dir,
                args.out,
                force=args.force,
                model_type=args.model_type,
                max_shard_size=args.max_shard_size,
                log=log,
            )
    except OrdMoEError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0
