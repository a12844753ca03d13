"""Megatron-LM hooks: every name OrdMoE rebinds in Megatron-LM, declared here and nowhere else.

``REBOUND`` lists them. All are rebound only with ``--ordmoe``; without it nothing changes at all.

1. **Model** -- ``ordmoe_builder(gpt_builder)`` wraps Megatron-LM's ``gpt_builder`` (use it as
   ``partial(model_provider, ordmoe_builder(gpt_builder))``). With ``--ordmoe`` it runs
   ``gpt_builder`` itself, so the layer spec is exactly the one Megatron-LM picks (local,
   Transformer Engine, decoder-block with dense and MoE layers, ``--spec``), with the builder
   module's name ``GPTModel`` bound to ``OrdMoEGPTModel(..., ordmoe=cfg)`` for the duration of
   the call; ``OrdMoEGPTModel`` swaps the routers itself.

2. **Schedules and FLOPs** -- ``install(args)`` rebinds two names in
   ``megatron.training.training``'s namespace, which is where ``train()`` and ``evaluate()`` look
   them up:

   - ``get_forward_backward_func`` -> ``mcore.schedules.get_ordmoe_forward_backward_func`` around
     Megatron's own (point-to-point shapes sized for ``C * micro_batch_size``; the loss that
     ``forward_step`` returns as ``partial(loss_func, loss_mask, ...)`` becomes ``ordmoe_loss``
     with the same mask). ``pretrain_gpt.loss_func``'s NaN/Inf and spiky-loss checks are kept:
     they run on the OrdMoE loss reports through Megatron's rerun state machine. Megatron-LM's
     training log prints every report key whose average is positive: ``lm loss`` (path 1),
     ``tier order acc``, ``rank loss`` when positive and ``-rank loss`` (its negative) when it
     is negative, and each path's mean log-likelihood as its negative, ``pathJ nll`` (all keys,
     signs included, go to TensorBoard/W&B; the evaluation lines print ``rank loss`` with its
     sign). With ``--ordmoe-num-tiers 1`` Megatron's function is returned as it is.
   - ``num_floating_point_operations`` -> ``ordmoe_num_floating_point_operations``: the count is
     ``mcore.flops.ordmoe_step_flops`` of Megatron's count for the same batch, so throughput
     (TFLOP/s/GPU) in Megatron-LM's log counts the real work.

   ``install`` is idempotent and ``uninstall()`` restores Megatron-LM's names. Call ``install``
   yourself only when you drive ``megatron.training`` without the argument hook (e.g. with
   ``parsed_args``).

``megatron.training`` is Megatron-LM's, not megatron-core's: it is imported where it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
from typing import Callable, Optional

import torch
from megatron.core.rerun_state_machine import get_rerun_state_machine

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.flags import ordmoe_config_from_args
from ordmoe_megatron.mcore.flops import ordmoe_step_flops
from ordmoe_megatron.mcore.model import OrdMoEGPTModel
from ordmoe_megatron.mcore.schedules import get_ordmoe_forward_backward_func
from ordmoe_megatron.method import OrdMoEConfig, moe_layer_pattern
from ordmoe_megatron.runtime import bridges, compat
from ordmoe_megatron.runtime.packed_attention import packed_attention_spec

SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py's: a loss 10x the largest seen is "spiky"
REBOUND = (
    "<gpt_builder's module>.GPTModel (during the builder call; core_v0.16 to core_v0.18)",
    "megatron.training.models.gpt.GPTModel (during GPTModelBuilder.build_model; core_v0.19)",
    "<pretrain_vlm.model_provider's module>.LLaVAModel (during the provider call; megatron_lm.vlm)",
    "megatron.training.training.get_forward_backward_func",
    "megatron.training.training.num_floating_point_operations",
)


# --------------------------------------------------------------------------------------------
# 1. model
# --------------------------------------------------------------------------------------------
def ordmoe_builder(builder: Callable) -> Callable:
    """Wrap a Megatron-LM model builder (``gpt_builders.gpt_builder``) so that it builds an
    ``OrdMoEGPTModel`` with ``--ordmoe``; without it, ``builder`` is called as it is.

    ``builder`` must construct the model through the module-level name ``GPTModel`` of the module
    it is defined in, as ``gpt_builder`` does; that name is bound to the OrdMoE model for the
    duration of the call and restored afterwards.
    """

    @functools.wraps(builder)
    def build(args, *rest, **kwargs):
        if not getattr(args, "ordmoe", False):
            return builder(args, *rest, **kwargs)
        module = sys.modules.get(getattr(builder, "__module__", None) or "")
        if module is None or not hasattr(module, "GPTModel"):
            raise OrdMoEError(
                f"--ordmoe: cannot find the name GPTModel in the module of {builder!r}; wrap a builder that "
                "constructs GPTModel (such as Megatron-LM's gpt_builders.gpt_builder), or build "
                "ordmoe_megatron.mcore.model.OrdMoEGPTModel(config, spec, ..., ordmoe=cfg) yourself"
            )
        with gpt_model_bound_to_ordmoe(module, ordmoe_config_from_args(args), sft_batches_are_packed(args)):
            model = builder(args, *rest, **kwargs)
        if not isinstance(model, OrdMoEGPTModel):
            raise OrdMoEError(
                f"--ordmoe: {builder.__module__}.{builder.__name__} returned {type(model).__name__}, not a GPTModel "
                "built through its module's GPTModel name (legacy models and ModelOpt builders are not supported)"
            )
        return model

    return build


def sft_batches_are_packed(args) -> bool:
    """Whether Megatron-LM hands the model packed (THD) micro-batches: with ``--sft``."""
    return bool(getattr(args, "sft", False))


@contextlib.contextmanager
def gpt_model_bound_to_ordmoe(module, ordmoe: OrdMoEConfig, packed: bool = False):
    """``module.GPTModel`` builds ``OrdMoEGPTModel(..., ordmoe=ordmoe)`` for the duration.
    ``packed`` (``--sft``): a local spec's attention also runs THD rows (a TE spec is kept)."""
    original = module.GPTModel

    def build_ordmoe_gpt_model(*args, **kwargs):
        if packed and "transformer_layer_spec" in kwargs:
            kwargs["transformer_layer_spec"] = packed_attention_spec(kwargs["transformer_layer_spec"])
        elif packed and len(args) > 1:
            args = (args[0], packed_attention_spec(args[1]), *args[2:])
        return OrdMoEGPTModel(*args, ordmoe=ordmoe, **kwargs)

    module.GPTModel = build_ordmoe_gpt_model
    try:
        yield
    finally:
        module.GPTModel = original


@contextlib.contextmanager
def llava_model_bound(module, build: Callable):
    """``module.LLaVAModel`` is ``build`` for the duration (``megatron_lm.vlm.vlm_model_provider``:
    ``pretrain_vlm.py``'s model provider builds its model through that name)."""
    original = module.LLaVAModel
    module.LLaVAModel = build
    try:
        yield original
    finally:
        module.LLaVAModel = original


# --------------------------------------------------------------------------------------------
# 2. schedules and FLOPs
# --------------------------------------------------------------------------------------------
_ORIGINALS: dict = {}


def install(args: argparse.Namespace) -> bool:
    """With ``--ordmoe``, rebind ``get_forward_backward_func`` and ``num_floating_point_operations``
    in ``megatron.training.training`` (module docstring, 3.). Does nothing without ``--ordmoe``.
    Idempotent. Returns whether the OrdMoE hooks are installed."""
    if not getattr(args, "ordmoe", False):
        return is_installed()
    import megatron.training.training as training

    if not _ORIGINALS:
        for name in ("get_forward_backward_func", "num_floating_point_operations"):
            if not hasattr(training, name):
                raise OrdMoEError(
                    f"ordmoe_megatron.megatron_lm.install: megatron.training.training.{name} not found; "
                    f"this Megatron-LM is not one ordmoe-megatron supports ({compat.supported_megatron_lm_tags()})"
                )
            _ORIGINALS[name] = getattr(training, name)
    # Megatron-LM trains on megatron-core, which lacks a name without Transformer Engine (0.16).
    bridges.bridge_missing_transformer_engine()
    training.get_forward_backward_func = _get_forward_backward_func
    training.num_floating_point_operations = _num_floating_point_operations
    return True


def uninstall() -> None:
    """Put Megatron-LM's own ``get_forward_backward_func`` and ``num_floating_point_operations`` back."""
    if not _ORIGINALS:
        return
    import megatron.training.training as training

    for name, value in _ORIGINALS.items():
        setattr(training, name, value)
    _ORIGINALS.clear()


def is_installed() -> bool:
    return bool(_ORIGINALS)


def _current_args():
    from megatron.training.global_vars import get_args

    return get_args()


def _get_forward_backward_func(**schedule_kwargs):
    """``get_forward_backward_func`` as ``train()`` and ``evaluate()`` call it (no arguments up
    to core_v0.18; ``schedule_pg_collection=`` from core_v0.19)."""
    args = _current_args()
    ordmoe = ordmoe_config_from_args(args)
    if ordmoe is None or not ordmoe.enabled:
        return _ORIGINALS["get_forward_backward_func"](**schedule_kwargs)
    forward_backward = get_ordmoe_forward_backward_func(
        ordmoe,
        args.padded_vocab_size,
        per_token_loss=args.calculate_per_token_loss,
        seed=args.seed,
        step_fn=lambda: getattr(args, "curr_iteration", 0),
        **schedule_kwargs,
    )

    @functools.wraps(forward_backward)
    def checked_forward_backward(**kwargs):
        reports = forward_backward(**kwargs)
        _check_losses(args, ordmoe, reports)
        return _loggable(reports, training=not kwargs.get("forward_only", False))

    return checked_forward_backward


def _loggable(reports, training: bool = True):
    """Megatron-LM's training line prints only the reports whose average is positive (core_v0.16:
    ``> 0``; core_v0.19: ``>= 0``), so each path's mean log-likelihood is reported as its negative,
    ``pathJ nll`` (the evaluation lines' "PPL" of it is then the path's perplexity), and in training
    ``rank loss`` comes with its negative, ``-rank loss``: whichever sign the rank loss has, one of
    the two shows on the training line (``-rank loss: 1.2E-02`` is a rank loss of -1.2E-02).
    The evaluation lines print every value, sign included: there ``rank loss`` comes alone."""
    if not reports or not isinstance(reports, list) or not isinstance(reports[0], dict):
        return reports
    sign = None
    out = []
    for report in reports:
        renamed = {}
        for key, value in report.items():
            if sign is None:
                sign = value.new_tensor([-1.0, 1.0])
            if key.startswith("path") and key.endswith(" logprob"):
                renamed[key[: -len(" logprob")] + " nll"] = value * sign
            else:
                renamed[key] = value
            if key == "rank loss" and training:
                renamed["-rank loss"] = value * sign
        out.append(renamed)
    return out


def _check_losses(args, ordmoe: OrdMoEConfig, reports) -> None:
    """``pretrain_gpt.loss_func``'s NaN/Inf and spiky-loss checks, on each micro-batch's OrdMoE loss
    (the loss reports exist on the last pipeline stage only)."""
    if not reports or not isinstance(reports, list) or not isinstance(reports[0], dict):
        return
    if not (args.check_for_nan_in_loss_and_grad or args.check_for_spiky_loss):
        return
    machine = get_rerun_state_machine()
    for report in reports:
        if not any(float(pair[1]) for pair in report.values()):
            continue  # a sequential schedule's path before the last: its micro-batch reports at the last
        loss = report["lm loss"][0]
        if "rank loss" in report:
            loss = loss + ordmoe.rank_loss_coeff * report["rank loss"][0]
        if args.check_for_nan_in_loss_and_grad:
            for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                machine.validate_result(
                    result=loss,
                    rejection_func=reject,
                    message=f"found {what} in local forward loss calculation (OrdMoE)",
                    tolerance=0.0,
                    fatal=True,
                )
        if args.check_for_spiky_loss:
            machine.validate_result(
                result=loss,
                rejection_func=functools.partial(
                    machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"
                ),
                message="Spiky loss",
                tolerance=0.0,
                fatal=False,
            )


def language_model_args(args):
    """Megatron-LM's arguments as the language model reads them. ``pretrain_vlm.py``'s
    ``--num-layers`` is the vision encoder's depth (Megatron-LM sets it from
    ``--encoder-num-layers``) and its language model has ``--decoder-num-layers``:
    ``megatron_lm.vlm`` marks its parser's arguments ``ordmoe_vlm``, and this gives a copy with
    ``num_layers`` the language model's. ``pretrain_gpt.py``'s arguments come back unchanged."""
    if getattr(args, "ordmoe_vlm", False) and getattr(args, "decoder_num_layers", None):
        language = copy.copy(args)
        language.num_layers = args.decoder_num_layers
        language.ordmoe_vlm = False  # already the language model's
        return language
    return args


def shared_prefix_layers(args, ordmoe: Optional[OrdMoEConfig]) -> int:
    """How many leading layers the OrdMoE model runs once for all paths, for Megatron-LM's
    arguments (``OrdMoEConfig.shared_prefix_layers``)."""
    return 0 if ordmoe is None else ordmoe.shared_prefix_layers_of(language_model_args(args))


def lower_path_share(args, ordmoe: OrdMoEConfig) -> float:
    """The share of each micro-batch's sequences the lower paths run on (``m / b``)."""
    return ordmoe.lower_path_rows(args.micro_batch_size) / args.micro_batch_size


def ordmoe_num_floating_point_operations(args, batch_size, base: Optional[Callable] = None, **token_counts) -> float:
    """Megatron-LM's ``num_floating_point_operations`` for an OrdMoE run:
    ``mcore.flops.ordmoe_step_flops`` of ``base(args, batch_size, **token_counts)`` and of the
    shared layers' share of it. ``token_counts`` are core_v0.18's ``seqlen_squared_sum_in_batch``
    and ``total_real_tokens_in_batch`` (Megatron's formula is linear in them as in the batch size,
    so multiplying its result by the paths scales them by the paths too). ``base`` defaults to
    Megatron-LM's function. With ``--no-ordmoe`` or one tier this is Megatron-LM's count."""
    if base is None:
        base = _ORIGINALS.get("num_floating_point_operations")
        if base is None:
            from megatron.training.training import num_floating_point_operations as base
    ordmoe = ordmoe_config_from_args(args) if getattr(args, "ordmoe", False) else None
    if ordmoe is None or not ordmoe.enabled:
        return base(args, batch_size, **token_counts)
    language = language_model_args(args)
    if language is not args:
        # pretrain_vlm.py: Megatron-LM's count, scaled by the language model's OrdMoE factor
        factor = ordmoe_num_floating_point_operations(language, batch_size, base, **token_counts) / base(
            copy.copy(language), batch_size, **token_counts
        )
        return factor * base(args, batch_size, **token_counts)
    shared = shared_prefix_layers(args, ordmoe)
    shared_flops = _layer_flops(base, args, batch_size, list(range(shared)), **token_counts) if shared else 0.0
    plain = base(copy.copy(args), batch_size, **token_counts)
    path_one_only = 0.0  # the MTP block runs on path 1 only
    if getattr(args, "mtp_num_layers", None):
        without_mtp = copy.copy(args)
        without_mtp.mtp_num_layers = None
        path_one_only = plain - base(without_mtp, batch_size, **token_counts)
    return ordmoe_step_flops(plain, shared_flops, ordmoe.num_tiers, lower_path_share(args, ordmoe), path_one_only)


def flops_factor(args, ordmoe: Optional[OrdMoEConfig], base: Optional[Callable] = None) -> float:
    """FLOPs of an OrdMoE step over FLOPs of the plain step (``C`` without a shared prefix)."""
    if ordmoe is None or not ordmoe.enabled:
        return 1.0
    if not shared_prefix_layers(args, ordmoe) and not getattr(args, "mtp_num_layers", None):
        return ordmoe_step_flops(1.0, 0.0, ordmoe.num_tiers, lower_path_share(args, ordmoe))
    if base is None:
        from megatron.training.training import num_floating_point_operations as base
    args = copy.copy(args)
    args.ordmoe = True
    return ordmoe_num_floating_point_operations(args, 1, base) / base(copy.copy(args), 1)


def _layer_flops(base: Callable, args, batch_size, layer_indices: list[int], **token_counts) -> float:
    """FLOPs of the given (0-based) layers alone, from Megatron's formula: the formula is a sum over
    layers plus the output layer, so one layer's share is ``f([l, l]) - f([l])`` and the layers'
    share is ``f(layers) - (2 f([l]) - f([l, l]))``."""
    pattern = moe_layer_pattern(args.num_layers, args.moe_layer_freq) if args.num_experts else [0] * args.num_layers

    def f(indices):
        sub = copy.copy(args)  # Megatron-LM's formula sets attributes on the args it gets
        sub.num_layers = len(indices)
        sub.moe_layer_freq = [pattern[i] for i in indices]
        sub.mtp_num_layers = None
        return base(sub, batch_size, **token_counts)

    first = layer_indices[0]
    output_layer = 2 * f([first]) - f([first, first])
    return f(layer_indices) - output_layer


def _num_floating_point_operations(args, batch_size, **token_counts):
    return ordmoe_num_floating_point_operations(
        args, batch_size, _ORIGINALS["num_floating_point_operations"], **token_counts
    )
