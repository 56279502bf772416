"""The ``jsp-fast`` command: demo, train, sample, eval, compare and bench.

Every subcommand has ``--help`` (with every default shown). Bad input (unknown dataset, missing
checkpoint, invalid values, an output path that cannot be written) ends with exit code 2 and one
line on stderr, no traceback (``JSP_FAST_DEBUG=1`` re-raises); errors that are not ours keep their
traceback. Long work shows a progress bar.

Start-up: only the subcommand being run is imported (it brings torch and the rest), so ``jsp-fast
--help`` imports none of torch, torchdiffeq, the compiled core, Triton or matplotlib. The import is
unconditional: a subcommand module that fails to import fails its command loudly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .._version import __version__
from ._args import PROG, UsageError

__all__ = ["COMMANDS", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Shows every default: ``(default: X)`` after each option's help unless the help already says
    what the default is; lists and block shapes as typed (``64,64,64``)."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        d = action.default
        if (d is None or d is False or d is argparse.SUPPRESS or "default" in help_.lower()
                or not action.option_strings):
            return help_
        if isinstance(d, (tuple, list)):
            d = ",".join(map(str, d))
        return f"{help_} (default: {str(d).replace('%', '%%')})".lstrip()


# name: (module in jsp_fast.app, its add-arguments function, its run function -> exit code, help)
COMMANDS = {
    "demo": ("demo", "demo_args", "cmd_demo",
             "a short tour (1-2 min on a CPU): prune, train a CNF on 8gaussians, plot data/samples/density"),
    "train": ("runners", "train_args", "cmd_train", "train a CNF on a dataset (optionally pruned at init), with checkpoints"),
    "sample": ("runners", "sample_args", "cmd_sample", "draw samples from a checkpoint (.npy or .png)"),
    "eval": ("runners", "eval_args", "cmd_eval", "test NLL / bits-per-dim and NFE of a checkpoint"),
    "compare": ("compare", "add_arguments", "run", "prune methods x sparsities x seeds on one dataset -> report"),
    "figure2": ("figure2", "add_arguments", "run",
                "the poster's Figure 2: JSP vs random pruning of one init on MNIST, paired statistics"),
    "bench": ("bench", "add_arguments", "run", "benchmarks: dense vs. sparse kernels and CNFs"),
}
_DOC_FROM_MODULE = {"compare", "bench", "figure2"}  # their module docstring's first line describes them


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the top level takes only flags), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser; ``commands``: the subcommands whose options are built (their modules imported),
    default all. The others are listed with their help line only."""
    p = _Parser(prog=PROG, description="Pruned continuous normalizing flows that run faster "
                                       "(Jacobian Spectrum Pruning + block-sparse kernels).")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, add, run, help_) in COMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=help_)
            continue
        mod = importlib.import_module(f"{__package__}.{module}")
        run_fn = getattr(mod, run)
        doc = mod.__doc__ if name in _DOC_FROM_MODULE else run_fn.__doc__
        sp = sub.add_parser(name, help=help_, description=(doc or help_).strip().splitlines()[0],
                            formatter_class=_Formatter)
        getattr(mod, add)(sp)
        sp.set_defaults(_run=run_fn)
    return p


def _ours(exc: BaseException) -> bool:
    """Errors that report bad input or a failed solve/file operation: ValueError and TypeError (the
    library's checks, ``CheckpointError``/``ConfigError``/``ShapeError`` derive from ValueError),
    OSError, FloatingPointError (a diverged training run), and RuntimeErrors raised by jsp_fast itself
    (``SolverError``). A RuntimeError from torch or any other exception is a bug: keep its traceback."""
    if isinstance(exc, (ValueError, TypeError, OSError, FloatingPointError)):
        return True
    return isinstance(exc, RuntimeError) and type(exc).__module__.split(".")[0] == "jsp_fast"


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and _torchrun_worker():
        # A torchrun worker whose command has finished (outputs written, process group left) exits
        # here, skipping interpreter teardown: gloo's threads were seen to abort a finished worker
        # there ("terminate called without an active exception", SIGABRT, ~1 run in 40), which
        # torchrun then reports as a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _torchrun_worker() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cmd = _command_of(argv)
    p = build_parser([cmd] if cmd in COMMANDS else [])
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
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # sorted by _ours; the rest is re-raised
        if not _ours(exc) or os.environ.get("JSP_FAST_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
        print(f"{PROG} {args.command}: error: {type(exc).__name__}: {msg} (JSP_FAST_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
