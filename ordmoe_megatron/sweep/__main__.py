"""``python -m ordmoe_megatron.sweep``: ``ordmoe-sweep``."""

import sys

from ordmoe_megatron.entrypoints import sweep

sys.exit(sweep())
