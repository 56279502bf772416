"""Command-line value types (argparse ``type=``) and ``UsageError``: one parser per kind of value.

Every type raises ``argparse.ArgumentTypeError`` with the expected form and the given text, so the
command ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Sequence

__all__ = ["PROG", "UsageError", "pos_int", "nonneg_int", "pos_float", "nonneg_float", "sparsity", "pos_ints",
           "nonneg_ints", "sparsities", "block", "names", "number_list"]


PROG = "jsp-fast"


class UsageError(Exception):
    """A bad command line value found after parsing; reported as one line, exit code 2."""


def _number(s: str, kind: type, ok: Callable[[float], bool], expected: str):
    try:
        v = kind(s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
    return v


def _scalar(name: str, kind: type, ok: Callable, expected: str) -> Callable[[str], float]:
    def parse(s: str):
        return _number(s, kind, ok, expected)
    parse.__name__ = name
    return parse


def number_list(kind: type, ok: Callable, expected: str) -> Callable[[str], tuple]:
    """A type for comma-separated numbers (``"64,64,64"``): a non-empty tuple, every item ``ok``."""
    def parse(s: str) -> tuple:
        parts = s.split(",")
        if not s.strip() or any(not p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return tuple(_number(p, kind, ok, expected) for p in parts)
    return parse


def _positive(v) -> bool:
    return v > 0 and math.isfinite(v)


def _nonneg(v) -> bool:
    return v >= 0 and math.isfinite(v)


def _fraction(v) -> bool:
    return 0.0 <= v < 1.0


pos_int = _scalar("pos_int", int, _positive, "a positive integer")
nonneg_int = _scalar("nonneg_int", int, _nonneg, "an integer >= 0")
pos_float = _scalar("pos_float", float, _positive, "a positive number")
nonneg_float = _scalar("nonneg_float", float, _nonneg, "a number >= 0")
sparsity = _scalar("sparsity", float, _fraction, "a sparsity in [0, 1)")
pos_ints = number_list(int, _positive, "comma-separated positive integers")
nonneg_ints = number_list(int, _nonneg, "comma-separated integers >= 0")
sparsities = number_list(float, _fraction, "comma-separated sparsities in [0, 1)")


def block(s: str) -> tuple[int, int]:
    """A block shape ``rows,cols`` (``"32,32"``); one number means a square block."""
    v = pos_ints(s)
    if len(v) == 1:
        v = (v[0], v[0])
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected a block shape like 32,32, got {s!r}")
    return v


def names(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """A type for a comma-separated, non-empty subset of ``choices``."""
    def parse(s: str) -> tuple[str, ...]:
        vals = tuple(v.strip() for v in s.split(",") if v.strip())
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {s!r}")
        return vals
    return parse
