"""Megatron-LM arguments: the OrdMoE flags in ``pretrain_gpt.py``'s parser, checked right after parsing.

``extra_args_provider(existing)`` is an ``extra_args_provider`` for ``pretrain(...)`` that
composes with an existing one (``add_modelopt_args``): it adds the OrdMoE flags
(``flags.add_ordmoe_args``) and ``--ordmoe-dry-run``, and hooks the parser so that, right after
parsing (before Megatron-LM validates the arguments, builds a tokenizer or starts
torch.distributed):

- with ``--ordmoe``, ``validate_ordmoe_args`` builds the ``OrdMoEConfig`` and checks it against
  the ``TransformerConfig`` that Megatron-LM's own ``core_transformer_config_from_args`` makes (on
  a validated copy of the arguments); a bad setting ends the program with
  ``pretrain_gpt.py: error: <message naming the flag>`` and exit status 2;
- with ``--ordmoe-dry-run``, the resolved configuration, parallel layout and tier layout are
  printed (rank 0) and the program exits 0 without building anything;
- with ``--ordmoe``, ``hooks.install(args)`` is called.

When the command line has ``--ordmoe...`` flags, ``extra_args_provider(...)`` also parses it once
right away, when ``pretrain_gpt.py`` builds the ``pretrain(...)`` call (Megatron-LM's
``inprocess_restart`` parses it there too): ``initialize_megatron`` asserts CUDA before it parses
anything, so this is what lets a bad flag and ``--ordmoe-dry-run`` be reported on a machine
without a GPU (a login node, CI).

Refused with ``--ordmoe`` (besides what ``OrdMoEConfig.validate_for_model`` refuses):
``--use-legacy-models`` (not a Megatron-Core model), ``--overlap-moe-expert-parallel-comm``
(``forward_step`` then builds a schedule plan that bypasses the fan-out), ``--yaml-cfg``
(arguments come from the YAML file after the hook has run), a ``--load`` checkpoint with
``qk_layernorm_scope='projection'`` (an imported OLMoE: Megatron-LM's layer spec has per-head q/k
norms).

``megatron.training`` is Megatron-LM's, not megatron-core's: it is imported where it is used, so
this module imports (and its tests run) without a Megatron-LM checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import os
import sys
import types
import warnings
from typing import Callable, Optional

import torch
from megatron.core.transformer import TransformerConfig

from ordmoe_megatron.errors import OrdMoEError
from ordmoe_megatron.flags import add_ordmoe_args, ordmoe_config_from_args
from ordmoe_megatron.megatron_lm import dry_run, hooks
from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.runtime import compat
from ordmoe_megatron.runtime.bridges import assumed_gpu_capability
from ordmoe_megatron.runtime.checkpointing import (
    checkpoint_dir,
    checkpoint_model_flags,
    has_checkpoint,
    inspect_checkpoint,
    latest_iteration,
)


def add_ordmoe_megatron_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the OrdMoE flags, ``--ordmoe-dry-run``, and the
    post-parse hook (validation, dry run, ``install``). Returns ``parser``."""
    add_ordmoe_args(parser)
    add_dry_run_flag(parser)
    _hook_parser(parser)
    return parser


def add_dry_run_flag(parser: argparse.ArgumentParser) -> None:
    group = next((g for g in parser._action_groups if g.title == "OrdMoE"), parser)
    group.add_argument(
        "--ordmoe-dry-run",
        action="store_true",
        default=False,
        help="Print the resolved configuration, the parallel layout and the OrdMoE tier "
        "layout, then exit without building anything (works without a GPU).",
    )


def extra_args_provider(existing: Optional[Callable] = None, check_now: bool = True) -> Callable:
    """An ``extra_args_provider`` adding the OrdMoE flags after ``existing`` (may be None).

    With ``check_now`` and an ``--ordmoe...`` flag on the command line, the arguments are parsed
    right away with this provider (see the module docstring). Without ``--ordmoe`` flags nothing
    is parsed here.
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
    want_dry_run = getattr(args, "ordmoe_dry_run", False)
    if not args.ordmoe and not want_dry_run:
        return args  # --no-ordmoe: untouched
    try:  # the one place the Megatron-LM hook turns a refusal into its exit message
        check_load(args)
        ordmoe, config, validated = validate(args, need_model_config=want_dry_run)
    except OrdMoEError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if want_dry_run:
        if int(os.environ.get("RANK", "0")) == 0:
            print(dry_run.describe_run(validated, ordmoe, config), flush=True)
        parser.exit(0)
    hooks.install(args)
    return args


def check_load(args: argparse.Namespace) -> None:
    """The checkpoint ``--load`` names is whole (the check every front end makes), before
    Megatron-LM builds anything. Megatron-LM's legacy ``torch`` format (``mp_rank_*`` folders)
    is Megatron-LM's own to check. A checkpoint whose q/k norms span the whole projection
    (``qk_layernorm_scope='projection'``, an imported OLMoE) is refused: ``pretrain_gpt.py``
    builds megatron-core's own layer spec, whose q/k norms are per head."""
    load = getattr(args, "load", None)
    if not load or not has_checkpoint(load):
        return
    path = checkpoint_dir(load, latest_iteration(load, "--load"))
    if os.path.isdir(path) and any(name.startswith("mp_rank_") for name in os.listdir(path)):
        return
    inspect_checkpoint(load, "--load")
    scope = (checkpoint_model_flags(load, "--load") or {}).get("qk_layernorm_scope", "head")
    if scope != "head":
        raise OrdMoEError(
            f"--load {load}: its model normalises q and k over the whole projection (qk_layernorm_scope="
            f"{scope!r}, OLMoE's q/k norm); pretrain_gpt.py builds megatron-core's per-head q/k norm: train "
            "it with ordmoe-pretrain --load"
        )


def validate_ordmoe_args(args: argparse.Namespace) -> Optional[OrdMoEConfig]:
    """The validated ``OrdMoEConfig`` for parsed Megatron-LM arguments (None with --no-ordmoe).

    Raises ``OrdMoEError`` naming the flag for a bad OrdMoE flag, for a Megatron-LM option
    OrdMoE refuses, and for a model the tier router cannot honour (checked on the
    ``TransformerConfig`` from Megatron-LM's ``core_transformer_config_from_args``, made from a
    validated copy of ``args``). When Megatron-LM's own validation rejects the arguments, the
    model-level check is left to the model build and Megatron-LM reports its own error.
    """
    if not args.ordmoe:
        return None
    return validate(args, need_model_config=False)[0]


def validate(args, need_model_config: bool):
    """``(OrdMoEConfig or None, TransformerConfig or None, validated args or None)``."""
    ordmoe = None
    if args.ordmoe:
        ordmoe = ordmoe_config_from_args(args)
        ordmoe.check_pipeline(
            getattr(args, "micro_batch_size", 1) or 1,
            getattr(args, "pipeline_model_parallel_size", 1) or 1,
            bool(
                getattr(args, "num_layers_per_virtual_pipeline_stage", None)
                or getattr(args, "virtual_pipeline_model_parallel_size", None)
            ),
        )
        for refused, message in (
            (
                getattr(args, "use_legacy_models", False),
                "--use-legacy-models: OrdMoE needs the Megatron-Core GPTModel; remove --use-legacy-models",
            ),
            (
                getattr(args, "overlap_moe_expert_parallel_comm", False),
                "--overlap-moe-expert-parallel-comm makes forward_step build a schedule plan that bypasses the "
                "OrdMoE paths; remove it with --ordmoe",
            ),
            (
                bool(getattr(args, "tp_comm_overlap", False)),
                "--tp-comm-overlap sizes Transformer Engine's buffers for seq x micro-batch, not the stacked or "
                "sub-sampled OrdMoE paths: remove it with --ordmoe",
            ),
            (
                getattr(args, "cuda_graph_impl", "none") not in ("none", None)
                or bool(getattr(args, "enable_cuda_graph", False) or getattr(args, "external_cuda_graph", False)),
                "--cuda-graph-impl / --enable-cuda-graph / --external-cuda-graph: CUDA graphs skip the module "
                "hooks the OrdMoE paths need and replay one path state for every micro-batch; remove them with "
                "--ordmoe",
            ),
            (
                bool(getattr(args, "fp8", None)) and importlib.util.find_spec("transformer_engine") is None,
                f"--fp8-format {getattr(args, 'fp8', None)} needs Transformer Engine, which is not installed "
                "here: install it (pip install transformer-engine) or drop --fp8-format",
            ),
            (
                bool(getattr(args, "dataloader_inter_document_masking", False)) and not getattr(args, "sft", False),
                "--dataloader-inter-document-masking packs pretraining documents in a way the OrdMoE paths are "
                "not tested with: remove it with --ordmoe (--sft packs chat data and is supported)",
            ),
            (
                getattr(args, "yaml_cfg", None) is not None,
                "--yaml-cfg replaces the command-line arguments after OrdMoE has read them; pass the model "
                "flags on the command line with --ordmoe",
            ),
        ):
            if refused:
                raise OrdMoEError(message)
        if getattr(args, "sft", False):
            check_sft(args, ordmoe)
    try:
        validated = megatron_validated_args(args)
        config = transformer_config(hooks.language_model_args(validated))
    except Exception as err:  # Megatron-LM's own validation: it reports this itself later
        if need_model_config:
            raise OrdMoEError(f"Megatron-LM rejects these arguments: {type(err).__name__}: {err}") from None
        return ordmoe, None, None
    if ordmoe is not None:
        ordmoe.validate_for_model(config)
    return ordmoe, config, validated


# Megatron-LM's SFT prompt formats (SFTTokenizer) that mask the system and user turns: the rank
# loss is per response over the answer tokens. "default" and "identity" mask nothing.
SFT_ANSWER_ONLY_FORMATS = ("nemotron-h-aligned", "nemotron-nano-v2")


def check_sft(args, ordmoe: OrdMoEConfig) -> None:
    """``--sft`` (Megatron-LM's SFTDataset: each micro-batch packed into one THD row) with
    ``--ordmoe``: an answer-only prompt format, and what the packed paths cannot run."""
    prompt_format = getattr(args, "sft_tokenizer_prompt_format", "nemotron-h-aligned")
    if prompt_format not in SFT_ANSWER_ONLY_FORMATS:
        raise OrdMoEError(
            f"--sft-tokenizer-prompt-format {prompt_format} masks no prompt token, so Eq. 7 would average over "
            f"whole conversations; use one that masks system and user turns: {', '.join(SFT_ANSWER_ONLY_FORMATS)}"
        )
    if ordmoe.lower_path_fraction < 1:
        raise OrdMoEError(
            "--sft with --ordmoe-lower-path-fraction below 1: an SFT micro-batch is one packed row, with no rows "
            "to sub-sample; use a fraction of 1"
        )
    if (getattr(args, "context_parallel_size", 1) or 1) > 1:
        raise OrdMoEError(
            "--sft with --ordmoe and --context-parallel-size > 1: packed tier paths are not split "
            "over context-parallel ranks; use --context-parallel-size 1"
        )
    if ordmoe.path_schedule == "fused" and ordmoe.num_tiers > 1:
        # The fused stack of packed rows (mcore.model: the paths along the tokens) on one stage only.
        for flag, on in (
            ("--pipeline-model-parallel-size > 1", (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1),
            ("--sequence-parallel", bool(getattr(args, "sequence_parallel", False))),
            ("--mtp-num-layers", bool(getattr(args, "mtp_num_layers", None))),
        ):
            if on:
                raise OrdMoEError(
                    f"--sft with the fused path schedule and {flag}: the paths of a packed row are stacked along "
                    "its tokens, which the stages' exchanges, the sequence split and the MTP block do not "
                    "expect; use --ordmoe-path-schedule sequential"
                )
    if not compat.sft_flattens_micro_batches():
        # Measured at core_v0.16.1 on the CPU: with --micro-batch-size 1 and --legacy-tokenizer (its
        # only SFTTokenizer) the first forward fails in megatron-core's THD RoPE, one tier or three.
        raise OrdMoEError(
            "--sft with --ordmoe needs Megatron-LM core_v0.19.0 or later: before it, its packed SFT batches were "
            "never run with tier paths; upgrade Megatron-LM, or fine-tune with ordmoe-pretrain --sft-data"
        )


def megatron_validated_args(args: argparse.Namespace, defaults: Optional[dict] = None) -> argparse.Namespace:
    """A copy of ``args`` after Megatron-LM's ``validate_args`` (output silenced; ``args`` itself
    is not touched). Without a GPU, Megatron's compute-capability checks see an sm_90 GPU
    (``bridges.assumed_gpu_capability``), so launch configurations can be checked on a CPU."""
    from megatron.training.arguments import validate_args

    copied = copy.deepcopy(args)
    # Megatron-LM's parse_args sets these after the parser (and its hook) returns.
    if not hasattr(copied, "rank"):
        copied.rank = int(os.getenv("RANK", "0"))
    if not hasattr(copied, "world_size"):
        copied.world_size = int(os.getenv("WORLD_SIZE", "1"))
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings.catch_warnings(), assumed_gpu_capability():
        warnings.simplefilter("ignore")
        validate_args(copied, defaults or {})
    return copied


def transformer_config(validated_args):
    """Megatron-LM's ``core_transformer_config_from_args``. Without a GPU, where its checks can
    fail for want of Transformer Engine or CUDA (``--apply-rope-fusion``, FP8, ...), the fields are
    read the same way (same names, ``num_moe_experts`` from ``--num-experts``) without those
    checks, and ``skipped_checks`` on the result says why."""
    from megatron.training.arguments import core_transformer_config_from_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return core_transformer_config_from_args(validated_args)
        except Exception as err:
            if torch.cuda.is_available():
                raise
            skipped = f"{type(err).__name__}: {err}"
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


def main(argv=None) -> int:
    """``python -m ordmoe_megatron.megatron_lm --help``: the flags the Megatron-LM hook adds
    (``pretrain_gpt.py --help`` lists Megatron-LM's own only: ``inprocess_restart`` prints the help
    before the OrdMoE flags are added)."""
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py <Megatron-LM flags>",
        description="OrdMoE flags of the Megatron-LM integration (ordmoe_megatron.megatron_lm).",
    )
    add_ordmoe_args(parser)
    add_dry_run_flag(parser)
    args = parser.parse_args(argv)
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()
        return 0
    try:  # flags given: check the OrdMoE ones (the model and layout need pretrain_gpt.py's)
        ordmoe = ordmoe_config_from_args(args)
    except OrdMoEError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(
        "OrdMoE flags valid: "
        + ("--no-ordmoe" if ordmoe is None else f"{ordmoe.num_tiers} tiers, objective {ordmoe.objective}")
        + ". The model, the parallel layout and the tier layout are checked by pretrain_gpt.py <Megatron-LM "
        "flags> --ordmoe --ordmoe-dry-run."
    )
    return 0
