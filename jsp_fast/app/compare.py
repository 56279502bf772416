"""``jsp-fast compare``: pruning methods × sparsities × seeds on one dataset, against dense and RNODE.

Every run starts from the same initialisation for a given seed (so methods are compared pairwise),
prunes at initialization (dense and RNODE runs do not), trains with ``jf.train`` at a loose tolerance
and records, per step, the train NLL, forward/backward NFE and the batch-mean cumulative Jacobian
norm ``R = ∫‖J‖_F dt`` (the poster's Figure 2, right). At the end it evaluates the test set in one
solve (NLL, forward NFE, mean ``R``) and draws samples. Each finished run is written atomically to
``<out>/runs/<name>.json`` and skipped when the command is rerun, so an interrupted comparison
resumes where it stopped. ``report.md`` and the plots are rebuilt from whatever JSONs exist.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .._io import atomic_write_json, atomic_write_text
from ..cnf import ACTIVATIONS, CNF, SOLVERS, TRACES
from ..data import get as get_data
from ..prune import METHODS, prune
from ..training import History, _dist, train
from . import _common
from ._distributed import distributed
from ._args import UsageError, names, nonneg_float, nonneg_int, pos_float, pos_int, pos_ints, sparsities
from ._args import block as block_shape
from ._args import nonneg_ints
from ._evaluate import evaluate
from ._records import REFERENCES, run_name
from .report import write_report

__all__ = ["add_arguments", "run", "run_one", "curves", "DEFAULT_METHODS", "SETTINGS"]

DEFAULT_METHODS = "jsp,random,magnitude,snip,synflow"
FAILED_FILE = "failed.json"  # {run name: error} of the last invocation's failed runs, for the report


# -- arguments -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="8gaussians", help="a jf.data name (toy set, digits, ...)")
    p.add_argument("--out", default=None, help="output directory (default: compare-<dataset>)")
    p.add_argument("--methods", type=names(METHODS), default=DEFAULT_METHODS,
                   help=f"comma list of jf.prune.METHODS (default {DEFAULT_METHODS})")
    p.add_argument("--sparsities", type=sparsities, default="0.8,0.9,0.95", help="comma list in [0, 1)")
    p.add_argument("--seeds", type=nonneg_ints, default="0,1,2", help="comma list of seeds")
    p.add_argument("--no-references", action="store_true", help="skip the dense and RNODE runs")
    p.add_argument("--rnode", type=nonneg_float, default=0.01, help="RNODE weight λ for kinetic and Jacobian terms")
    p.add_argument("--reg-pruned", type=nonneg_float, default=0.0,
                   help="also train every pruned model with RNODE at this λ (default 0: plain NLL)")
    p.add_argument("--hidden", type=pos_ints, default=None, help="hidden widths, e.g. 64,64,64 (default per dataset)")
    p.add_argument("--activation", default="tanh", choices=ACTIVATIONS, help="field activation")
    p.add_argument("--trace", default=None, choices=TRACES, help="default: exact for dim <= 8")
    p.add_argument("--solver", default="dopri5", choices=SOLVERS, help="torchdiffeq solver")
    p.add_argument("--tol", type=pos_float, default=1e-3, help="rtol = atol while training")
    p.add_argument("--eval-tol", type=pos_float, default=1e-5, help="rtol = atol for the final test evaluation")
    p.add_argument("--steps", type=pos_int, default=300, help="training steps per run")
    p.add_argument("--batch-size", type=pos_int, default=256, help="training batch size")
    p.add_argument("--lr", type=pos_float, default=5e-3, help="Adam learning rate")
    p.add_argument("--eval-every", type=pos_int, default=100, help="validation NLL every this many steps")
    p.add_argument("--R-every", dest="R_every", type=nonneg_int, default=5,
                   help="measure R on a fixed validation batch every this many steps (0: never)")
    p.add_argument("--n", type=pos_int, default=None, help="training set size for generated data (default: 10000)")
    p.add_argument("--n-test", type=pos_int, default=2000, help="test points evaluated at the end (at most)")
    p.add_argument("--n-samples", type=nonneg_int, default=1000, help="samples drawn per run for the grids")
    p.add_argument("--granularity", default="unstructured", choices=("unstructured", "block"), help="mask granularity")
    p.add_argument("--block", type=block_shape, default="16,16", help="block shape rows,cols for --granularity block")
    p.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="train block-pruned models on the block-sparse kernels (default: on for --granularity block)")
    p.add_argument("--scope", default="global", choices=("global", "layer"), help="jf.prune scope")
    p.add_argument("--prune-batch", type=pos_int, default=512, help="data points used for the pruning scores")
    p.add_argument("--rounds", type=pos_int, default=None,
                   help="pruning rounds per method (jf.prune rounds=; default: 100 for synflow, else 1)")
    p.add_argument("--root", default=None, help="data directory for file-based datasets")
    p.add_argument("--threads", type=pos_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and plots from the JSONs")


# The options that change a run's result; a stored run is reused only when they all match.
SETTINGS = ("dataset", "hidden", "activation", "trace", "solver", "tol", "eval_tol", "steps", "batch_size", "lr",
            "eval_every", "R_every", "n", "n_test", "granularity", "block", "scope", "prune_batch", "rnode", "root",
            "rounds", "reg_pruned")


def _as_text(v):
    """Widths and block shapes as typed ("64,64,64"): the form stored run records hold."""
    return ",".join(map(str, v)) if isinstance(v, tuple) else v


def _settings(args) -> dict:
    return {k: _as_text(getattr(args, k)) for k in SETTINGS}


# -- one run ---------------------------------------------------------------------------------------
def _dataset(args, seed: int):
    kw = {"seed": seed}
    if args.n is not None:
        kw["n"] = args.n
    if args.root is not None:
        kw["root"] = args.root
    return get_data(args.dataset, **kw)


def curves(hist: History) -> dict[str, list]:
    """The record's per-step curves from ``jf.train``'s History: train NLL and NFE of each training
    solve; R and validation NLL where they were measured (finite values only)."""
    if not isinstance(hist, History):
        raise TypeError(f"expected the History jf.train returns, got {type(hist).__name__}")
    trained = [r for r in hist if r.get("train_nll") is not None]
    R_step, R = hist.column("R")
    val_step, val = hist.column("val_nll")
    R_pts = [(s, float(v)) for s, v in zip(R_step, R) if math.isfinite(v)]
    val_pts = [(s, float(v)) for s, v in zip(val_step, val) if math.isfinite(v)]
    return {"step": [int(r["step"]) for r in trained],
            "train_nll": [float(r["train_nll"]) for r in trained],
            "nfe_forward": [float(r["nfe_forward"]) for r in trained],
            "nfe_backward": [float(r["nfe_backward"]) for r in trained],
            "R_step": [int(s) for s, _ in R_pts], "R": [v for _, v in R_pts],
            "val_step": [int(s) for s, _ in val_pts], "val_nll": [v for _, v in val_pts]}


def _evaluate(model, x: torch.Tensor, tol: float, bits_per_dim=None) -> dict:
    # figure2 (issue 16): NLL and NFE from a plain log_prob solve, R from its own solve (exact for
    # dim <= 16, else 8 probes per point): see app/_evaluate.py.
    return evaluate(model, x, tol, bits_per_dim)


def _samples(model, ds, n: int, dim: int, seed: int) -> dict:
    """Samples for the report's grid, rounded to keep the JSON small; an error is recorded, not raised
    (a failed sample solve must not lose a trained run)."""
    try:
        s = model.sample(n if dim <= 8 else min(n, 64), seed=seed)
        out = {}
        if getattr(ds, "to_pixels", None) is not None and getattr(ds, "shape", None):
            s = ds.to_pixels(s) / (ds.info.get("levels", 17) - 1)  # to [0, 1]: digits 0..16, MNIST 0..255
            out["samples_shape"] = list(ds.shape)
        out["samples"] = [[round(float(v), 4) for v in row] for row in s]
        return out
    except Exception as exc:  # noqa: BLE001
        return {"samples_error": str(exc)}


def run_one(args, method: str, sparsity: float | None, seed: int) -> dict:
    """Build, prune (unless a reference), train and evaluate one model; returns the JSON record."""
    ds = _dataset(args, seed)
    dim = int(ds.dim)
    hidden = args.hidden or ((64, 64, 64) if dim <= 8 else (256, 256))
    trace = args.trace or ("exact" if dim <= 8 else "hutchinson")
    torch.manual_seed(seed)  # the same initialisation for every method at this seed
    model = CNF(dim, hidden=hidden, activation=args.activation, trace=trace, solver=args.solver,
                rtol=args.tol, atol=args.tol)
    record = {"dataset": args.dataset, "method": method, "sparsity": sparsity, "seed": seed,
              "settings": _settings(args),
              "config": {"hidden": list(hidden), "trace": trace, "solver": args.solver, "tol": args.tol,
                         "eval_tol": args.eval_tol, "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "granularity": args.granularity, "block": _as_text(args.block),
                         "scope": args.scope, "rnode": args.rnode, "prune_batch": args.prune_batch,
                         "rounds": args.rounds, "reg_pruned": args.reg_pruned}}
    t0 = time.perf_counter()
    if method not in REFERENCES:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(ds.train.shape[0], generator=gen)[: args.prune_batch]
        res = prune(model, method, sparsity, ds.train[idx], granularity=args.granularity, block=args.block,
                    scope=args.scope, seed=seed, rounds=args.rounds)
        record["prune"] = {"seconds": res.seconds, "density": res.density, "kept": res.kept,
                           "total": res.total, "fallback": res.fallback,
                           "info": {k: v for k, v in res.info.items() if isinstance(v, (int, float))}}
    t1 = time.perf_counter()
    lam = args.rnode if method == "rnode" else (args.reg_pruned if method not in REFERENCES else 0.0)
    reg = {"kinetic": lam, "jacobian": lam} if lam > 0 else None
    bits_per_dim = getattr(ds, "bits_per_dim", None)
    pruned = method not in REFERENCES
    fits = pruned and args.granularity == "block" and len(res.fallback) < len(res.masks)  # a layer is block-sparse
    sparse = pruned and (args.sparse if getattr(args, "sparse", None) is not None else fits)
    record["config"]["sparse"] = sparse
    # Every option is passed by name: one train() does not take fails here, loudly, instead of
    # being dropped while the record's settings still claim it.
    # distributed=False: under torchrun each rank trains its own runs of the grid, alone.
    hist = train(model, ds.train, ds.val, steps=args.steps, batch_size=args.batch_size, lr=args.lr, reg=reg,
                 eval_every=args.eval_every, seed=seed, progress=False, R_every=args.R_every,
                 bits_per_dim=bits_per_dim, distributed=False, sparse=sparse)
    t2 = time.perf_counter()
    record["history"] = curves(hist)
    record.update(_evaluate(model, ds.test[: args.n_test], args.eval_tol, bits_per_dim))
    record["train_seconds"] = t2 - t1
    record["wall_seconds"] = t2 - t0
    if args.n_samples > 0:
        record.update(_samples(model, ds, args.n_samples, dim, seed))
    if any(p.numel() for p in model.prunable_parameters().values()):
        record["final_density"] = {n: float((p != 0).float().mean()) for n, p in model.prunable_parameters().items()}
    return record


# -- the whole comparison --------------------------------------------------------------------------
def _plan_on_rank0(args, plan: list, runs: Path, meta_path: Path, command: str) -> list:
    """The runs still to do, decided once by rank 0 (before any rank writes a record) and shared;
    a stale-settings error reaches every rank."""
    todo, err = None, None
    if _dist.is_main():
        try:
            todo = _todo(plan, runs, _settings(args))  # refuses changed settings before anything is written
        except UsageError as exc:
            err = str(exc)
        else:
            atomic_write_text(meta_path, command + "\n")
        if todo is not None and len(todo) < len(plan):
            print(f"{len(plan) - len(todo)} of {len(plan)} runs already done in {runs}; resuming")
    todo, err = _dist.broadcast_object((todo, err))
    if err is not None:
        raise UsageError(err)
    return todo


def _plan(args) -> list[tuple[str, float | None, int]]:
    """Every (method, sparsity, seed) to run: the references first, then the grid."""
    plan = [] if args.no_references else [(r, None, s) for s in args.seeds for r in REFERENCES]
    plan += [(m, sp, s) for s in args.seeds for sp in args.sparsities for m in args.methods]
    return plan


def _todo(plan: list, runs: Path, mine: dict) -> list:
    """The runs without a stored record; a stored record made with other settings is an error."""
    todo = []
    for p in plan:
        path = runs / f"{run_name(*p)}.json"
        if not path.exists():
            todo.append(p)
            continue
        theirs = json.loads(path.read_text()).get("settings", {})
        diff = sorted(k for k in mine if k in theirs and theirs[k] != mine[k])
        if diff:
            raise UsageError(f"{path} was run with different settings "
                             f"({', '.join(f'{k}={theirs[k]!r} now {mine[k]!r}' for k in diff)}); use another --out "
                             f"or delete the stale runs")
    return todo


def _validate(args) -> None:
    """Everything every run would check, checked once before any run starts (so a bad setting is one
    error, not a grid of failed runs): the dataset and its splits, the model settings (through
    ``CNF``, as ``train`` does), and the masks at every sparsity (through ``jf.prune`` with random
    scores on that model: block shape, scope and the per-layer floor)."""
    try:
        ds = _dataset(args, args.seeds[0])
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"--dataset {args.dataset}: {str(exc).splitlines()[0]}") from None
    for name in ("train", "val", "test"):
        _common.split(ds, name)
    dim = int(ds.dim)
    try:
        model = CNF(dim, hidden=args.hidden or ((64, 64, 64) if dim <= 8 else (256, 256)), activation=args.activation,
                    trace=args.trace or ("exact" if dim <= 8 else "hutchinson"), solver=args.solver, rtol=args.tol,
                    atol=args.tol)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model settings: {str(exc).splitlines()[0]}") from None
    for sp in args.sparsities:
        try:
            res = prune(model, "random", sp, ds.train[:8], granularity=args.granularity, block=args.block,
                        scope=args.scope, seed=0)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--sparsity {sp:g} with --granularity {args.granularity} --block "
                             f"{_as_text(args.block)}: {str(exc).splitlines()[0]}") from None
        if args.granularity == "block" and len(res.fallback) == len(res.masks):
            print(f"warning: block {_as_text(args.block)} fits none of the field's layers; they get unstructured "
                  f"masks", file=sys.stderr)
            break


def _run_all(args, todo: list, runs: Path) -> dict[str, str]:
    """Run and store each planned run; {name: error} of those that failed (the others go on)."""
    from tqdm import tqdm
    failed = {}
    bar = tqdm(todo, desc=f"compare {args.dataset}", unit="run", disable=not _dist.is_main())
    for method, sp, seed in bar:
        name = run_name(method, sp, seed)
        bar.set_postfix_str(name)
        try:
            rec = run_one(args, method, sp, seed)
        except Exception as exc:  # noqa: BLE001 (record the failure, keep going)
            failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            tqdm.write(f"{name} failed: {failed[name]}")
            continue
        atomic_write_json(runs / f"{name}.json", rec, indent=None)
        tqdm.write(f"{name}: test NLL {rec['test_nll']:.3f}, NFE-F {rec['test_nfe_forward']}, "
                   f"R {rec['test_R']:.3g}, {rec['wall_seconds']:.0f}s")
    return failed


@distributed
def run(args) -> int:
    """Run what is missing of the comparison, then rebuild the report; 1 if a run failed.

    Under torchrun rank ``r`` of ``W`` runs the missing runs ``r, r + W, ...`` and rank 0 writes the
    report once all ranks are done."""
    _common.set_threads(args.threads)
    out = Path(args.out or f"compare-{args.dataset}")
    runs = out / "runs"
    meta_path, failed_path = out / "command.txt", out / FAILED_FILE
    if args.report_only:
        if not runs.is_dir():
            raise UsageError(f"--report-only: no runs in {runs}")
        # The report describes the runs: the command that made them, never the --report-only one.
        command = meta_path.read_text().strip() if meta_path.exists() else ""
        failed = json.loads(failed_path.read_text()) if failed_path.exists() else {}
    else:
        plan = _plan(args)
        _validate(args)
        if _dist.is_main():
            _common.prepare_out(out)
            _common.prepare_out(runs)
        command = _common.command_line(args)
        todo = _plan_on_rank0(args, plan, runs, meta_path, command)
        failed = _run_all(args, _dist.mine(todo), runs)
        if _dist.active():  # every rank's failures, in plan order; also waits for all ranks
            order = {run_name(*p): i for i, p in enumerate(todo)}
            merged = {k: v for part in _dist.all_gather_object(failed) for k, v in part.items()}
            failed = dict(sorted(merged.items(), key=lambda kv: order[kv[0]]))
        if _dist.is_main():
            if failed:
                atomic_write_json(failed_path, failed)
            elif failed_path.exists():
                failed_path.unlink()
    if not _dist.is_main():
        return 1 if failed else 0
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    print(f"report: {write_report(out, records, command, failed)}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (listed in report.md)", file=sys.stderr)
        return 1
    return 0
