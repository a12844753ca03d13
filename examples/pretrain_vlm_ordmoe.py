"""Megatron-LM's ``pretrain_vlm.py`` run with OrdMoE, without patching Megatron-LM.

Needs a Megatron-LM checkout (core_v0.16.1 or core_v0.19.0) on ``PYTHONPATH``: this script imports
``pretrain_vlm``'s dataset provider (Megatron's ``MockMultimodalDataset``), ``forward_step``,
model provider and embedding ranks, and calls ``pretrain(...)`` the way that tag's
``pretrain_vlm.py`` does, with the OrdMoE flags (``megatron_lm.vlm.vlm_extra_args_provider``) and
the OrdMoE LLaVA model (``megatron_lm.vlm.vlm_model_provider``). Every ``pretrain_vlm.py`` flag
works; add ``--ordmoe`` and the ``--ordmoe-*`` flags (docs/multimodal.md has a CPU first run)::

    PYTHONPATH=/path/to/Megatron-LM torchrun --nproc-per-node 8 examples/pretrain_vlm_ordmoe.py \\
        <pretrain_vlm.py flags> --num-experts 8 --ordmoe --ordmoe-num-tiers 3

Without ``--ordmoe`` this is plain ``pretrain_vlm.py``, except that an MoE language model's vision
projector gets the dense MLP spec (``pretrain_vlm.py`` cannot build it otherwise).
"""

import sys

try:
    import pretrain_vlm  # noqa: E402  (Megatron-LM's; its __main__ block does not run on import)
except ModuleNotFoundError as err:
    if err.name != "pretrain_vlm":
        raise
    sys.exit(
        f"pretrain_vlm_ordmoe.py: cannot import Megatron-LM's pretrain_vlm ({err}); put your Megatron-LM "
        "checkout (core_v0.16.1 or core_v0.19.0) on PYTHONPATH, e.g. PYTHONPATH=/path/to/Megatron-LM"
    )

from megatron.core.enums import ModelType
from megatron.training import pretrain

from ordmoe_megatron.megatron_lm.vlm import vlm_extra_args_provider, vlm_model_provider
from ordmoe_megatron.runtime import compat


def main() -> None:
    pretrain_vlm.train_valid_test_datasets_provider.is_distributed = True
    extra_args = vlm_extra_args_provider(pretrain_vlm.add_vlm_extra_args)
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    provider = vlm_model_provider(pretrain_vlm.model_provider)
    ranks = dict(
        get_embedding_ranks=pretrain_vlm.llava_embedding_ranks,
        get_position_embedding_ranks=pretrain_vlm.llava_position_embedding_ranks,
    )
    if compat.megatron_lm_pretrain_style() == "provider":  # core_v0.16, core_v0.17
        pretrain(
            pretrain_vlm.train_valid_test_datasets_provider,
            provider,
            ModelType.encoder_or_decoder,
            pretrain_vlm.forward_step,
            args_defaults=defaults,
            extra_args_provider=extra_args,
            **ranks,
        )
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args, args_defaults=defaults)
    pretrain(  # by name: core_v0.18 and core_v0.19 order these differently
        pretrain_cfg_container_from_args(args),
        train_valid_test_dataset_provider=pretrain_vlm.train_valid_test_datasets_provider,
        model_provider=provider,
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=pretrain_vlm.forward_step,
        **ranks,
    )


if __name__ == "__main__":
    main()
