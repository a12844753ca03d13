"""Megatron-LM integration: ``pretrain_gpt.py --ordmoe ...`` with Megatron-LM's own training loop.

Two ways in, both using only the pieces below:

- the patch in ``patches/`` (``git apply`` in the Megatron-LM checkout) changes two arguments of
  the ``pretrain(...)`` call in ``pretrain_gpt.py``;
- ``examples/pretrain_gpt_ordmoe.py`` makes the same call without patching (Megatron-LM on
  ``PYTHONPATH``).

The user's ``forward_step``, ``loss_func``, data pipeline and model builder stay Megatron-LM's.
With ``--no-ordmoe`` (the default) nothing changes at all: the argument hook returns the parsed
arguments untouched, the builder calls Megatron-LM's builder as it is, and ``install`` is never
called, so no name in Megatron-LM is replaced.

- ``arguments``: the flags, their checks right after parsing, and ``--ordmoe-dry-run``;
- ``dry_run``: what ``--ordmoe-dry-run`` prints;
- ``hooks``: every name OrdMoE rebinds in Megatron-LM (the model builder, the schedules, FLOPs);
- ``model_config``: core_v0.19's model configuration and builder for OrdMoE.
- ``vlm``: the same for ``pretrain_vlm.py`` (a LLaVA model with an OrdMoE language model).
"""

from ordmoe_megatron.flags import ordmoe_config_from_args
from ordmoe_megatron.megatron_lm.arguments import (
    add_ordmoe_megatron_args,
    extra_args_provider,
    megatron_validated_args,
    validate_ordmoe_args,
)
from ordmoe_megatron.megatron_lm.dry_run import describe_run
from ordmoe_megatron.megatron_lm.hooks import (
    flops_factor,
    install,
    is_installed,
    ordmoe_builder,
    ordmoe_num_floating_point_operations,
    sft_batches_are_packed,
    shared_prefix_layers,
    uninstall,
)


def ordmoe_model_config(args, model_config):
    """Megatron-LM core_v0.19: the model comes from a ``GPTModelConfig`` and its builder, not a
    model provider. With ``--ordmoe`` this is the same configuration as an
    ``OrdMoEGPTModelConfig``, whose builder builds ``OrdMoEGPTModel``; without it,
    ``model_config`` itself."""
    if not getattr(args, "ordmoe", False):
        return model_config
    # Imported here: model_config subclasses megatron.training.models, which core_v0.19 has first.
    from ordmoe_megatron.megatron_lm.model_config import ordmoe_gpt_model_config

    packed = sft_batches_are_packed(args)
    return ordmoe_gpt_model_config(model_config, ordmoe_config_from_args(args), packed=packed)
