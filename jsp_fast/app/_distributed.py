"""The ``jsp-fast`` subcommands under ``torchrun``: a decorator that runs a command inside the
process group torchrun describes (a plain run is untouched), and pruning scored once on rank 0.

Launch any of train/sample/eval/compare with ``torchrun --nproc-per-node N -m jsp_fast.app.cli ...``
(or ``torchrun ... $(which jsp-fast) ...``); rank 0 prints and writes the outputs.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from ..training import _dist
from . import _common as c

__all__ = ["distributed", "prune_once"]


def distributed(cmd: Callable) -> Callable:
    """Wrap ``cmd(args) -> exit code`` so it runs inside the torchrun process group (joined at the
    start, left at the end) and a lost peer ends it with one line on stderr and exit code 1."""
    @functools.wraps(cmd)
    def run(args) -> int:
        try:
            with _dist.session():
                return cmd(args)
        except _dist.DistributedError as exc:
            print(f"{c.PROG} {getattr(args, 'command', '')}: error: {exc}", file=sys.stderr)
            return 1
    return run


def prune_once(args, model, x) -> dict | None:
    """``--prune`` on rank 0 only; every other rank receives its masks (and its summary), so the
    masks are computed once and identical everywhere (``jf.train`` checks them again)."""
    pruned = c.maybe_prune(args, model, x, args.seed) if _dist.is_main() else None
    if _dist.active():
        pruned = _dist.broadcast_object(pruned)
        _dist.broadcast_masks(model)
    return pruned
