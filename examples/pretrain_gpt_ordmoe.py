"""Megatron-LM's ``pretrain_gpt.py`` run with OrdMoE, without patching Megatron-LM.

Needs a Megatron-LM checkout (tag ``core_v0.16.1``) on ``PYTHONPATH``: this script imports
``pretrain_gpt``'s dataset provider, ``forward_step`` and ``get_embedding_ranks``, Megatron-LM's
``model_provider`` and ``gpt_builder``, and calls ``pretrain(...)`` exactly as ``pretrain_gpt.py``
does, with two differences: the model builder is ``ordmoe_builder(gpt_builder)`` and the extra
arguments provider adds the OrdMoE flags (``ordmoe_megatron.megatron_lm``). Every
``pretrain_gpt.py`` flag works; add ``--ordmoe`` and the ``--ordmoe-*`` flags::

    PYTHONPATH=/path/to/Megatron-LM torchrun --nproc-per-node 8 examples/pretrain_gpt_ordmoe.py \\
        <pretrain_gpt.py flags> --ordmoe --ordmoe-num-tiers 3

``--ordmoe-dry-run`` prints the configuration, parallel layout and tier layout and exits (no GPU
needed). Without ``--ordmoe`` this is plain ``pretrain_gpt.py``.
"""
import sys
from functools import partial

try:
    import pretrain_gpt  # noqa: E402  (Megatron-LM's; its __main__ block does not run on import)
    from gpt_builders import gpt_builder
    from model_provider import model_provider
except ModuleNotFoundError as err:
    if err.name not in ("pretrain_gpt", "gpt_builders", "model_provider"):
        raise
    sys.exit(f"pretrain_gpt_ordmoe.py: cannot import Megatron-LM's pretrain_gpt ({err}); put your Megatron-LM "
             "checkout (tag core_v0.16.1) on PYTHONPATH, e.g. PYTHONPATH=/path/to/Megatron-LM")

import time

from megatron.core.enums import ModelType
from megatron.training import inprocess_restart, pretrain, set_startup_timestamps

from ordmoe_megatron import megatron_lm

if __name__ == "__main__":
    set_startup_timestamps(program_start=pretrain_gpt._PROGRAM_START_TIME, main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    run(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(model_provider, megatron_lm.ordmoe_builder(gpt_builder)),
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=megatron_lm.extra_args_provider(
            pretrain_gpt.add_modelopt_args if pretrain_gpt.has_nvidia_modelopt else None
        ),
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )
