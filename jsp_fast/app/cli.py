"""The ``jsp-fast`` command: demo, train, sample, eval, compare and bench.

Every subcommand has ``--help``. Bad input (unknown dataset, missing checkpoint, invalid values)
ends with exit code 2 and one line on stderr, no traceback (``JSP_FAST_DEBUG=1`` re-raises);
long work shows a progress bar. Every subcommand module is imported here, unconditionally: one that
fails to import breaks the command loudly instead of vanishing from it.
"""
from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..cnf import SolverError
from ..training import CheckpointError
from . import bench, compare, demo, figure2, runners
from ._args import UsageError
from ._common import PROG

__all__ = ["COMMANDS", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# name: (add_arguments(parser), run(args) -> exit code, help)
COMMANDS = {
    "demo": (demo.demo_args, demo.cmd_demo, "a one-minute tour: train a CNF on 8gaussians, plot data/samples/density"),
    "train": (runners.train_args, runners.cmd_train,
              "train a CNF on a dataset (optionally pruned at init), with checkpoints"),
    "sample": (runners.sample_args, runners.cmd_sample, "draw samples from a checkpoint (.npy or .png)"),
    "eval": (runners.eval_args, runners.cmd_eval, "test NLL / bits-per-dim and NFE of a checkpoint"),
    "compare": (compare.add_arguments, compare.run, "prune methods x sparsities x seeds on one dataset -> report"),
    "figure2": (figure2.add_arguments, figure2.run,
                "the poster's Figure 2: JSP vs random pruning of one init on MNIST, paired statistics"),
    "bench": (bench.add_arguments, bench.run, "benchmarks: dense vs. sparse kernels and CNFs"),
}
_MODULES = {"compare": compare, "bench": bench, "figure2": figure2}  # their module docstring's first line describes them


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Pruned continuous normalizing flows that run faster "
                                       "(Jacobian Spectrum Pruning + block-sparse kernels).")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add, run, help_) in COMMANDS.items():
        doc = _MODULES[name].__doc__ if name in _MODULES else run.__doc__
        sp = sub.add_parser(name, help=help_, description=(doc or help_).strip().splitlines()[0])
        add(sp)
        sp.set_defaults(_run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args._argv = argv
    if getattr(args, "_run", None) is None:
        p.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            CheckpointError, SolverError, FloatingPointError) as exc:
        if os.environ.get("JSP_FAST_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
