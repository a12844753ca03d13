"""Megatron-LM integration: ``pretrain_gpt.py --ordmoe ...`` with Megatron-LM's own training loop.

Target: Megatron-LM at tag ``core_v0.16.1``. Two ways in, both using only the pieces below:

- ``patches/megatron-lm-core_v0.16.1-ordmoe.patch`` (``git apply`` in the Megatron-LM checkout)
  changes two arguments of the ``pretrain(...)`` call in ``pretrain_gpt.py``;
- ``examples/pretrain_gpt_ordmoe.py`` makes the same call without patching (Megatron-LM on
  ``PYTHONPATH``).

The user's ``forward_step``, ``loss_func``, data pipeline and model builder stay Megatron-LM's.
With ``--no-ordmoe`` (the default) nothing changes at all: the argument hook returns the parsed
arguments untouched, the builder calls Megatron-LM's builder as it is, and ``install`` is never
called, so no name in Megatron-LM is replaced.

The hooks, each thin around the package:

1. **Arguments** -- ``extra_args_provider(existing)`` is an ``extra_args_provider`` for
   ``pretrain(...)`` that composes with an existing one (``add_modelopt_args``): it adds the OrdMoE
   flags (``arguments.add_ordmoe_args``) and ``--ordmoe-dry-run``, and hooks the parser so that,
   right after parsing (before Megatron-LM validates the arguments, builds a tokenizer or starts
   torch.distributed):

   - with ``--ordmoe``, ``validate_ordmoe_args`` builds the ``OrdMoEConfig`` and checks it against
     the ``TransformerConfig`` that Megatron-LM's own ``core_transformer_config_from_args`` makes
     (on a validated copy of the arguments); a bad setting ends the program with
     ``pretrain_gpt.py: error: <message naming the flag>`` and exit status 2;
   - with ``--ordmoe-dry-run``, the resolved configuration, parallel layout and tier layout are
     printed (rank 0) and the program exits 0 without building anything;
   - with ``--ordmoe``, ``install(args)`` is called (3.).

   When the command line has ``--ordmoe...`` flags, ``extra_args_provider(...)`` also parses it
   once right away, when ``pretrain_gpt.py`` builds the ``pretrain(...)`` call (Megatron-LM's
   ``inprocess_restart`` parses it there too): ``initialize_megatron`` asserts CUDA before it parses
   anything, so this is what lets a bad flag and ``--ordmoe-dry-run`` be reported on a machine
   without a GPU (a login node, CI).

2. **Model** -- ``ordmoe_builder(gpt_builder)`` wraps Megatron-LM's ``gpt_builder`` (use it as
   ``partial(model_provider, ordmoe_builder(gpt_builder))``). With ``--ordmoe`` it runs
   ``gpt_builder`` itself, so the layer spec is exactly the one Megatron-LM picks (local,
   Transformer Engine, decoder-block with dense and MoE layers, ``--spec``), with the builder
   module's name ``GPTModel`` bound to ``OrdMoEGPTModel(..., ordmoe=cfg)`` for the duration of the
   call; ``OrdMoEGPTModel`` swaps the routers itself.

3. **Schedules and FLOPs** -- ``install(args)`` rebinds two names in
   ``megatron.training.training``'s namespace, which is where ``train()`` and ``evaluate()`` look
   them up:

   - ``get_forward_backward_func`` -> ``schedules.get_ordmoe_forward_backward_func`` around
     Megatron's own (point-to-point shapes sized for ``C * micro_batch_size``; the loss that
     ``forward_step`` returns as ``partial(loss_func, loss_mask, ...)`` becomes ``ordmoe_loss``
     with the same mask). ``pretrain_gpt.loss_func``'s NaN/Inf and spiky-loss checks are kept:
     they run on the OrdMoE loss reports through Megatron's rerun state machine. Megatron-LM's
     training log prints every report key whose average is positive: ``lm loss`` (path 1),
     ``tier order acc``, ``rank loss`` when positive, and each path's mean log-likelihood as its
     negative, ``pathJ nll`` (all keys, signs included, go to TensorBoard/W&B and the evaluation
     lines). With ``--ordmoe-num-tiers 1`` Megatron's function is returned as it is.
   - ``num_floating_point_operations`` -> ``ordmoe_num_floating_point_operations``: the paths
     share nothing but weights, so every path costs a full forward and backward. The count is
     ``C`` times Megatron's count for the same batch, less ``C - 1`` times the layers before the
     first tier-routed layer when the model runs those once (lazy fan-out: no pipelining, no full
     recompute, first tier-routed layer ``L > 1``). Throughput (TFLOP/s/GPU) in Megatron-LM's log
     therefore counts the real work.

   ``install`` is idempotent and ``uninstall()`` restores Megatron-LM's names. Call ``install``
   yourself only when you drive ``megatron.training`` without the argument hook (e.g. with
   ``parsed_args``).

Refused with ``--ordmoe`` (besides what ``OrdMoEConfig.validate_for_model`` refuses):
``--use-legacy-models`` (not a Megatron-Core model), ``--overlap-moe-expert-parallel-comm``
(``forward_step`` then builds a schedule plan that bypasses the fan-out), ``--yaml-cfg``
(arguments come from the YAML file after the hook has run).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import os
import sys
import types
import warnings
from typing import Callable, Optional

from ordmoe_megatron.arguments import add_ordmoe_args, ordmoe_config_from_args
from ordmoe_megatron.config import OrdMoEConfig

__all__ = [
    "OrdMoEArgumentError",
    "add_ordmoe_megatron_args",
    "extra_args_provider",
    "validate_ordmoe_args",
    "ordmoe_builder",
    "install",
    "uninstall",
    "is_installed",
    "ordmoe_num_floating_point_operations",
    "shared_prefix_layers",
    "flops_factor",
    "megatron_validated_args",
    "describe_run",
    "main",
]

SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py's: a loss 10x the largest seen is "spiky"


class OrdMoEArgumentError(ValueError):
    """An OrdMoE setting the run cannot honour; the message names the flag."""


# --------------------------------------------------------------------------------------------
# 1. arguments
# --------------------------------------------------------------------------------------------
def add_ordmoe_megatron_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the OrdMoE flags, ``--ordmoe-dry-run``, and the
    post-parse hook (validation, dry run, ``install``). Returns ``parser``."""
    add_ordmoe_args(parser)
    _add_dry_run_flag(parser)
    _hook_parser(parser)
    return parser


def _add_dry_run_flag(parser: argparse.ArgumentParser) -> None:
    group = next((g for g in parser._action_groups if g.title == "OrdMoE"), parser)
    group.add_argument("--ordmoe-dry-run", action="store_true", default=False,
                       help="Print the resolved configuration, the parallel layout and the OrdMoE tier "
                            "layout, then exit without building anything (works without a GPU).")


def extra_args_provider(existing: Optional[Callable] = None, check_now: bool = True) -> Callable:
    """An ``extra_args_provider`` adding the OrdMoE flags after ``existing`` (may be None).

    With ``check_now`` and an ``--ordmoe...`` flag on the command line, the arguments are parsed
    right away with this provider (as Megatron-LM's ``inprocess_restart`` already does before
    ``pretrain``), so that bad OrdMoE settings and ``--ordmoe-dry-run`` are dealt with before
    ``pretrain`` initializes anything, on machines without a GPU too (``initialize_megatron``
    refuses to parse arguments without CUDA). Without ``--ordmoe`` flags nothing is parsed here.
    """

    def provider(parser):
        if existing is not None:
            parser = existing(parser)
        return add_ordmoe_megatron_args(parser)

    if check_now and any(a.startswith("--ordmoe") for a in sys.argv[1:]):
        from megatron.training.arguments import parse_args

        parse_args(provider)  # the parser hook validates, dry-runs (and exits), or installs
    return provider


def _hook_parser(parser: argparse.ArgumentParser) -> None:
    """Run ``_after_parse`` once per parse, on ``parse_args`` and ``parse_known_args`` alike."""
    if getattr(parser, "_ordmoe_hooked", False):
        return
    parser._ordmoe_hooked = True
    parse_args, parse_known_args = parser.parse_args, parser.parse_known_args
    state = {"inside": False}

    def hooked_parse_args(*a, **kw):
        state["inside"] = True
        try:
            args = parse_args(*a, **kw)
        finally:
            state["inside"] = False
        return _after_parse(parser, args)

    def hooked_parse_known_args(*a, **kw):
        args, rest = parse_known_args(*a, **kw)
        if state["inside"]:
            return args, rest
        return _after_parse(parser, args), rest

    parser.parse_args = hooked_parse_args
    parser.parse_known_args = hooked_parse_known_args


def _after_parse(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    dry_run = getattr(args, "ordmoe_dry_run", False)
    if not args.ordmoe and not dry_run:
        return args  # --no-ordmoe: untouched
    try:
        ordmoe, config, validated = _validate(args, need_model_config=dry_run)
    except OrdMoEArgumentError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if dry_run:
        if _rank() == 0:
            print(describe_run(validated, ordmoe, config), flush=True)
        parser.exit(0)
    install(args)
    return args


def validate_ordmoe_args(args: argparse.Namespace) -> Optional[OrdMoEConfig]:
    """The validated ``OrdMoEConfig`` for parsed Megatron-LM arguments (None with --no-ordmoe).

    Raises ``OrdMoEArgumentError`` naming the flag for a bad OrdMoE flag, for a Megatron-LM option
    OrdMoE refuses, and for a model the tier router cannot honour (checked on the
    ``TransformerConfig`` from Megatron-LM's ``core_transformer_config_from_args``, made from a
    validated copy of ``args``). When Megatron-LM's own validation rejects the arguments, the
    model-level check is left to the model build and Megatron-LM reports its own error.
    """
    if not args.ordmoe:
        return None
    return _validate(args, need_model_config=False)[0]


def _validate(args, need_model_config: bool):
    ordmoe = None
    if args.ordmoe:
        try:
            ordmoe = ordmoe_config_from_args(args)
        except ValueError as err:
            raise OrdMoEArgumentError(str(err)) from None
        for refused, message in (
            (getattr(args, "use_legacy_models", False),
             "--use-legacy-models: OrdMoE needs the Megatron-Core GPTModel; remove --use-legacy-models"),
            (getattr(args, "overlap_moe_expert_parallel_comm", False),
             "--overlap-moe-expert-parallel-comm makes forward_step build a schedule plan that bypasses the "
             "OrdMoE paths; remove it with --ordmoe"),
            (getattr(args, "yaml_cfg", None) is not None,
             "--yaml-cfg replaces the command-line arguments after OrdMoE has read them; pass the model "
             "flags on the command line with --ordmoe"),
        ):
            if refused:
                raise OrdMoEArgumentError(message)
    try:
        validated = megatron_validated_args(args)
        config = _transformer_config(validated)
    except Exception as err:  # Megatron-LM's own validation: it reports this itself later
        if need_model_config:
            raise OrdMoEArgumentError(
                f"Megatron-LM rejects these arguments: {type(err).__name__}: {err}"
            ) from None
        return ordmoe, None, None
    if ordmoe is not None:
        from ordmoe_megatron.model import moe_layer_numbers

        try:
            ordmoe.validate_for_model(config, moe_layer_numbers(config))
        except ValueError as err:
            raise OrdMoEArgumentError(str(err)) from None
    return ordmoe, config, validated


def megatron_validated_args(args: argparse.Namespace, defaults: Optional[dict] = None) -> argparse.Namespace:
    """A copy of ``args`` after Megatron-LM's ``validate_args`` (output silenced; ``args`` itself
    is not touched). Without a GPU, Megatron's compute-capability checks (``--moe-grouped-gemm``,
    MoE communication overlap) see an sm_90 GPU, so launch configurations can be checked on a CPU
    machine."""
    from megatron.training.arguments import validate_args

    import torch

    copied = copy.deepcopy(args)
    # Megatron-LM's parse_args sets these after the parser (and its hook) returns.
    if not hasattr(copied, "rank"):
        copied.rank = int(os.getenv("RANK", "0"))
    if not hasattr(copied, "world_size"):
        copied.world_size = int(os.getenv("WORLD_SIZE", "1"))
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings.catch_warnings(), _assume_gpu_capability(torch):
        warnings.simplefilter("ignore")
        validate_args(copied, defaults or {})
    return copied


@contextlib.contextmanager
def _assume_gpu_capability(torch):
    if torch.cuda.is_available():
        yield
        return
    hopper = types.SimpleNamespace(name="assumed sm_90 GPU (no GPU here)", major=9, minor=0,
                                   total_memory=80 * 2**30, multi_processor_count=132)
    originals = {"get_device_capability": torch.cuda.get_device_capability,
                 "get_device_properties": torch.cuda.get_device_properties}
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_properties = lambda device=None: hopper
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(torch.cuda, name, value)


def _transformer_config(validated_args):
    """Megatron-LM's ``core_transformer_config_from_args``. Without a GPU, where its checks can
    fail for want of Transformer Engine or CUDA (``--apply-rope-fusion``, FP8, ...), the fields are
    read the same way (same names, ``num_moe_experts`` from ``--num-experts``) without those
    checks, and ``skipped_checks`` on the result says why."""
    import torch
    from megatron.training.arguments import core_transformer_config_from_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return core_transformer_config_from_args(validated_args)
        except Exception as err:
            if torch.cuda.is_available():
                raise
            skipped = f"{type(err).__name__}: {err}"
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    fields = {}
    for f in dataclasses.fields(TransformerConfig):
        if hasattr(validated_args, f.name):
            fields[f.name] = getattr(validated_args, f.name)
        elif f.default is not dataclasses.MISSING:
            fields[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = f.default_factory()
    fields["num_moe_experts"] = validated_args.num_experts
    if fields.get("moe_ffn_hidden_size") is None:
        fields["moe_ffn_hidden_size"] = validated_args.ffn_hidden_size
    return types.SimpleNamespace(**fields, skipped_checks=skipped)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------
def describe_run(args: argparse.Namespace, ordmoe: Optional[OrdMoEConfig], config) -> str:
    """The ``--ordmoe-dry-run`` report: configuration, parallel layout and tier layout."""
    from ordmoe_megatron.model import moe_layer_numbers

    a = args
    world = a.world_size
    tp, pp, cp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size
    dp = a.data_parallel_size
    ep, etp = a.expert_model_parallel_size, a.expert_tensor_parallel_size
    paths = ordmoe.num_tiers if ordmoe is not None else 1
    num_micro = a.global_batch_size // (a.micro_batch_size * dp)
    if a.fp8:
        precision = f"fp8 {a.fp8} (recipe {getattr(a, 'fp8_recipe', 'delayed')}), params {_dtype(a.params_dtype)}"
    else:
        precision = _dtype(a.params_dtype)
    moe = moe_layer_numbers(config) if config.num_moe_experts else []
    lines = [
        "OrdMoE dry run (Megatron-LM): arguments parsed and validated; nothing was built.",
        "configuration:",
        f"  model: {a.num_layers} layers, hidden {a.hidden_size}, ffn {a.ffn_hidden_size}, "
        f"{a.num_attention_heads} heads"
        + (f" ({a.num_query_groups} query groups)" if a.group_query_attention else "")
        + f", seq length {a.seq_length}, max positions {a.max_position_embeddings}",
        f"  moe: {config.num_moe_experts or 0} experts, top-{config.moe_router_topk}, expert ffn "
        f"{config.moe_ffn_hidden_size}, shared expert {config.moe_shared_expert_intermediate_size or 0}, "
        f"{len(moe)} MoE layers, router {config.moe_router_score_function}"
        f"{' pre-softmax' if config.moe_router_pre_softmax else ''}, balancing "
        f"{config.moe_router_load_balancing_type} (coeff {config.moe_aux_loss_coeff}), dispatcher "
        f"{config.moe_token_dispatcher_type}, grouped gemm {bool(a.moe_grouped_gemm)}",
        f"  implementation: {a.transformer_impl}, precision {precision}",
        *([f"  (no GPU here: TransformerConfig checks that need one were skipped: {config.skipped_checks})"]
          if getattr(config, "skipped_checks", None) else []),
        f"  training: micro batch {a.micro_batch_size}, global batch {a.global_batch_size}, "
        f"{num_micro} micro-batches per step, {a.train_iters} iterations, lr {a.lr}",
        "parallel layout:",
        f"  world size {world} = TP {tp} x PP {pp} x CP {cp} x DP {dp}",
        f"  experts: EP {ep} x expert TP {etp} x expert DP {world // (pp * ep * etp)} "
        f"({(config.num_moe_experts or 0) // ep} experts per EP rank)",
        f"  sequence parallel {bool(a.sequence_parallel)}, virtual pipeline stages "
        f"{a.virtual_pipeline_model_parallel_size or 1}, layers per pipeline stage {a.num_layers // pp}, "
        f"distributed optimizer {bool(a.use_distributed_optimizer)}",
        f"  activations between pipeline stages: [{a.seq_length // (tp if a.sequence_parallel else 1)}, "
        f"{paths} x {a.micro_batch_size}, {a.hidden_size}]",
        "tier layout:",
    ]
    if ordmoe is None:
        lines.append("  OrdMoE off (--no-ordmoe): plain top-K training")
        return "\n".join(lines)
    from ordmoe_megatron.tiers import format_tiers

    tiers = ordmoe.tiers(config.num_moe_experts, config.moe_router_topk)
    scoped = [l for l in moe if ordmoe.in_scope(l)]
    shared = shared_prefix_layers(a, ordmoe)
    lines += [
        f"  {ordmoe.describe(config.num_moe_experts, config.moe_router_topk)}",
        f"  tiers (routing ranks): {format_tiers(tiers)}",
    ]
    for j, (ranks, reward) in enumerate(zip(tiers, ordmoe.rewards), start=1):
        lines.append(f"    tier {j}: ranks {format_tiers([ranks])} ({len(ranks)} experts), reward {reward:g}")
    lines += [
        f"  tier-routed MoE layers: {_ranges(scoped)}",
        f"  paths per sequence: {paths}; fan-out "
        + (f"before layer {shared + 1} (layer{'s 1-' if shared > 1 else ' '}{shared} run{'' if shared > 1 else 's'} once)"
           if shared else "at the embedding"),
        f"  loss: lm loss (path 1) + {ordmoe.rank_loss_coeff:g} x rank loss ({ordmoe.advantage} advantages)"
        + ("" if ordmoe.logprob_floor is None else f", log-likelihood floor {ordmoe.logprob_floor}"),
        "  FLOPs counted per step: " + _flops_factor_text(a, ordmoe),
    ]
    return "\n".join(lines)


def _flops_factor_text(args, ordmoe: OrdMoEConfig) -> str:
    args = copy.copy(args)
    if getattr(args, "padded_vocab_size", None) is None:
        if args.vocab_size is None:  # the tokenizer decides; a dry run does not load it
            return (f"{ordmoe.num_tiers} x the plain model's, less the layers run once "
                    "(exact factor needs the tokenizer's vocabulary size)")
        multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
        args.padded_vocab_size = -(-args.vocab_size // multiple) * multiple
    return f"{flops_factor(args, ordmoe):.3f} x the plain model's"


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for l in layers[1:] + [None]:
        if l is not None and l == prev + 1:
            prev = l
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if l is not None:
            start = prev = l
    return ",".join(out)


# --------------------------------------------------------------------------------------------
# 2. model
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
        ordmoe = ordmoe_config_from_args(args)
        with _gpt_model_bound_to_ordmoe(builder, ordmoe):
            model = builder(args, *rest, **kwargs)
        from ordmoe_megatron.model import OrdMoEGPTModel

        if not isinstance(model, OrdMoEGPTModel):
            raise TypeError(
                f"--ordmoe: {builder.__module__}.{builder.__name__} returned {type(model).__name__}, not a GPTModel "
                "built through its module's GPTModel name (legacy models and ModelOpt builders are not supported)"
            )
        return model

    return build


@contextlib.contextmanager
def _gpt_model_bound_to_ordmoe(builder: Callable, ordmoe: OrdMoEConfig):
    from ordmoe_megatron.model import OrdMoEGPTModel

    module = sys.modules.get(getattr(builder, "__module__", None) or "")
    if module is None or not hasattr(module, "GPTModel"):
        raise TypeError(
            f"--ordmoe: cannot find the name GPTModel in the module of {builder!r}; wrap a builder that "
            "constructs GPTModel (such as Megatron-LM's gpt_builders.gpt_builder), or build "
            "ordmoe_megatron.model.OrdMoEGPTModel(config, spec, ..., ordmoe=cfg) yourself"
        )
    original = module.GPTModel

    def build_ordmoe_gpt_model(*args, **kwargs):
        return OrdMoEGPTModel(*args, ordmoe=ordmoe, **kwargs)

    module.GPTModel = build_ordmoe_gpt_model
    try:
        yield
    finally:
        module.GPTModel = original


# --------------------------------------------------------------------------------------------
# 3. schedules and FLOPs
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
                raise RuntimeError(
                    f"ordmoe_megatron.megatron_lm.install: megatron.training.training.{name} not found; "
                    "this Megatron-LM version is not supported (target: core_v0.16.1)"
                )
            _ORIGINALS[name] = getattr(training, name)
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


def _get_forward_backward_func(*unused_args, **unused_kwargs):
    """``get_forward_backward_func`` as ``train()`` and ``evaluate()`` call it (no arguments)."""
    args = _current_args()
    ordmoe = ordmoe_config_from_args(args)
    if ordmoe is None or not ordmoe.enabled:
        return _ORIGINALS["get_forward_backward_func"](*unused_args, **unused_kwargs)
    from ordmoe_megatron.schedules import get_ordmoe_forward_backward_func

    forward_backward = get_ordmoe_forward_backward_func(
        ordmoe, args.padded_vocab_size, per_token_loss=args.calculate_per_token_loss
    )

    @functools.wraps(forward_backward)
    def checked_forward_backward(**kwargs):
        reports = forward_backward(**kwargs)
        _check_losses(args, ordmoe, reports)
        return _loggable(reports)

    return checked_forward_backward


def _loggable(reports):
    """Megatron-LM's console log prints only positive averages, so each path's mean log-likelihood
    is reported as its negative, ``pathJ nll`` (the evaluation lines' "PPL" of it is then the
    path's perplexity). ``rank loss`` keeps its sign: when negative (tier 1 ahead) it shows in
    TensorBoard/W&B and the evaluation lines but not in the training line."""
    if not reports or not isinstance(reports, list) or not isinstance(reports[0], dict):
        return reports
    out = []
    for report in reports:
        renamed = {}
        for key, value in report.items():
            if key.startswith("path") and key.endswith(" logprob"):
                renamed[key[: -len(" logprob")] + " nll"] = value * value.new_tensor([-1.0, 1.0])
            else:
                renamed[key] = value
        out.append(renamed)
    return out


def _check_losses(args, ordmoe: OrdMoEConfig, reports) -> None:
    """``pretrain_gpt.loss_func``'s NaN/Inf and spiky-loss checks, on each micro-batch's OrdMoE loss
    (the loss reports exist on the last pipeline stage only)."""
    if not reports or not isinstance(reports, list) or not isinstance(reports[0], dict):
        return
    if not (args.check_for_nan_in_loss_and_grad or args.check_for_spiky_loss):
        return
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    for report in reports:
        loss = report["lm loss"][0]
        if "rank loss" in report:
            loss = loss + ordmoe.rank_loss_coeff * report["rank loss"][0]
        if args.check_for_nan_in_loss_and_grad:
            import torch

            for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                machine.validate_result(result=loss, rejection_func=reject,
                                        message=f"found {what} in local forward loss calculation (OrdMoE)",
                                        tolerance=0.0, fatal=True)
        if args.check_for_spiky_loss:
            machine.validate_result(
                result=loss,
                rejection_func=functools.partial(machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                                 context="loss"),
                message="Spiky loss", tolerance=0.0, fatal=False,
            )


def shared_prefix_layers(args, ordmoe: Optional[OrdMoEConfig]) -> int:
    """How many leading layers the OrdMoE model runs once for all paths (lazy fan-out), mirroring
    ``OrdMoEGPTModel``'s rule: 0 with pipelining, full recompute, ``--no-ordmoe-lazy-fanout`` or a
    tier-routed first layer."""
    if ordmoe is None or not ordmoe.enabled or not ordmoe.lazy_fanout:
        return 0
    if args.pipeline_model_parallel_size > 1 or getattr(args, "recompute_granularity", None) == "full":
        return 0
    from ordmoe_megatron.model import moe_layer_numbers

    layers = types.SimpleNamespace(num_layers=args.num_layers, moe_layer_freq=args.moe_layer_freq)
    scoped = [l for l in moe_layer_numbers(layers) if ordmoe.in_scope(l)]
    return min(scoped) - 1 if scoped else 0


def ordmoe_num_floating_point_operations(args, batch_size, base: Optional[Callable] = None) -> float:
    """Megatron-LM's ``num_floating_point_operations`` for an OrdMoE run.

    ``C * base(args, batch_size)`` (each path is a full forward and backward of every layer and of
    the output layer), less ``(C - 1)`` times the FLOPs of the ``shared_prefix_layers`` that the
    model runs once. ``base`` defaults to Megatron-LM's function. With ``--no-ordmoe`` or one tier
    this is ``base(args, batch_size)``.
    """
    if base is None:
        base = _ORIGINALS.get("num_floating_point_operations")
        if base is None:
            from megatron.training.training import num_floating_point_operations as base
    ordmoe = ordmoe_config_from_args(args) if getattr(args, "ordmoe", False) else None
    if ordmoe is None or not ordmoe.enabled:
        return base(args, batch_size)
    paths = ordmoe.num_tiers
    total = base(args, batch_size * paths)
    shared = shared_prefix_layers(args, ordmoe)
    if shared:
        total -= (paths - 1) * _layer_flops(base, args, batch_size, list(range(shared)))
    return total


def flops_factor(args, ordmoe: Optional[OrdMoEConfig], base: Optional[Callable] = None) -> float:
    """FLOPs of an OrdMoE step over FLOPs of the plain step (``C`` without a shared prefix)."""
    if ordmoe is None or not ordmoe.enabled:
        return 1.0
    shared = shared_prefix_layers(args, ordmoe)
    if not shared:
        return float(ordmoe.num_tiers)
    if base is None:
        from megatron.training.training import num_floating_point_operations as base
    args = copy.copy(args)
    args.ordmoe = True
    return ordmoe_num_floating_point_operations(args, 1, base) / base(args, 1)


def _layer_pattern(args) -> list[int]:
    freq = args.moe_layer_freq
    if args.num_experts is None:
        return [0] * args.num_layers
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(args.num_layers)]
    return list(freq)


def _layer_flops(base: Callable, args, batch_size, layer_indices: list[int]) -> float:
    """FLOPs of the given (0-based) layers alone, from Megatron's formula: the formula is a sum over
    layers plus the output layer, so one layer's share is ``f([l, l]) - f([l])`` and the layers'
    share is ``f(layers) - (2 f([l]) - f([l, l]))``."""
    pattern = _layer_pattern(args)

    def f(indices):
        sub = copy.copy(args)  # Megatron-LM's formula sets attributes on the args it gets
        sub.num_layers = len(indices)
        sub.moe_layer_freq = [pattern[i] for i in indices]
        sub.mtp_num_layers = None
        return base(sub, batch_size)

    first = layer_indices[0]
    output_layer = 2 * f([first]) - f([first, first])
    return f(layer_indices) - output_layer


def _num_floating_point_operations(args, batch_size):
    return ordmoe_num_floating_point_operations(args, batch_size, _ORIGINALS["num_floating_point_operations"])


def main(argv=None) -> int:
    """``python -m ordmoe_megatron.megatron_lm --help``: the flags the Megatron-LM hook adds
    (``pretrain_gpt.py --help`` lists Megatron-LM's own only: ``inprocess_restart`` prints the help
    before the OrdMoE flags are added)."""
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py <Megatron-LM flags>",
        description="OrdMoE flags of the Megatron-LM integration (ordmoe_megatron.megatron_lm).",
    )
    add_ordmoe_args(parser)
    _add_dry_run_flag(parser)
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
