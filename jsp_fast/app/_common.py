"""What the ``jsp-fast`` subcommands share: option groups, and building the dataset, model, pruning
and checkpoint from those options (a bad value becomes a ``UsageError``)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from ..data import NAMES as DATASETS
from ..data import get as get_data
from ..cnf import ACTIVATIONS, CNF, SOLVERS, TRACES
from ..prune import METHODS, prune
from ..training import CheckpointError, exists, load
from . import _args
from ._args import PROG, UsageError, nonneg_int, pos_float, pos_int, pos_ints

__all__ = ["PROG", "RUN_FILE", "add_common", "add_device", "add_data", "add_model", "add_prune", "set_threads",
           "device", "dataset", "split", "build_model", "maybe_prune", "block_note", "run_info", "load_checkpoint",
           "prepare_out", "check_out_file", "toy_lim", "fast", "command_line"]

RUN_FILE = "run.json"  # next to a CLI checkpoint: how to rebuild its dataset


# -- option groups ---------------------------------------------------------------------------------
def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=pos_int, default=None,
                   help="torch CPU threads (default: torch's; small models are fastest with 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_data(p: argparse.ArgumentParser, required: bool = False, default: str | None = None,
             from_run: bool = False) -> None:
    """``from_run``: the options default to what the checkpoint's run.json recorded (eval)."""
    run = " (default: the checkpoint's run.json)" if from_run else ""
    p.add_argument("--dataset", required=required, default=default,
                   help="a jf.data name: a toy set (8gaussians, checkerboard, ...), digits, or a tabular "
                        "set (power, gas, hepmass, miniboone, bsds300; needs --root)" + run)
    p.add_argument("--n", type=pos_int, default=None,
                   help="toy sets: training set size" + (run or " (default: 10000)"))
    p.add_argument("--root", default=None, help="tabular sets: directory with the published data files" + run)
    p.add_argument("--data-seed", type=nonneg_int, default=0, help="seed of the data draw / split" + run)


def add_model(p: argparse.ArgumentParser, tol: float = 1e-3) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=pos_ints, default=None,
                   help="hidden widths, e.g. 64,64,64 (default: 64,64,64 for dim <= 8, else 256,256)")
    g.add_argument("--activation", default="tanh", choices=ACTIVATIONS, help="field activation")
    g.add_argument("--trace", default=None, choices=TRACES, help="default: exact for dim <= 8, else hutchinson")
    g.add_argument("--solver", default="dopri5", choices=SOLVERS, help="torchdiffeq solver")
    g.add_argument("--rtol", type=pos_float, default=tol, help=f"solver rtol while training (default {tol:g})")
    g.add_argument("--atol", type=pos_float, default=tol, help=f"solver atol while training (default {tol:g})")
    g.add_argument("--T", type=pos_float, default=1.0, help="integration time")


def add_prune(p: argparse.ArgumentParser, default: str = "none", sparsity: float = 0.9,
              granularity: str = "unstructured", block: tuple = (32, 32)) -> None:
    g = p.add_argument_group("pruning at initialization")
    g.add_argument("--prune", default=default, metavar="METHOD",
                   help="jsp, random, magnitude, snip, grasp, synflow, or none (default %(default)s)")
    g.add_argument("--sparsity", type=_args.sparsity, default=sparsity,
                   help="fraction of field weights removed (default %(default)s)")
    g.add_argument("--granularity", default=granularity, choices=("unstructured", "block"),
                   help="default %(default)s")
    g.add_argument("--block", type=_args.block, default=block,
                   help=f"block shape rows,cols (default {block[0]},{block[1]})")
    g.add_argument("--scope", default="global", choices=("global", "layer"), help="jf.prune scope")
    g.add_argument("--prune-batch", type=pos_int, default=512, help="data points scored (default 512)")
    g.add_argument("--rounds", type=pos_int, default=None,
                   help="prune in this many rescored rounds (default: 100 for synflow, else 1)")


# -- building things from the options --------------------------------------------------------------
def set_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def device(name: str) -> torch.device:
    """``--device`` as a torch.device, or a UsageError naming what is available."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def dataset(name: str | None, n=None, root=None, seed: int = 0):
    if name is None:
        raise UsageError("no dataset: pass --dataset NAME")
    if name.lower() not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if root is not None and not Path(root).is_dir():
        raise UsageError(f"--root {root}: not a directory")
    kw = {"seed": seed}
    if n is not None:
        kw["n"] = n
    if root is not None:
        kw["root"] = root
    try:
        return get_data(name, **kw)
    except FileNotFoundError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def split(ds, name: str) -> torch.Tensor:
    """``ds.train``/``val``/``test``, or a UsageError when it is empty (an empty batch reaching the
    solver fails as a misleading "underflow in dt")."""
    x = getattr(ds, name)
    if x.shape[0] == 0:
        raise UsageError(f"dataset {ds.name}: the {name} split is empty")
    return x


def build_model(args, dim: int) -> CNF:
    hidden = args.hidden or ((64, 64, 64) if dim <= 8 else (256, 256))
    trace = args.trace or ("exact" if dim <= 8 else "hutchinson")
    return CNF(dim, hidden=hidden, activation=args.activation, trace=trace, solver=args.solver,
               rtol=args.rtol, atol=args.atol, T=args.T)


def maybe_prune(args, model, x, seed: int) -> dict | None:
    """Prune ``model`` in place as ``--prune`` says; a JSON summary (None for ``--prune none``)."""
    if args.prune in (None, "none"):
        return None
    if args.prune not in METHODS:
        raise UsageError(f"unknown pruning method {args.prune!r}; expected one of {', '.join(METHODS)} or none")
    res = prune(model, args.prune, args.sparsity, x[: args.prune_batch], granularity=args.granularity,
                block=args.block, scope=args.scope, seed=seed, rounds=args.rounds)
    out = {"method": args.prune, "sparsity": args.sparsity, "granularity": args.granularity,
           "block": list(args.block) if args.granularity == "block" else None, "scope": args.scope,
           "rounds": res.info["rounds"],
           "kept": res.kept, "total": res.total, "density": res.overall_density,
           "fallback": dict(res.fallback), "seconds": res.seconds, "layers": len(res.masks)}
    if args.granularity == "block" and res.fallback and len(res.fallback) == len(res.masks):
        print(f"warning: {block_note(out)}: no layer is block-sparse, so --fast/jf.sparsify cannot speed "
              f"it up; use a smaller --block", file=sys.stderr)
    return out


def block_note(pruned: dict | None) -> str:
    """For summary lines: how many layers the block fitted (``""`` unless block pruning fell back)."""
    if not pruned or pruned.get("granularity") != "block" or not pruned.get("fallback"):
        return ""
    fb, n = pruned["fallback"], pruned.get("layers", len(pruned["fallback"]))
    kinds = sorted({why.split(" mask", 1)[0] for why in fb.values()})
    return (f"block {'x'.join(map(str, pruned['block']))} fits {n - len(fb)} of {n} pruned layers; "
            f"the {len(fb)} smaller than the block got {'/'.join(kinds)} masks")


def run_info(path: Path) -> dict:
    """The ``run.json`` beside a checkpoint (how to rebuild its dataset), or {}."""
    for d in (path, path.parent, path.parent.parent):
        f = d / RUN_FILE
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError:
                return {}
    return {}


def load_checkpoint(path: str, dev=None):
    """(model, path) of ``--checkpoint``: a checkpoint directory, a ``train --out`` directory (its
    ``last/``) or a ``demo --out`` directory (its ``checkpoint/``)."""
    p = Path(path)
    if not p.exists() and not any(p.parent.glob(f".{p.name}.old-*")):
        raise UsageError(f"checkpoint {path}: no such file or directory")
    if p.is_dir() and not exists(p) and exists(p / "checkpoint"):
        p = p / "checkpoint"
    try:
        return load(p, device=dev), p
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def prepare_out(out: Path) -> None:
    """Create the ``--out`` directory, or say why it cannot be."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: not writable")


def check_out_file(path, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output file named on the command line, checked before any work starts (so a long run
    does not end in a traceback): the expected suffix, not a directory, an existing writable
    directory to hold it."""
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {out}: expected a {' or '.join(suffixes)} file name")
    if out.is_dir():
        raise UsageError(f"{flag} {out}: is a directory; expected a file name")
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{flag} {out}: directory {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"{flag} {out}: not writable")
    return out


def toy_lim(x: torch.Tensor) -> float:
    """Half-width of a square plot window that holds nearly all of the 2-D points ``x``."""
    return float(torch.quantile(x.abs().max(1).values, 0.995)) * 1.15


def fast(model):
    """``--fast``: the checkpoint's pruned CNF with its field on the block-sparse kernels."""
    from ..sparse import sparsify  # the compiled core and the kernels: only for --fast

    out = sparsify(model)
    if out.net.dense_layers:
        print(f"--fast: layers left dense: {out.net.dense_layers}", file=sys.stderr)
    return out


def command_line(args) -> str:
    """The command as typed (``jsp-fast`` + the argv ``main`` was given), for run records."""
    argv = getattr(args, "_argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return " ".join(shlex.quote(str(a)) for a in [PROG, *argv])
