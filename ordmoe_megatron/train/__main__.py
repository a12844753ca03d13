"""``python -m ordmoe_megatron.train``: ``ordmoe-pretrain``."""

import sys

from ordmoe_megatron.entrypoints import pretrain

sys.exit(pretrain())
