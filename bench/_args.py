"""argparse ``type=`` helpers shared by the bench scripts (comma-separated lists)."""
from __future__ import annotations

import argparse


def _list_of(kind, what: str, name: str):
    def parse(s: str) -> tuple:
        try:
            vals = tuple(kind(v) for v in s.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {s!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {s!r}")
        return vals

    parse.__name__ = name  # argparse names the type in its error messages
    return parse


int_list = _list_of(int, "integers", "int_list")
float_list = _list_of(float, "numbers", "float_list")
str_list = _list_of(str.strip, "names", "str_list")
