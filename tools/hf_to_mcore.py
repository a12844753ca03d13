#!/usr/bin/env python
"""Convert a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) to a Megatron-Core
distributed checkpoint in Megatron-LM's layout, and print the equivalent model flags.

    python tools/hf_to_mcore.py --hf-dir ./Qwen1.5-MoE-A2.7B --out ./qwen-mcore [--force]

Writes <out>/latest_checkpointed_iteration.txt ("release"), <out>/release/ (dist checkpoint),
<out>/model_args.json (model flags) and <out>/hf_metadata.json (for exporting back). Load it
with Megatron-LM (or ordmoe-pretrain) using the printed flags plus --load <out>.
"""

import argparse
import os
import shlex
import sys


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ordmoe_megatron.convert import hf_to_mcore
    from ordmoe_megatron.errors import OrdMoEError
    from ordmoe_megatron.runtime.model_flags import flags_to_argv

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", "--mcore-dir", dest="out", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        flags = hf_to_mcore(args.hf_dir, args.out, force=args.force, log=lambda s: print(s, file=sys.stderr))
    except OrdMoEError as e:  # the one place the conversion turns a refusal into its exit message
        print(f"hf_to_mcore: error: {e}", file=sys.stderr)
        return 2
    print("# Megatron-LM model flags for this checkpoint:")
    print(" ".join(shlex.quote(a) for a in flags_to_argv(flags)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
