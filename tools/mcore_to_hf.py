#!/usr/bin/env python
"""Convert a Megatron-Core distributed checkpoint (converted by hf_to_mcore.py or trained with
ordmoe-pretrain / Megatron-LM, any parallel layout) to a Hugging Face model directory.

    python tools/mcore_to_hf.py --mcore-dir ./qwen-mcore --out ./qwen-hf [--force]

Needs <mcore-dir>/model_args.json (the model flags). The Hugging Face family comes from
<mcore-dir>/hf_metadata.json, --model-type, or is inferred from the flags. Writes config.json and
model.safetensors (or model-XXXXX-of-YYYYY.safetensors + index above --max-shard-size).
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ordmoe_megatron.convert import mcore_to_hf
    from ordmoe_megatron.errors import OrdMoEError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mcore-dir", required=True, help="Megatron checkpoint root (with latest_checkpointed_iteration.txt)"
    )
    parser.add_argument("--out", "--hf-dir", dest="out", required=True, help="output Hugging Face model directory")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--model-type",
        default=None,
        help="HF model_type (mixtral, qwen2_moe, qwen3_moe); default: recorded or inferred",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    args = parser.parse_args(argv)
    try:
        mcore_to_hf(
            args.mcore_dir,
            args.out,
            force=args.force,
            model_type=args.model_type,
            max_shard_size=args.max_shard_size,
            log=lambda s: print(s, file=sys.stderr),
        )
    except OrdMoEError as e:  # the one place the conversion turns a refusal into its exit message
        print(f"mcore_to_hf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
