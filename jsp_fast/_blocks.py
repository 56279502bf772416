"""Block shapes: the one parser of ``block=`` arguments (an int or a pair of ints).

A base module (it imports nothing of the package) so that pruning and the command line can parse a
block without importing the block-sparse compute layer; ``jsp_fast.sparse.plan.as_block`` is this
function.
"""
from __future__ import annotations

import operator

__all__ = ["as_block"]


def as_block(block) -> tuple[int, int]:
    """``(bm, bk)`` from an int ``b`` (a square ``b x b`` block) or a pair of ints; both positive.

    A TypeError for anything else (floats, strings, None), a ValueError for a pair of the wrong length
    or a side below 1.
    """
    if isinstance(block, bool):
        raise TypeError(f"block must be an int or a pair of ints, got {block!r}")
    try:
        b = operator.index(block)
        pair = (b, b)
    except TypeError:
        if isinstance(block, (str, bytes)) or not hasattr(block, "__len__"):
            raise TypeError(f"block must be an int or a pair of ints, got {block!r}") from None
        if len(block) != 2:
            raise ValueError(f"block must be an int or a pair of ints (bm, bk), got {len(block)} values: "
                             f"{tuple(block)!r}") from None
        try:
            if any(isinstance(v, bool) for v in block):
                raise TypeError
            pair = tuple(operator.index(v) for v in block)
        except TypeError:
            raise TypeError(f"block must be an int or a pair of ints, got {tuple(block)!r}") from None
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"block dims must be positive, got {pair}")
    return pair
