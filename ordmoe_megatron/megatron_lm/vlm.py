"""Megatron-LM's ``pretrain_vlm.py`` with ``--ordmoe``: a LLaVA model whose language model runs the tier paths.

``pretrain_vlm.py`` is Megatron-LM's one vision-language entry that accepts ``--num-experts``
(``examples/multimodal`` trains dense language models from energon data); docs/multimodal.md.
Two ways in, as for ``pretrain_gpt.py``: the patch ``patches/megatron-lm-<tag>-pretrain-vlm-ordmoe.patch``
changes the ``pretrain(...)`` call of ``pretrain_vlm.py``, and ``examples/pretrain_vlm_ordmoe.py``
makes the same call without patching. Both use only:

- ``vlm_model_provider(model_provider)``: ``pretrain_vlm.model_provider`` with its module's name
  ``LLaVAModel`` bound, for the duration of the call, to a builder that

  1. gives the vision projector the dense MLP spec when the language layers are MoE
     (``pretrain_vlm.py`` builds the projector from the language layer's MLP submodules, which
     for ``--num-experts`` are ``MoESubmodules``: Megatron-LM itself then fails with
     ``AttributeError: 'MoESubmodules' object has no attribute 'linear_fc1'``; the projector gets
     what it gets for the same model without ``--num-experts``), with or without ``--ordmoe``;
  2. with ``--ordmoe``, builds ``mcore.multimodal.OrdMoELLaVAModel(..., ordmoe=cfg)``, whose
     language model is an ``OrdMoEGPTModel`` with the plain model's weights.

- ``vlm_extra_args_provider(existing)``: ``megatron_lm.extra_args_provider`` (the OrdMoE flags,
  their checks, ``--ordmoe-dry-run``, ``hooks.install``) after ``existing``
  (``add_vlm_extra_args``), plus the vision-language refusals, right after parsing:
  ``--pipeline-model-parallel-size`` > 1, ``--context-parallel-size`` > 1 and
  ``--sequence-parallel`` (so no ``--tensor-model-parallel-size`` > 1 with MoE) end the program
  with ``pretrain_vlm.py: error: <message naming the flag>`` before anything is built.

The schedules hook (``hooks.install``) is the one ``pretrain_gpt.py --ordmoe`` uses:
``pretrain_vlm.forward_step`` returns ``partial(pretrain_gpt.loss_func, loss_mask)`` with the loss
mask the LLaVA model returns (image positions zeroed), and ``mcore.schedules`` finds the OrdMoE
model at ``.language_model``. ``megatron.training`` is Megatron-LM's: imported where it is used.
"""

from __future__ import annotations

import argparse
import functools
import sys
import types
from typing import Callable, Optional

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.flags import ordmoe_config_from_args
from ordmoe_megatron.mcore.multimodal import OrdMoELLaVAModel, _check_language_config
from ordmoe_megatron.megatron_lm import hooks
from ordmoe_megatron.megatron_lm.arguments import extra_args_provider


def vlm_model_provider(model_provider: Callable) -> Callable:
    """Wrap ``pretrain_vlm.model_provider`` (module docstring). ``model_provider`` must build its
    model through the module-level name ``LLaVAModel`` of its module, as ``pretrain_vlm.py`` does."""

    @functools.wraps(model_provider)
    def provide(*args, **kwargs):
        module = sys.modules.get(getattr(model_provider, "__module__", None) or "")
        if module is None or not hasattr(module, "LLaVAModel"):
            raise OrdMoEError(
                f"--ordmoe: cannot find the name LLaVAModel in the module of {model_provider!r}; wrap "
                "pretrain_vlm.model_provider, or build ordmoe_megatron.mcore.multimodal.OrdMoELLaVAModel yourself"
            )
        from megatron.training import get_args

        margs = get_args()
        ordmoe = ordmoe_config_from_args(margs) if getattr(margs, "ordmoe", False) else None
        build = functools.partial(_build_llava, module.LLaVAModel, ordmoe, margs.transformer_impl)
        with hooks.llava_model_bound(module, build):
            model = model_provider(*args, **kwargs)
        if ordmoe is not None and not isinstance(model, OrdMoELLaVAModel):
            raise OrdMoEError(
                f"--ordmoe: {model_provider.__module__}.{model_provider.__name__} returned {type(model).__name__}, "
                "not a LLaVAModel built through its module's LLaVAModel name"
            )
        return model

    return provide


def _build_llava(llava_class, ordmoe, transformer_impl, *args, **kwargs):
    kwargs["vision_projection_layer_spec"] = dense_projection_spec(
        kwargs.get("vision_projection_layer_spec"), transformer_impl
    )
    if ordmoe is None:
        return llava_class(*args, **kwargs)
    return OrdMoELLaVAModel(*args, ordmoe=ordmoe, **kwargs)


def dense_projection_spec(projection_spec, transformer_impl: str):
    """The vision projector's MLP submodules: ``projection_spec`` when it is an MLP's, else (the
    language layer's MoE submodules) the dense MLP submodules ``pretrain_vlm.py`` gives the
    projector of the same model without ``--num-experts``."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    if not isinstance(projection_spec, MoESubmodules):
        return projection_spec
    from megatron.core.models.multimodal import llava_spec

    if transformer_impl == "transformer_engine":
        dense = llava_spec.decoder_model_with_transformer_engine_default_spec(None, False)
    else:
        dense = llava_spec.decoder_model_with_local_default_spec(None, False)
    mlp = dense.submodules.mlp
    return mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules


def check_vlm_args(args: argparse.Namespace) -> None:
    """What a vision-language model cannot run with tier paths (``mcore.multimodal``'s refusals),
    on parsed Megatron-LM arguments. Raises ``OrdMoEError`` naming the flag."""
    if not getattr(args, "ordmoe", False):
        return
    _check_language_config(
        types.SimpleNamespace(
            pipeline_model_parallel_size=getattr(args, "pipeline_model_parallel_size", 1) or 1,
            sequence_parallel=bool(getattr(args, "sequence_parallel", False)),
            context_parallel_size=getattr(args, "context_parallel_size", 1) or 1,
        )
    )


def vlm_extra_args_provider(existing: Optional[Callable] = None, check_now: bool = True) -> Callable:
    """``pretrain_vlm.py``'s ``extra_args_provider``: ``existing`` (``add_vlm_extra_args``), the
    OrdMoE flags and their checks, and ``check_vlm_args`` right after parsing (before the OrdMoE
    checks, the dry run and ``hooks.install``)."""

    def with_vlm_checks(parser):
        if existing is not None:
            parser = existing(parser)
        _hook_vlm_checks(parser)
        return parser

    return extra_args_provider(with_vlm_checks, check_now=check_now)


def _hook_vlm_checks(parser: argparse.ArgumentParser) -> None:
    # Wrapped before megatron_lm.arguments hooks the parser, so these checks run first.
    # ``parse_args`` calls ``parse_known_args``: wrapping that one covers both.
    if getattr(parser, "_ordmoe_vlm_hooked", False):
        return
    parser._ordmoe_vlm_hooked = True
    parser.set_defaults(ordmoe_vlm=True)  # hooks.language_model_args: the language model's depth
    parse_known_args = parser.parse_known_args

    def checked_parse_known_args(*a, **kw):
        args, rest = parse_known_args(*a, **kw)
        try:
            check_vlm_args(args)
        except OrdMoEError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        return args, rest

    parser.parse_known_args = checked_parse_known_args
