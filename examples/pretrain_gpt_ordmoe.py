"""Megatron-LM's ``pretrain_gpt.py`` run with OrdMoE, without patching Megatron-LM.

Needs a Megatron-LM checkout at a supported tag (README, "Supported versions") on ``PYTHONPATH``: this
script imports ``pretrain_gpt``'s dataset provider, ``forward_step`` and ``get_embedding_ranks``
and calls ``pretrain(...)`` the way that tag's ``pretrain_gpt.py`` does, with the OrdMoE flags
(``megatron_lm.extra_args_provider``) and the OrdMoE model (``ordmoe_builder`` around
``gpt_builder``, or from core_v0.19 ``ordmoe_model_config`` around the ``GPTModelConfig``). Every
``pretrain_gpt.py`` flag works; add ``--ordmoe`` and the ``--ordmoe-*`` flags::

    PYTHONPATH=/path/to/Megatron-LM torchrun --nproc-per-node 8 examples/pretrain_gpt_ordmoe.py \\
        <pretrain_gpt.py flags> --ordmoe --ordmoe-num-tiers 3

``--ordmoe-dry-run`` prints the configuration, parallel layout and tier layout and exits (no GPU
needed). Without ``--ordmoe`` this is plain ``pretrain_gpt.py``.
"""

import sys
import time
from functools import partial

try:
    import pretrain_gpt  # noqa: E402  (Megatron-LM's; its __main__ block does not run on import)
    from gpt_builders import gpt_builder
    from model_provider import model_provider
except ModuleNotFoundError as err:
    if err.name not in ("pretrain_gpt", "gpt_builders", "model_provider"):
        raise
    from ordmoe_megatron.runtime.compat import supported_megatron_lm_tags

    sys.exit(
        f"pretrain_gpt_ordmoe.py: cannot import Megatron-LM's pretrain_gpt ({err}); put your Megatron-LM "
        f"checkout ({supported_megatron_lm_tags()}) on PYTHONPATH, e.g. PYTHONPATH=/path/to/Megatron-LM"
    )

from megatron.core.enums import ModelType
from megatron.training import inprocess_restart, pretrain, set_startup_timestamps

from ordmoe_megatron import megatron_lm
from ordmoe_megatron.runtime import compat


def main() -> None:
    set_startup_timestamps(program_start=pretrain_gpt._PROGRAM_START_TIME, main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    style = compat.megatron_lm_pretrain_style()  # before the in-process-restart wrapper hides the signature
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    extra_args = megatron_lm.extra_args_provider(
        pretrain_gpt.add_modelopt_args if pretrain_gpt.has_nvidia_modelopt else None
    )
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    datasets, forward_step = pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.forward_step
    common = dict(store=store, get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
    provider = partial(model_provider, megatron_lm.ordmoe_builder(gpt_builder))
    if style == "provider":  # core_v0.16, core_v0.17: pretrain parses the arguments itself
        run(
            datasets,
            provider,
            ModelType.encoder_or_decoder,
            forward_step,
            args_defaults=defaults,
            extra_args_provider=extra_args,
            **common,
        )
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args, args_defaults=defaults)
    if style == "container":  # core_v0.18
        run(
            pretrain_cfg_container_from_args(args),
            datasets,
            provider,
            ModelType.encoder_or_decoder,
            forward_step,
            **common,
        )
        return
    from megatron.training.argument_utils import gpt_config_from_args  # core_v0.19: no model provider

    model_config = megatron_lm.ordmoe_model_config(args, gpt_config_from_args(args))
    run(
        pretrain_cfg_container_from_args(args, model_config),
        datasets,
        ModelType.encoder_or_decoder,
        forward_step,
        **common,
    )


if __name__ == "__main__":
    main()
