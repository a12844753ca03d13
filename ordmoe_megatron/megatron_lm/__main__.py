"""``python -m ordmoe_megatron.megatron_lm --help``: the flags the Megatron-LM hook adds."""

import sys

from ordmoe_megatron.megatron_lm.arguments import main

sys.exit(main())
