"""1-based number ranges as users write them: ``'1-4,25-28'``, ``'7,14,21,28'``.

The one place that reads and writes such lists (layer scopes, tier ranks, log lines).
"""

from __future__ import annotations

from typing import Sequence

from ordmoe_megatron.errors import OrdMoEError


def parse_range(part: str, flag: str, example: str) -> list[int]:
    """``'a-b'`` or ``'a'`` -> the numbers, ascending; ``OrdMoEError`` naming ``flag`` otherwise."""
    part = part.strip()
    try:
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
        else:
            lo = hi = int(part)
    except ValueError:
        raise OrdMoEError(
            f"{flag}: cannot read '{part}'; write a range 'a-b' or a number 'a', e.g. '{example}'"
        ) from None
    if lo > hi:
        raise OrdMoEError(f"{flag}: range '{part}' runs backwards; write '{hi}-{lo}'")
    return list(range(lo, hi + 1))


def parse_ranges(text: str, flag: str, example: str, sep: str = ",") -> list[int]:
    """Ranges joined by ``sep`` -> the numbers in the order given (duplicates kept)."""
    return [n for part in text.split(sep) for n in parse_range(part, flag, example)]


def format_ranges(numbers: Sequence[int], sep: str = ",") -> str:
    """``[1, 2, 3, 5]`` -> ``'1-3,5'``; ``'none'`` for no numbers."""
    if not numbers:
        return "none"
    runs, start, prev = [], numbers[0], numbers[0]
    for n in list(numbers[1:]) + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(f"{start}-{prev}" if prev > start else f"{start}")
        if n is not None:
            start = prev = n
    return sep.join(runs)
