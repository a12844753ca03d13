"""OrdMoE for Megatron-Core: routing-score tiers, fused multi-path forward, expert-rank loss.

Floors, each importing only those below it:

- ``method``: the method in plain PyTorch (tiers, objective, configuration);
- ``runtime``: Megatron set-up that knows nothing of OrdMoE (process bootstrap, the bridges for
  machines without CUDA or Transformer Engine, version differences, checkpoints, model flags);
- ``data``: corpus, tokenizer, Megatron data files, evaluation documents;
- ``mcore``: the Megatron-Core plug-in (router, dispatcher, spec, model, loss, schedules, metrics);
- ``flags``: the ``--ordmoe-*`` flags of every front end;
- applications: ``train`` (``ordmoe-pretrain``), ``megatron_lm`` (``pretrain_gpt.py --ordmoe``),
  ``convert`` (Hugging Face import/export), ``report`` (the tier report).

Importing this package imports the method only.
"""

from ordmoe_megatron.method import (
    OrdMoEConfig,
    default_rewards,
    expert_rank_loss,
    format_tiers,
    parse_layer_scope,
    parse_rank_spec,
    rank_advantages,
    rank_order,
    ranking_scores,
    select_tier,
    sequence_logprobs,
    tier_gating,
    tier_order_correct,
    tier_ranks,
)

__version__ = "0.2.0"
