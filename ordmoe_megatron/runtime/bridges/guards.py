"""The bridges' upgrade guards: a patch replaces only what is there and looks as expected.

A megatron-core or torch upgrade that moves or reshapes a bridged spot then fails loudly here,
naming the spot, instead of silently running unpatched code.
"""

from __future__ import annotations

import inspect
from typing import Any

from ordmoe_megatron.errors import OrdMoEError


class BridgeError(OrdMoEError):
    """A spot a bridge replaces no longer looks like the megatron-core (or torch) versions it knows."""


def replace_existing(obj: Any, name: str, value: Any, where: str) -> None:
    """Replace an attribute that must already exist (upgrade guard)."""
    if not hasattr(obj, name):
        raise BridgeError(
            f"bridges: {where}.{name} not found; this megatron-core/torch version is not supported by "
            "the bridges (runtime/bridges): use a megatron-core in runtime.compat.SUPPORTED"
        )
    setattr(obj, name, value)


def check_params(fn: Any, names: tuple[str, ...], where: str) -> None:
    """Upgrade guard for wrapped/replaced functions: the parameters must be the ones our
    replacement implements."""
    found = tuple(inspect.signature(fn).parameters)
    if found != names:
        raise BridgeError(
            f"bridges: {where} has parameters {found}, expected {names}; this megatron-core version is "
            "not supported: use one in runtime.compat.SUPPORTED"
        )
