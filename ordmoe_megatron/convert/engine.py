"""Generic, family-independent conversion engine.

A family is described by two declarative tables:

* a tensor table: :class:`TensorRule` rows pairing a Megatron-Core ``GPTModel`` state-dict key
  pattern with one or more Hugging Face tensor name patterns and a :class:`Transform`;
* a config table: :class:`ConfigRule` rows pairing Hugging Face ``config.json`` fields with model
  flags (see :mod:`ordmoe_megatron.runtime.model_flags`), plus fields that are only checked or carried.

Patterns use ``{L}`` (layer index) and ``{E}`` (expert index) placeholders; both sides use the
same (global) indices. ``{M}`` (a multi-token-prediction layer) binds ``{N}`` = ``num_layers + M``
on the Hugging Face side, where HF checkpoints keep their MTP layers after the decoder's. The
engine plans a conversion from the set of state-dict keys a Megatron model has (so which
optional rows apply -- biases, shared experts, dense layers -- is decided by the model built
from the flags, not by the table), validates names and shapes before any tensor
data is read, and applies transforms in either direction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ordmoe_megatron.errors import OrdMoEError

Shape = Tuple[int, ...]


class ConversionError(OrdMoEError):
    """A checkpoint or config cannot be converted; the message names the tensor or field."""


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------
class Transform:
    """Maps N Hugging Face tensors <-> one Megatron tensor. ``ctx`` is the normalized flags dict."""

    name = "transform"

    def hf_shapes(self, mcore_shape: Shape, n_hf: int, ctx: Dict[str, Any]) -> List[Shape]:
        raise NotImplementedError

    def to_mcore(self, tensors: List[torch.Tensor], ctx: Dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, n_hf: int, ctx: Dict[str, Any]) -> List[torch.Tensor]:
        raise NotImplementedError


class Identity(Transform):
    name = "identity"

    def hf_shapes(self, mcore_shape, n_hf, ctx):
        return [tuple(mcore_shape)]

    def to_mcore(self, tensors, ctx):
        (t,) = tensors
        return t

    def to_hf(self, tensor, n_hf, ctx):
        return [tensor]


class Concat(Transform):
    """Megatron's fused ``linear_fc1`` of a gated MLP: ``[gate; up]`` stacked on dim 0 (the
    SwiGLU ``chunk(2)`` order); HF keeps ``gate_proj`` and ``up_proj`` separate."""

    name = "glu_concat"

    def hf_shapes(self, mcore_shape, n_hf, ctx):
        if mcore_shape[0] % n_hf:
            raise ConversionError(f"fused dim {mcore_shape[0]} not divisible by {n_hf}")
        return [(mcore_shape[0] // n_hf, *mcore_shape[1:])] * n_hf

    def to_mcore(self, tensors, ctx):
        return torch.cat(tensors, dim=0)

    def to_hf(self, tensor, n_hf, ctx):
        return [c.contiguous() for c in torch.chunk(tensor, n_hf, dim=0)]


class QKVByGroup(Transform):
    """Megatron's fused ``linear_qkv``: for each query group g, ``[q heads of g; k_g; v_g]``
    (rows of ``kv_channels``), groups stacked on dim 0. HF: separate q/k/v projections with heads
    in order. Works for weights ``[rows, hidden]`` and biases ``[rows]``."""

    name = "qkv_by_query_group"

    @staticmethod
    def _dims(ctx):
        heads = ctx["num_attention_heads"]
        groups = ctx["num_query_groups"] if ctx["group_query_attention"] else heads
        head_dim = ctx["kv_channels"] or ctx["hidden_size"] // heads
        if heads % groups:
            raise ConversionError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
        return heads, groups, head_dim

    def hf_shapes(self, mcore_shape, n_hf, ctx):
        heads, groups, hd = self._dims(ctx)
        rest = tuple(mcore_shape[1:])
        return [(heads * hd, *rest), (groups * hd, *rest), (groups * hd, *rest)]

    def to_mcore(self, tensors, ctx):
        heads, groups, hd = self._dims(ctx)
        q, k, v = tensors
        rest = tuple(q.shape[1:])
        q = q.reshape(groups, heads // groups * hd, *rest)
        k = k.reshape(groups, hd, *rest)
        v = v.reshape(groups, hd, *rest)
        return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * hd, *rest)

    def to_hf(self, tensor, n_hf, ctx):
        heads, groups, hd = self._dims(ctx)
        rest = tuple(tensor.shape[1:])
        per_group = tensor.reshape(groups, (heads // groups + 2) * hd, *rest)
        q, k, v = torch.split(per_group, [heads // groups * hd, hd, hd], dim=1)
        return [
            q.reshape(heads * hd, *rest).contiguous(),
            k.reshape(groups * hd, *rest).contiguous(),
            v.reshape(groups * hd, *rest).contiguous(),
        ]


IDENTITY = Identity()
GLU = Concat()
QKV = QKVByGroup()


# ----------------------------------------------------------------------------------------------
# Tensor table
# ----------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{([A-Z])\}")


def _compile(pattern: str) -> "re.Pattern[str]":
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True)
class TensorRule:
    """One row of a tensor table: Megatron key pattern <-> HF name pattern(s) + transform."""

    mcore: str
    hf: Tuple[str, ...]
    transform: Transform = IDENTITY

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))


@dataclass
class PlannedTensor:
    mcore_key: str
    mcore_shape: Shape
    rule: TensorRule
    hf_names: List[str]
    hf_shapes: List[Shape]


@dataclass
class TensorTable:
    """A family's tensor table. ``tied_output`` names the HF output-projection tensor and the
    tensor it equals when embeddings are tied (HF may or may not store it). ``refused``: (regex,
    reason) pairs for HF tensors the family knows and does not map (the refusal says why).
    ``copies``: (HF pattern with ``{N}``, HF tensor) pairs: per MTP layer, HF tensors that must
    equal a main-model tensor (megatron-core's MTP shares it); import checks them, export writes
    them. ``mtp_layer``: the HF prefix of an MTP layer (``{N}``): a config with MTP layers whose
    checkpoint holds none of them imports without them."""

    rules: Sequence[TensorRule]
    tied_output: Optional[Tuple[str, str]] = None
    refused: Tuple[Tuple[str, str], ...] = ()
    copies: Tuple[Tuple[str, str], ...] = ()
    mtp_layer: Optional[str] = None
    _compiled: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self._compiled = [(_compile(r.mcore), r) for r in self.rules]

    def match(self, mcore_key: str):
        for rx, rule in self._compiled:
            m = rx.match(mcore_key)
            if m:
                return rule, m.groupdict()
        return None

    def plan(self, mcore_shapes: Dict[str, Shape], ctx: Dict[str, Any]) -> List[PlannedTensor]:
        """Pair every Megatron tensor with its HF tensors; unmapped Megatron keys are an error."""
        out, unmapped = [], []
        for key, shape in mcore_shapes.items():
            hit = self.match(key)
            if hit is None:
                unmapped.append(key)
                continue
            rule, binding = hit
            if "M" in binding:
                binding["N"] = str(int(ctx["num_layers"]) + int(binding["M"]))
            names = [p.format(**binding) for p in rule.hf]
            out.append(
                PlannedTensor(key, tuple(shape), rule, names, rule.transform.hf_shapes(tuple(shape), len(names), ctx))
            )
        if unmapped:
            raise ConversionError("Megatron model tensor(s) not covered by the mapping table: " + _preview(unmapped))
        return out

    def copy_names(self, ctx: Dict[str, Any]) -> Dict[str, str]:
        """Each MTP layer's copies of main-model tensors: {copy name: the tensor it equals}."""
        n, mtp = int(ctx["num_layers"]), int(ctx.get("mtp_num_layers") or 0)
        return {pattern.format(N=n + i): src for i in range(mtp) for pattern, src in self.copies}

    def has_mtp_layers(self, names: Iterable[str], ctx: Dict[str, Any]) -> bool:
        """Whether a checkpoint's tensor ``names`` hold the first MTP layer."""
        prefix = (self.mtp_layer or "").format(N=int(ctx["num_layers"]))
        return bool(self.mtp_layer) and any(name.startswith(prefix) for name in names)


def _preview(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_hf_tensors(
    plan: List[PlannedTensor],
    available: Dict[str, Tuple[Shape, Any]],
    table: TensorTable,
    tied: bool,
    copies: Optional[Dict[str, str]] = None,
) -> None:
    """Before reading data: every HF tensor the plan needs exists with the right shape, and every
    HF tensor present is used (a stray tensor means the table does not describe this model)."""
    wanted: Dict[str, Shape] = {}
    for p in plan:
        for n, s in zip(p.hf_names, p.hf_shapes):
            wanted[n] = s
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ConversionError("missing tensor(s) in the Hugging Face checkpoint: " + _preview(missing))
    for n, s in wanted.items():
        got = tuple(available[n][0])
        if got != tuple(s):
            raise ConversionError(f"tensor {n} has shape {list(got)}, the config implies {list(s)}")
    extra = [n for n in available if n not in wanted]
    if tied and table.tied_output:
        out_name, src = table.tied_output
        if out_name in extra:
            extra.remove(out_name)
            if tuple(available[out_name][0]) != tuple(available[src][0]):
                raise ConversionError(
                    f"tensor {out_name} (tied to {src}) has shape "
                    f"{list(available[out_name][0])}, expected "
                    f"{list(available[src][0])}"
                )
    for name, src in (copies or {}).items():
        if name not in available:
            raise ConversionError(
                f"missing tensor {name} (the MTP layer's copy of {src}) in the Hugging Face checkpoint"
            )
        extra.remove(name)
        src = src if src in available else table.tied_output[1]
        if tuple(available[name][0]) != tuple(available[src][0]):
            raise ConversionError(
                f"tensor {name} has shape {list(available[name][0])}, {src} has {list(available[src][0])}"
            )
    for pattern, reason in table.refused:
        known = [n for n in extra if re.match(pattern, n)]
        if known:
            raise ConversionError(f"tensor(s) {_preview(known, 3)}: {reason}")
    if extra:
        raise ConversionError(
            "tensor(s) in the Hugging Face checkpoint not covered by the mapping table: " + _preview(extra)
        )


# ----------------------------------------------------------------------------------------------
# Config table
# ----------------------------------------------------------------------------------------------
_MISSING = object()


@dataclass(frozen=True)
class ConfigRule:
    """Pairs HF config fields with model flags.

    * ``hf``: the HF fields this rule accounts for (a field no rule or ``carry`` names is refused).
    * ``to_flags(values) -> dict``: all HF values (class defaults filled in) -> flags; raises
      ConversionError for values Megatron cannot express.
    * ``to_hf(flags) -> dict``: flags -> HF values; raises ConversionError where the family cannot
      express the flags.
    * ``carried``: the fields are also kept verbatim for export (checked-only fields).
    """

    hf: Tuple[str, ...]
    to_flags: Callable[[Dict[str, Any]], Dict[str, Any]]
    to_hf: Callable[[Dict[str, Any]], Dict[str, Any]]
    carried: bool = False


def same(hf_name: str, flag: Optional[str] = None) -> ConfigRule:
    """HF field == flag (same value)."""
    flag = flag or hf_name

    def to_flags(v):
        if v.get(hf_name) is None:
            raise ConversionError(f"config.json lacks required field {hf_name!r}")
        return {flag: v[hf_name]}

    def to_hf(f):
        if f.get(flag) is None:
            raise ConversionError(f"model flag {flag} is required for the {hf_name!r} field")
        return {hf_name: f[flag]}

    return ConfigRule((hf_name,), to_flags, to_hf)


def negated(hf_name: str, flag: str, hf_default: bool) -> ConfigRule:
    """Boolean HF field == not flag."""
    return ConfigRule(
        (hf_name,),
        lambda v: {flag: not bool(v.get(hf_name, hf_default))},
        lambda f: {hf_name: not f[flag]},
    )


def check(hf_name: str, ok: Callable[[Any], bool], why: str, default: Any = _MISSING) -> ConfigRule:
    """An HF field with no flag: its value must satisfy ``ok`` (``why`` explains a refusal). Kept
    verbatim for export; without recorded HF metadata export writes ``default`` (if given)."""

    def to_flags(v):
        if hf_name in v and not ok(v[hf_name]):
            raise ConversionError(f"config.json field {hf_name}={v[hf_name]!r} is not supported: {why}")
        return {}

    def to_hf(f):
        return {} if default is _MISSING else {hf_name: default}

    return ConfigRule((hf_name,), to_flags, to_hf, carried=True)


def fixed_flags(**flags: Any) -> ConfigRule:
    """Flags the family always has (e.g. RMSNorm); on export, other values are refused."""

    def to_hf(f):
        for k, v in flags.items():
            if f[k] != v:
                raise ConversionError(
                    f"model flag {k}={f[k]!r} cannot be expressed by this Hugging Face family (it needs {k}={v!r})"
                )
        return {}

    return ConfigRule((), lambda v: dict(flags), to_hf)


@dataclass
class ConfigTable:
    """A family's config table. ``carry`` lists HF fields with no effect on the model's math
    (token ids, init range, aux-loss coefficient, dtype, ...): kept verbatim for export."""

    rules: Sequence[ConfigRule]
    carry: Tuple[str, ...] = ()

    def covered(self) -> set:
        names = set(self.carry)
        for r in self.rules:
            names.update(r.hf)
        return names

    def carried(self) -> set:
        names = set(self.carry)
        for r in self.rules:
            if r.carried:
                names.update(r.hf)
        return names

    def to_flags(self, saved: Dict[str, Any], full: Dict[str, Any], family: str) -> Dict[str, Any]:
        """``saved``: the fields config.json sets (normalized); ``full``: with class defaults."""
        unknown = sorted(set(saved) - self.covered())
        if unknown:
            raise ConversionError(
                f"config.json field(s) not covered by the {family} mapping: {', '.join(unknown)} "
                f"(refusing rather than silently dropping them)"
            )
        flags: Dict[str, Any] = {}
        for r in self.rules:
            flags.update(r.to_flags(full))
        experts, topk = flags.get("num_experts"), flags.get("moe_router_topk")
        if experts and topk is not None and not 1 <= topk <= experts:
            raise ConversionError(
                f"config.json: num_experts_per_tok={topk} must be between 1 and the number of experts ({experts})"
            )
        return flags

    def to_hf(self, flags: Dict[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for r in self.rules:
            out.update(r.to_hf(flags))
        return out


def integral(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer() and math.isfinite(float(x))


def iter_layer_groups(plan: Iterable[PlannedTensor]) -> List[List[PlannedTensor]]:
    """Group planned tensors by decoder layer (non-layer tensors form their own groups), in
    model order, so export can load and write one layer at a time."""
    groups: Dict[Any, List[PlannedTensor]] = {}
    rx = re.compile(r"(decoder|mtp)\.layers\.(\d+)\.")
    for p in plan:
        m = rx.match(p.mcore_key)
        if m:
            key = ("layer" if m.group(1) == "decoder" else "mtp", int(m.group(2)))
        else:
            key = ("pre", 0) if p.mcore_key.startswith("embedding") else ("post", 0)
        groups.setdefault(key, []).append(p)
    order = sorted(groups, key=lambda k: ({"pre": 0, "layer": 1, "mtp": 2, "post": 3}[k[0]], k[1]))
    return [groups[k] for k in order]
