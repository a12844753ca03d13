#!/usr/bin/env python
"""``ordmoe-convert mcore-to-hf`` (ordmoe_megatron/convert/cli.py), kept under its old name:

    python tools/mcore_to_hf.py --mcore-dir ./qwen-mcore --out ./qwen-hf [--force]

Needs the package installed (``pip install -e .``).
"""

import sys

from ordmoe_megatron.entrypoints import convert

if __name__ == "__main__":
    sys.exit(convert(["mcore-to-hf", *sys.argv[1:]]))
