"""``python -m ordmoe_megatron.convert hf-to-mcore|mcore-to-hf ...``: ``ordmoe-convert``."""

import sys

from ordmoe_megatron.entrypoints import convert

sys.exit(convert())
