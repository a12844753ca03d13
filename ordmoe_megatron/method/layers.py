"""Which transformer layers are MoE layers: Megatron-LM's ``--moe-layer-freq``, read in one place.

``moe_layer_freq`` is an int ``N`` (an MoE layer every ``N`` layers, starting with layer 1) or a
0/1 pattern, one entry per layer (1 = MoE), written on the command line as a list expression
such as ``'([0]+[1]*23)'``. Layer numbers are 1-based, as Megatron's ``layer_number``.
"""

from __future__ import annotations

import ast
from typing import Sequence, Union

from ordmoe_megatron.errors import OrdMoEError

Freq = Union[int, list[int]]


def parse_moe_layer_freq(value: Union[int, str, Sequence[int], None]) -> Freq:
    """An int, a 0/1 list, or a list expression (``'[0]+[1]*23'``) -> an int or a 0/1 list."""
    if value is None:
        return 1
    if isinstance(value, bool):
        raise OrdMoEError(f"--moe-layer-freq {value!r}: give an int N or a 0/1 list expression such as '([0]+[1]*23)'")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        out = [int(v) for v in value]
    else:
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            return int(text)
        out = _eval_int_list_expr(text)
    if any(v not in (0, 1) for v in out):
        raise OrdMoEError(f"--moe-layer-freq pattern must contain only 0 and 1 (1 = MoE layer), got {out}")
    return out


def _eval_int_list_expr(text: str) -> list[int]:
    """A small list expression of int lists, ``+`` and ``*`` (no names, no calls)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise OrdMoEError(f"--moe-layer-freq {text!r} is not a list expression such as '([0]+[1]*23)' (ints, + and *)")

    try:
        result = ev(ast.parse(text, mode="eval"))
    except SyntaxError:
        raise OrdMoEError(f"--moe-layer-freq {text!r} is not a list expression such as '([0]+[1]*23)'") from None
    if not isinstance(result, list) or not all(isinstance(v, int) for v in result):
        raise OrdMoEError(f"--moe-layer-freq {text!r} is not a list of ints, e.g. '([0]+[1]*23)'")
    return result


def moe_layer_pattern(num_layers: int, moe_layer_freq: Union[Freq, str, None]) -> list[int]:
    """One entry per layer: 1 for an MoE layer, 0 for a dense one."""
    freq = parse_moe_layer_freq(moe_layer_freq)
    if isinstance(freq, int):
        if freq < 1:
            raise OrdMoEError(f"--moe-layer-freq={freq} must be at least 1 (an MoE layer every N layers)")
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    if len(freq) != num_layers:
        raise OrdMoEError(
            f"--moe-layer-freq pattern has {len(freq)} entries for {num_layers} layers; give one entry per layer"
        )
    return list(freq)


def moe_layer_numbers(num_layers: int, moe_layer_freq: Union[Freq, str, None]) -> list[int]:
    """1-based numbers of the MoE layers."""
    return [layer for layer, is_moe in enumerate(moe_layer_pattern(num_layers, moe_layer_freq), start=1) if is_moe]


def has_dense_layers(num_layers: int, moe_layer_freq: Union[Freq, str, None]) -> bool:
    return 0 in moe_layer_pattern(num_layers, moe_layer_freq)
