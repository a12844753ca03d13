"""The ``--ordmoe-*`` flags, in Megatron-LM's naming style, for every front end.

The flags are made from ``OrdMoEConfig``'s fields, as Megatron-LM's ``argument_utils`` makes its
arguments from its config dataclasses: one flag per field (``method.config.option`` names it),
its default the field's, its choices the field's ``Literal`` type, its help the field's
docstring. Nothing here lists a setting again.

``add_ordmoe_args`` adds them to a parser (``ordmoe-pretrain``, Megatron-LM's
``extra_args_provider``, the tier report, which takes the tier flags only);
``ordmoe_config_from_args`` turns the parsed flags into a validated ``OrdMoEConfig``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import types
import typing
from typing import Any, Optional

from ordmoe_megatron.method import OrdMoEConfig
from ordmoe_megatron.method.config import literal_choices, option


@functools.cache
def field_docs(cls: type = OrdMoEConfig) -> dict[str, str]:
    """``{field: docstring}``: the string literal right below each field of a dataclass."""
    (node,) = ast.parse(inspect.getsource(cls)).body
    docs = {}
    for a, b in itertools.pairwise(node.body):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            docs[a.target.id] = " ".join(inspect.cleandoc(b.value.value).split())
    return docs


def _value_type(hint: Any) -> tuple[Any, bool]:
    """The argparse ``type`` of a field's hint, and whether it takes a list (``nargs='+'``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{hint}: give the field an 'argparse_type' in its metadata")
        return _value_type(inner[0])
    if origin is list:
        return _value_type(args[0])[0], True
    if origin is typing.Literal:
        return type(args[0]), False
    return hint, False


def flag_kwargs(f: dataclasses.Field) -> dict:
    """``add_argument``'s keywords for one ``OrdMoEConfig`` field."""
    hint = typing.get_type_hints(OrdMoEConfig)[f.name]
    kwargs: dict = dict(default=f.default, help=field_docs()[f.name])
    if hint is bool:
        return dict(kwargs, action=argparse.BooleanOptionalAction)
    if "argparse_type" in f.metadata:
        return dict(kwargs, type=f.metadata["argparse_type"])
    typ, many = _value_type(hint)
    kwargs["type"] = typ
    if many:
        kwargs["nargs"] = "+"
    if f.name in literal_choices():
        kwargs["choices"] = literal_choices()[f.name]
    return kwargs


def add_ordmoe_args(parser: argparse.ArgumentParser, tier_flags_only: bool = False) -> argparse.ArgumentParser:
    group = parser.add_argument_group("OrdMoE")
    if not tier_flags_only:
        group.add_argument(
            "--ordmoe",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="Train with OrdMoE tier paths and the expert rank loss (--no-ordmoe: plain top-K).",
        )
    for f in OrdMoEConfig.settings(tier_flags_only):
        group.add_argument(option(f.name), dest="ordmoe_" + f.name, **flag_kwargs(f))
    return parser


def ordmoe_config_from_args(args: argparse.Namespace) -> Optional[OrdMoEConfig]:
    """The validated OrdMoE configuration, or None with ``--no-ordmoe``. Flags a parser did not
    add (the tier report's) keep ``OrdMoEConfig``'s defaults."""
    if not getattr(args, "ordmoe", True):
        return None
    given = {
        f.name: getattr(args, "ordmoe_" + f.name) for f in OrdMoEConfig.settings() if hasattr(args, "ordmoe_" + f.name)
    }
    return OrdMoEConfig(**given)
