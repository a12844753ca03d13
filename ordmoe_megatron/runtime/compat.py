"""Everything that differs between the Megatron versions this package supports.

``SUPPORTED`` is the one statement of the range (megatron-core, and Megatron-LM at the matching
``core_v*`` tags); ``setup.py``, the messages and the README derive from it or point here
(``tests/runtime/test_compat.py`` checks that they agree).
Each difference is one name below, with the version that introduced it; nothing else in the
package asks which version is installed. Where a feature can be detected it is, so a backport
is handled too; the version says when to expect it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import typing
from typing import Any, Optional

import megatron.core
from megatron.core.optimizer import optimizer as _optimizer
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ordmoe_megatron.errors import OrdMoEError


def _parse(version: str) -> tuple[int, int, int]:
    # megatron-core appends "+<git hash>" when its installed files sit inside a git checkout
    # (a virtual environment in a repository): that hash is not part of the release.
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers + [0] * (3 - len(numbers)))


VERSION: tuple[int, int, int] = _parse(megatron.core.__version__)
# The supported megatron-core releases: from the first, up to (not including) the second. setup.py
# reads this line (with ast: it cannot import megatron) for its install_requires.
SUPPORTED = ((0, 16, 1), (0, 20, 0))


def supported_range() -> str:
    """``SUPPORTED`` in words: ``'0.16.1 up to 0.19.x'``."""
    low, high = SUPPORTED
    return f"{'.'.join(map(str, low))} up to {high[0]}.{high[1] - 1}.x"


def supported_megatron_lm_tags() -> str:
    """The Megatron-LM tags that go with ``SUPPORTED``: ``'core_v0.16.1 to core_v0.19.x'``."""
    first, _, last = supported_range().partition(" up to ")
    return f"core_v{first} to core_v{last}"


def check_supported() -> None:
    """Refuse a megatron-core outside the tested range, with the fix."""
    low, high = SUPPORTED
    if not low <= VERSION < high:
        raise OrdMoEError(
            f"megatron-core {megatron.core.__version__} is outside the range ordmoe-megatron supports "
            f"({supported_range()}); install one in that range"
        )


# --------------------------------------------------------------------------------------------
# layer specs (0.18: MoE and dense MLP specs are functools.partial(cls, submodules=...))
# --------------------------------------------------------------------------------------------
def spec_submodules(node: Any) -> Optional[Any]:
    """The ``submodules`` a spec node carries: a ``ModuleSpec``'s (0.16, 0.17) or the keyword of a
    ``functools.partial(cls, submodules=...)`` (0.18 on); None for anything else."""
    if isinstance(node, ModuleSpec):
        return node.submodules
    if isinstance(node, functools.partial):
        return node.keywords.get("submodules")
    return None


def spec_children(node: Any) -> list:
    """The nodes below a spec node, for walking a whole layer or block spec."""
    if isinstance(node, (list, tuple)):
        return list(node)
    sub = spec_submodules(node)
    if sub is not None:
        return [sub]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [getattr(node, f.name) for f in dataclasses.fields(node)]
    return []


# --------------------------------------------------------------------------------------------
# routing (0.18: scores in fp32 until the final probabilities; sqrtsoftplus)
# --------------------------------------------------------------------------------------------
# 0.18: topk_routing_with_score_function computes scores (softmax, sigmoid, sqrtsoftplus) in
# fp32, ranks and gathers in fp32, and casts only the final probabilities to the logits' dtype.
# Before, scores were cast to the logits' dtype first. The tier router ranks and gates the way
# the installed Megatron's top-K does, so path 1 and the lower tiers see the same numbers.
ROUTER_SCORES_IN_FP32: bool = VERSION >= (0, 18, 0)

# Megatron's load-balancing types (0.19: quantile_balancing, which OrdMoE refuses with more than
# one tier).
LOAD_BALANCING_TYPES: tuple[str, ...] = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none") + (
    ("quantile_balancing",) if VERSION >= (0, 19, 0) else ()
)

# The router score functions this megatron-core offers, read from its own ``TransformerConfig``
# (``moe_router_score_function: Literal[...]``): softmax, sigmoid; 0.18 added sqrtsoftplus
# (softplus, then square root; normalised like sigmoid). The tier router implements each of
# them (``method.tiers.SCORE_FUNCTIONS``; ``tests/runtime/test_compat.py`` checks it).
SCORE_FUNCTIONS: tuple[str, ...] = typing.get_args(
    {f.name: f.type for f in dataclasses.fields(TransformerConfig)}["moe_router_score_function"]
)


def score_function_problem(name: str) -> Optional[str]:
    """Why ``--moe-router-score-function name`` cannot run on this megatron-core (None if it can)."""
    if name in SCORE_FUNCTIONS:
        return None
    offered = f"megatron-core {megatron.core.__version__} offers {', '.join(SCORE_FUNCTIONS)}"
    if name == "sqrtsoftplus":
        return (
            f"--moe-router-score-function sqrtsoftplus needs megatron-core 0.18 or later ({offered}): "
            "upgrade, or use one of those"
        )
    return f"--moe-router-score-function {name!r} is not a router score function ({offered}): use one of those"


# 0.19: MLA resolves its query/key-value norms itself (``mla_qk_norm_config``); without a query
# down-projection (``q_lora_rank`` unset) it wants the query norm fused into ``linear_q_proj``, a
# Transformer Engine layer with no local counterpart, so the local spec cannot build it.
_MLA_NEEDS_FUSED_QUERY_NORM = importlib.util.find_spec("megatron.core.transformer.mla_qk_norm_config") is not None


def mla_query_projection_problem(q_lora_rank: Optional[int]) -> Optional[str]:
    """Why multi-latent attention with this ``q_lora_rank`` cannot be built here (None if it can)."""
    if q_lora_rank is not None or not _MLA_NEEDS_FUSED_QUERY_NORM:
        return None
    return (
        f"--multi-latent-attention without --q-lora-rank: megatron-core {megatron.core.__version__} "
        "builds that attention only with Transformer Engine's fused norm+linear query projection; "
        "use megatron-core 0.16.1, or a model with a query down-projection (--q-lora-rank)"
    )


# --------------------------------------------------------------------------------------------
# loss scales (0.19: the MoE and MTP auxiliary losses may have their own scale functions)
# --------------------------------------------------------------------------------------------
# The model config's functions that scale a loss's gradient, besides ``grad_scale_func`` (which
# the auxiliary losses fall back to when these are unset).
AUX_LOSS_SCALE_FUNCS: tuple[str, ...] = ("moe_grad_scale_func", "mtp_grad_scale_func") if VERSION >= (0, 19, 0) else ()


# 0.19: the MTP loss tracker keeps the per-layer losses under "loss_values" (with MTP accuracy
# counts beside them); before, under "values".
def mtp_tracked_losses() -> Optional[Any]:
    """The per-MTP-layer losses ``MTPLossLoggingHelper`` summed since its last reset (None if none)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    return tracker.get("loss_values", tracker.get("values"))


# --------------------------------------------------------------------------------------------
# checkpoints (0.19: the common state lives in the torch_dist shards, no common.pt)
# --------------------------------------------------------------------------------------------
# 0.19: dist_checkpointing saves the common (non-sharded) state inside the torch_dist files; its
# metadata.json has no "common_backend". Earlier versions write common.pt and cannot load the new
# layout; 0.19 loads both.
COMMON_STATE_IN_SHARDS: bool = VERSION >= (0, 19, 0)


def checkpoint_layout_problem(metadata: dict) -> Optional[str]:
    """Why this megatron-core cannot load a checkpoint with this ``metadata.json`` (None if it can)."""
    if "common_backend" not in metadata and not COMMON_STATE_IN_SHARDS:
        return (
            f"was saved by megatron-core 0.19 or later (its common state is inside the shards), which "
            f"megatron-core {megatron.core.__version__} cannot read: load it with megatron-core 0.19 or later"
        )
    return None


# 0.19: an optimizer state's parameter groups are matched to the optimizer's by their learning-
# rate and weight-decay schedule too (``max_lr``, ``min_lr``, ``start_wd``, ``end_wd``), so a
# resume with a new schedule on purpose (--override-opt-param-scheduler) finds no group.
# Detected from megatron-core's own list of identifying keys.
SCHEDULE_GROUP_KEYS: tuple[str, ...] = tuple(
    key for key in ("max_lr", "min_lr", "start_wd", "end_wd") if key in _optimizer.param_group_identifier_keys
)
GROUP_IDENTITY_KEYS: tuple[str, ...] = tuple(
    key for key in _optimizer.param_group_identifier_keys if key not in SCHEDULE_GROUP_KEYS
)


# --------------------------------------------------------------------------------------------
# MoE auxiliary-loss logging (0.18: megatron.core.transformer.moe.moe_logging)
# --------------------------------------------------------------------------------------------
def moe_metrics_tracker():
    """0.18 on: the MoE metrics tracker; None before (the moe_utils functions)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def moe_aux_loss_names(config) -> list[str]:
    """The auxiliary losses a model logs, named as Megatron's router records them."""
    balancing = config.moe_router_load_balancing_type
    balancing = balancing if isinstance(balancing, (list, tuple)) else [balancing]
    names = [
        name
        for kind, name in (
            ("aux_loss", "load_balancing_loss"),
            ("seq_aux_loss", "seq_load_balancing_loss"),
            ("global_aux_loss", "global_load_balancing_loss"),
        )
        if kind in balancing
    ]
    return names + (["z_loss"] if config.moe_z_loss_coeff is not None else [])


def pop_moe_aux_losses(config, num_microbatches: int) -> dict:
    """Megatron's MoE auxiliary losses of the step (``load_balancing_loss``, ``z_loss``, ...) as
    Megatron-LM logs them: summed over the MoE layers of every pipeline stage, reduced across
    ranks, divided by the number of MoE layers and of micro-batches. The tracker is cleared.

    0.16, 0.17: ``moe_utils.track_moe_metrics``; 0.18 on: ``get_moe_metrics_tracker().report``.
    """
    names = moe_aux_loss_names(config)
    totals: dict = {}
    common = dict(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        total_loss_dict=totals,
        force_initialize=True,
        track_names=names,
        num_layers=config.num_layers,
        moe_layer_freq=config.moe_layer_freq,
    )
    tracker = moe_metrics_tracker()
    if tracker is None:
        moe_utils.track_moe_metrics(**common)
    else:
        tracker.report(**common)
    return {name: float(value) for name, value in totals.items()}


# --------------------------------------------------------------------------------------------
# Megatron-LM (the training loop; imported where used: it is not part of megatron-core)
# --------------------------------------------------------------------------------------------
def megatron_lm_pretrain_style() -> str:
    """How this Megatron-LM's ``pretrain_gpt.py`` calls ``pretrain``:

    - ``"provider"`` (core_v0.16, core_v0.17): ``pretrain(datasets, model_provider, ...,
      extra_args_provider=...)``; the arguments are parsed inside ``pretrain``;
    - ``"container"`` (core_v0.18): the script parses with ``parse_and_validate_args(
      extra_args_provider=...)`` and passes a config container and the model provider;
    - ``"model_config"`` (core_v0.19): as ``"container"``, and the model comes from a
      ``GPTModelConfig`` and its builder, with no model provider.
    """
    from megatron.training import training

    params = inspect.signature(training.pretrain).parameters
    if "cfg_container" not in params:
        return "provider"
    return "model_config" if "model_provider" in params and params["model_provider"].default is None else "container"


def sft_flattens_micro_batches() -> bool:
    """Whether Megatron-LM's ``--sft`` packs a micro-batch of several samples into one THD row
    (core_v0.19: ``flatten_batch_for_packed_sequences``); ``--sft --ordmoe`` is refused before
    it (``megatron_lm.arguments.check_sft``)."""
    from megatron.core import utils

    return hasattr(utils, "flatten_batch_for_packed_sequences")


def mimo_shards_sequence_parallel() -> bool:
    """Whether megatron-core's ``MimoModel`` scatters the combined embeddings along the sequence
    for sequence parallelism itself (0.19 on). 0.16 hands the language model the whole sequence;
    0.17 and 0.18 have the partition adapter but scatter the batch dimension (they transpose to
    ``[b, s, h]`` first). A MIMO model with ``sequence_parallel`` is refused before 0.19."""
    return VERSION >= (0, 19, 0)
