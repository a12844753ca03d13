#!/usr/bin/env python
"""``ordmoe-convert hf-to-mcore`` (ordmoe_megatron/convert/cli.py), kept under its old name:

    python tools/hf_to_mcore.py --hf-dir ./Qwen1.5-MoE-A2.7B --out ./qwen-mcore [--force]

Needs the package installed (``pip install -e .``).
"""

import sys

from ordmoe_megatron.entrypoints import convert

if __name__ == "__main__":
    sys.exit(convert(["hf-to-mcore", *sys.argv[1:]]))
