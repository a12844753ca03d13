"""``python -m ordmoe_megatron.report``: ``ordmoe-tier-report``."""

import sys

from ordmoe_megatron.entrypoints import tier_report

sys.exit(tier_report())
