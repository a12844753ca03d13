#!/usr/bin/env python
"""Tier report of a Megatron MoE checkpoint: per OrdMoE tier path, the mean target
log-likelihood and perplexity, the tier-ordering accuracy and the per-tier expert load.

    python tools/tier_report.py --load ./qwen-mcore --token-ids eval.jsonl \
        --out-json report.json --out-png report.png [--ordmoe-num-tiers 3] [--force]

The checkpoint is any Megatron checkpoint directory: converted by tools/hf_to_mcore.py
(model flags in model_args.json) or saved by ordmoe-pretrain (model flags in run.json).
Evaluation data: --token-ids F (JSON lines), --text-file F --tokenizer-model M, or
--data-path PREFIX --tokenizer-model M. See docs/report.md for the conventions.
"""

import os
import sys


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ordmoe_megatron.entrypoints import tier_report

    return tier_report(argv)


if __name__ == "__main__":
    sys.exit(main())
