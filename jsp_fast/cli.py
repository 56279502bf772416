"""The ``jsp-fast`` command: demo, train, sample, eval (+ compare and bench when available).

Every subcommand has ``--help``. Bad input (unknown dataset, missing checkpoint, invalid values)
ends with exit code 2 and one line on stderr, no traceback (``JSP_FAST_DEBUG=1`` re-raises);
long work shows a progress bar.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

PROG = "jsp-fast"
RUN_FILE = "run.json"  # next to a CLI checkpoint: how to rebuild its dataset


class UsageError(Exception):
    """A bad command line value found after parsing; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- value types ---------------------------------------------------------------------------------------
def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def _sparsity(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {s!r}") from None
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {s!r}")
    return v


def _ints(s: str) -> tuple[int, ...]:
    try:
        v = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return v


def _block(s: str) -> tuple[int, int]:
    v = _ints(s)
    if len(v) == 1:
        v = (v[0], v[0])
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected a block shape like 32,32, got {s!r}")
    return v


# -- shared pieces -----------------------------------------------------------------------------------
def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(n)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_pos_int, default=None,
                   help="torch CPU threads (default: torch's; small models are fastest with 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def _device(name: str):
    """``--device`` as a torch.device, or a UsageError naming what is available."""
    import torch
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


def _add_data(p: argparse.ArgumentParser, required: bool = False, default: str | None = None) -> None:
    p.add_argument("--dataset", required=required, default=default,
                   help="a jf.data name: a toy set (8gaussians, checkerboard, ...), digits, or a tabular "
                        "set (power, gas, hepmass, miniboone, bsds300; needs --root)")
    p.add_argument("--n", type=_pos_int, default=None, help="toy sets: training set size (default 10000)")
    p.add_argument("--root", default=None, help="tabular sets: directory with the published data files")
    p.add_argument("--data-seed", type=_nonneg_int, default=0, help="seed of the data draw / split")


def _dataset(name: str | None, n=None, root=None, seed: int = 0):
    import jsp_fast as jf
    if name is None:
        raise UsageError("no dataset: pass --dataset NAME")
    if name.lower() not in jf.data.NAMES:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(jf.data.NAMES)}")
    if root is not None and not Path(root).is_dir():
        raise UsageError(f"--root {root}: not a directory")
    kw = {"seed": seed}
    if n is not None:
        kw["n"] = n
    if root is not None:
        kw["root"] = root
    try:
        return jf.data.get(name, **kw)
    except FileNotFoundError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def _build_model(args, dim: int):
    import jsp_fast as jf
    hidden = args.hidden or ((64, 64, 64) if dim <= 8 else (256, 256))
    trace = args.trace or ("exact" if dim <= 8 else "hutchinson")
    return jf.CNF(dim, hidden=hidden, activation=args.activation, trace=trace, solver=args.solver,
                  rtol=args.rtol, atol=args.atol, T=args.T)


def _add_model(p: argparse.ArgumentParser, tol: float = 1e-3) -> None:
    import jsp_fast as jf
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=_ints, default=None,
                   help="hidden widths, e.g. 64,64,64 (default: 64,64,64 for dim <= 8, else 256,256)")
    g.add_argument("--activation", default="tanh", choices=jf.cnf.ACTIVATIONS)
    g.add_argument("--trace", default=None, choices=jf.cnf.TRACES, help="default: exact for dim <= 8, else hutchinson")
    g.add_argument("--solver", default="dopri5", choices=jf.cnf.SOLVERS)
    g.add_argument("--rtol", type=_pos_float, default=tol, help=f"solver rtol while training (default {tol:g})")
    g.add_argument("--atol", type=_pos_float, default=tol, help=f"solver atol while training (default {tol:g})")
    g.add_argument("--T", type=_pos_float, default=1.0, help="integration time")


def _add_prune(p: argparse.ArgumentParser, default: str = "none", sparsity: float = 0.9,
               granularity: str = "unstructured", block: tuple = (32, 32)) -> None:
    g = p.add_argument_group("pruning at initialization")
    g.add_argument("--prune", default=default, metavar="METHOD",
                   help="jsp, random, magnitude, snip, grasp, synflow, or none (default %(default)s)")
    g.add_argument("--sparsity", type=_sparsity, default=sparsity,
                   help="fraction of field weights removed (default %(default)s)")
    g.add_argument("--granularity", default=granularity, choices=("unstructured", "block"),
                   help="default %(default)s")
    g.add_argument("--block", type=_block, default=block,
                   help=f"block shape rows,cols (default {block[0]},{block[1]})")
    g.add_argument("--scope", default="global", choices=("global", "layer"))
    g.add_argument("--prune-batch", type=_pos_int, default=512, help="data points scored (default 512)")
    g.add_argument("--rounds", type=_pos_int, default=None,
                   help="prune in this many rescored rounds (default: 100 for synflow, else 1)")


def _maybe_prune(args, model, x, seed: int) -> dict | None:
    if args.prune in (None, "none"):
        return None
    import jsp_fast as jf
    methods = getattr(jf.prune, "METHODS", ())
    if args.prune not in methods:
        raise UsageError(f"unknown pruning method {args.prune!r}; expected one of {', '.join(methods)} or none")
    res = jf.prune(model, args.prune, args.sparsity, x[: args.prune_batch], granularity=args.granularity,
                   block=args.block, scope=args.scope, seed=seed, rounds=args.rounds)
    return {"method": args.prune, "sparsity": args.sparsity, "granularity": args.granularity,
            "block": list(args.block) if args.granularity == "block" else None, "scope": args.scope,
            "rounds": res.info["rounds"],
            "kept": res.kept, "total": res.total, "density": res.overall_density,
            "fallback": dict(res.fallback), "seconds": res.seconds}


def _run_info(path: Path) -> dict:
    for d in (path, path.parent, path.parent.parent):
        f = d / RUN_FILE
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError:
                return {}
    return {}


def _load_checkpoint(path: str, device=None):
    import jsp_fast as jf
    from .checkpoint import CheckpointError
    p = Path(path)
    if not p.exists() and not any(p.parent.glob(f".{p.name}.old-*")):
        raise UsageError(f"checkpoint {path}: no such file or directory")
    try:
        return jf.load(p, device=device), p
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _toy_lim(x) -> float:
    import torch
    return float(torch.quantile(x.abs().max(1).values, 0.995)) * 1.15


# -- demo ------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default %(default)s)")
    p.add_argument("--dataset", default="8gaussians", help="a 2-D toy set (default %(default)s)")
    p.add_argument("--steps", type=_pos_int, default=200, help="training steps (default %(default)s)")
    p.add_argument("--batch-size", type=_pos_int, default=256, help="default %(default)s")
    p.add_argument("--lr", type=_pos_float, default=1e-2, help="Adam learning rate (default %(default)s)")
    p.add_argument("--hidden", type=_ints, default=(64, 64, 64), help="hidden widths (default 64,64,64)")
    p.add_argument("--tol", type=_pos_float, default=1e-3, help="rtol = atol while training (default 1e-3)")
    p.add_argument("--eval-tol", type=_pos_float, default=1e-5, help="rtol = atol for the test NLL (default 1e-5)")
    p.add_argument("--n-test", type=_pos_int, default=4000, help="test points (default %(default)s)")
    p.add_argument("--grid", type=_pos_int, default=100, help="density heatmap resolution (default %(default)s)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="data, init, minibatches (default 0)")
    # The demo shows the whole story: JSP at init, training with the masks, then the same model on
    # the block-sparse kernels. 8x8 blocks because the field is only 64 wide; --prune none: dense.
    _add_prune(p, default="jsp", sparsity=0.8, granularity="block", block=(8, 8))
    p.add_argument("--threads", type=_pos_int, default=1, help="torch CPU threads (default 1: fastest for this size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_demo(args) -> int:
    """Prune (JSP) and train a small CNF on a 2-D toy set; write PNGs and metrics.json; time it sparse."""
    import torch
    import jsp_fast as jf
    from . import _plots

    t_start = time.perf_counter()
    _set_threads(args.threads)
    if args.dataset.lower() not in jf.data.TOY_NAMES:
        raise UsageError(f"demo needs a 2-D toy set; {args.dataset!r} is not one of {', '.join(jf.data.TOY_NAMES)}")
    out = Path(args.out)
    _prepare_out(out)
    name = args.dataset.lower()
    ds = jf.data.get(name, n=20_000, seed=args.seed)
    test = jf.data.toy(name, args.n_test, seed=args.seed + 1_000)
    torch.manual_seed(args.seed)
    model = jf.CNF(2, hidden=args.hidden, rtol=args.tol, atol=args.tol)
    say = (lambda *a: None) if args.no_progress else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"demo: {name}, CNF 2-{'-'.join(map(str, args.hidden))}-2, {args.steps} steps of {args.batch_size} "
        f"-> {out}/")
    t = time.perf_counter()
    pruned = _maybe_prune(args, model, ds.train, args.seed)
    t_prune = time.perf_counter() - t
    t = time.perf_counter()
    hist = jf.train(model, ds.train, ds.val[:1000], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    eval_every=max(1, args.steps // 5), seed=args.seed, progress=not args.no_progress)
    t_train = time.perf_counter() - t
    last = hist[-1]

    say("demo: evaluating the test NLL, sampling, density grid")
    t = time.perf_counter()
    model.eval()
    model.rtol = model.atol = args.eval_tol
    with torch.no_grad():
        logp, stats = model.log_prob(test, return_stats=True)
    test_nfe = model.nfe["forward"]
    test_nll = float(-logp.double().mean())
    t_eval = time.perf_counter() - t
    true_nll = None
    if ds.log_prob is not None:
        true_nll = float(-ds.log_prob(test).double().mean())
    model.rtol = model.atol = min(1e-4, args.tol)
    t = time.perf_counter()
    samples = model.sample(2000, seed=args.seed)
    t_sample = time.perf_counter() - t
    lim = _toy_lim(ds.train)
    t = time.perf_counter()
    grid_logp = _plots.grid_log_prob(model.log_prob, lim, args.grid)
    true_grid = _plots.grid_log_prob(ds.log_prob, lim, args.grid) if ds.log_prob is not None else None
    t_grid = time.perf_counter() - t
    speed = _demo_speed(model, test, args) if pruned and args.granularity == "block" else None
    model.rtol = model.atol = args.tol

    data = ds.train[:2000]
    files = [
        _plots.scatter_png(out / "data.png", data, lim, f"{name}: data"),
        _plots.scatter_png(out / "samples.png", samples, lim, f"{name}: CNF samples", "tab:orange"),
        _plots.density_png(out / "density.png", grid_logp, lim, f"{name}: learned density"),
        _plots.overview_png(out / "demo.png", data, samples, grid_logp, true_grid, lim,
                            f"{name}: test NLL {test_nll:.3f}" + (f", true {true_nll:.3f}" if true_nll else "")),
        _plots.history_png(out / "training.png", hist.rows, true_nll),
    ]
    jf.save(out / "checkpoint", model, history=hist)
    _write_json(out / RUN_FILE, {"dataset": name, "n": 20_000, "seed": args.seed, "root": None})
    hist.to_json(out / "history.json")
    metrics = {
        "dataset": name, "seed": args.seed, "test_points": args.n_test,
        "test_nll": test_nll, "true_nll": true_nll,
        "nll_gap": None if true_nll is None else test_nll - true_nll,
        "initial_val_nll": hist[0].get("val_nll"), "final_val_nll": hist.last("val_nll"),
        "R_test": float(stats["R"].double().mean()), "R_val_batch": last.get("R"),
        "nfe": {"test_forward": test_nfe, "train_forward_last": last.get("nfe_forward"),
                "train_backward_last": last.get("nfe_backward")},
        "model": model.config(), "prune": pruned, "sparse_speed": speed,
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "tol": args.tol,
                  "eval_tol": args.eval_tol},
        "time_s": {"prune": t_prune, "train": t_train, "test_eval": t_eval, "sample": t_sample, "grid": t_grid,
                   "total": time.perf_counter() - t_start},
        "threads": __import__("torch").get_num_threads(),
        "files": sorted([f.name for f in files] + ["checkpoint", "history.json", "metrics.json", RUN_FILE]),
    }
    _write_json(out / "metrics.json", metrics)
    gap = "" if true_nll is None else f" | true {true_nll:.3f} | gap {test_nll - true_nll:+.3f} nats"
    print(f"test NLL {test_nll:.3f}{gap} | NFE {test_nfe} | {metrics['time_s']['total']:.0f} s | {out}/")
    if speed:
        print(f"block-sparse field (jf.sparsify): sample x{speed['sample_speedup']:.1f}, log_prob "
              f"x{speed['log_prob_speedup']:.1f} vs the masked dense model, max |dlogp| {speed['max_abs_dlogp']:.1e}")
    return 0


def _demo_speed(model, x, args) -> dict:
    """Masks become speed: the trained pruned model against its jf.sparsify copy, same solver and tolerance."""
    import torch
    import jsp_fast as jf

    fast = jf.sparsify(model)
    fast.rtol, fast.atol = model.rtol, model.atol
    n = min(len(x), 4000)

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2], out

    with torch.no_grad():
        t_dense, lp_dense = best_of(lambda: model.log_prob(x[:n]))
        t_fast, lp_fast = best_of(lambda: fast.log_prob(x[:n]))
        ts_dense, _ = best_of(lambda: model.sample(n, seed=args.seed))
        ts_fast, _ = best_of(lambda: fast.sample(n, seed=args.seed))
    return {"points": n, "sparse_layers": len(fast.net.layers) - len(getattr(fast.net, "dense_layers", {})),
            "dense_layers": {str(k): v for k, v in dict(getattr(fast.net, "dense_layers", {})).items()},
            "log_prob_ms": {"dense": 1e3 * t_dense, "sparse": 1e3 * t_fast},
            "sample_ms": {"dense": 1e3 * ts_dense, "sparse": 1e3 * ts_fast},
            "log_prob_speedup": t_dense / t_fast, "sample_speedup": ts_dense / ts_fast,
            "max_abs_dlogp": float((lp_dense - lp_fast).abs().max())}


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: not writable")


# -- train -----------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    _add_data(p, required=True)
    p.add_argument("--out", required=True, help="run directory: checkpoint (OUT/last), history.json, run.json")
    _add_model(p)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_pos_int, default=1000, help="total optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=_pos_int, default=256, help="default %(default)s")
    g.add_argument("--lr", type=_pos_float, default=1e-3, help="Adam learning rate (default %(default)s)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="Adam L2 weight decay (default 0)")
    g.add_argument("--reg-kinetic", type=_nonneg_float, default=0.0, help="RNODE kinetic-energy weight λ")
    g.add_argument("--reg-jacobian", type=_nonneg_float, default=0.0, help="RNODE Jacobian-norm weight λ")
    g.add_argument("--eval-every", type=_pos_int, default=100, help="validation NLL every N steps (default 100)")
    g.add_argument("--val-max", type=_pos_int, default=10_000,
                   help="validate on at most this many points (default %(default)s)")
    g.add_argument("--R-every", dest="R_every", type=_nonneg_int, default=1,
                   help="measure R on a fixed validation batch every this many steps (0: never)")
    g.add_argument("--checkpoint-every", type=_pos_int, default=None, help="default: --eval-every")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT/last exists")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="model init, minibatches and solver noise")
    _add_prune(p)
    _add_device(p)
    _add_common(p)


def cmd_train(args) -> int:
    """Train (optionally prune first) and checkpoint; resumes from OUT/last."""
    import torch
    import jsp_fast as jf
    from .checkpoint import CheckpointError

    _set_threads(args.threads)
    device = _device(args.device)
    ds = _dataset(args.dataset, args.n, args.root, args.data_seed)
    train_x, val_x = ds.train.to(device), ds.val[: args.val_max].to(device)
    out = Path(args.out)
    _prepare_out(out)
    last = out / "last"
    if args.no_resume and last.exists():
        import shutil
        shutil.rmtree(last)
    resuming = jf.checkpoint.exists(last)
    torch.manual_seed(args.seed)
    model = _build_model(args, ds.dim).to(device)
    pruned = None
    if resuming:
        print(f"resuming from {last}", file=sys.stderr)
    else:
        pruned = _maybe_prune(args, model, train_x, args.seed)
        if pruned:
            print(f"pruned with {pruned['method']}: kept {pruned['kept']}/{pruned['total']} field weights",
                  file=sys.stderr)
    info = {"dataset": ds.name, "n": args.n, "seed": args.data_seed, "root": args.root, "prune": pruned,
            "command": " ".join(shlex.quote(str(a)) for a in [PROG, *args._argv])}
    if not resuming or not (out / RUN_FILE).exists():
        _write_json(out / RUN_FILE, info)
    reg = {k: v for k, v in (("kinetic", args.reg_kinetic), ("jacobian", args.reg_jacobian)) if v > 0} or None
    try:
        hist = jf.train(model, train_x, val_x, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, reg=reg, eval_every=args.eval_every, seed=args.seed, weight_decay=args.weight_decay,
                        bits_per_dim=ds.bits_per_dim, checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
                        resume=True, progress=not args.no_progress, R_every=args.R_every)
    except CheckpointError as exc:
        raise UsageError(f"{exc} (use --no-resume to start over)") from None
    hist.to_json(out / "history.json")
    r = hist[-1]
    bpd = f" ({hist.last('val_bpd'):.3f} bits/dim)" if hist.last("val_bpd") is not None else ""
    print(f"step {r['step']}: train NLL {r.get('train_nll', float('nan')):.4f}, val NLL "
          f"{hist.last('val_nll', float('nan')):.4f}{bpd}, NFE {r.get('nfe_forward')}/{r.get('nfe_backward')}, "
          f"R {r.get('R', float('nan')):.4g} -> {last}")
    return 0


def _fast(model):
    """``--fast``: the checkpoint's pruned CNF with its field on the block-sparse kernels."""
    from .sparse._sparsify import sparsify
    fast = sparsify(model)
    if fast.net.dense_layers:
        print(f"--fast: layers left dense: {fast.net.dense_layers}", file=sys.stderr)
    return fast


# -- sample ----------------------------------------------------------------------------------------
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a train --out directory)")
    p.add_argument("--n", type=_pos_int, default=1000, help="number of samples")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", required=True, help="output file: .npy (the samples) or .png (a plot)")
    p.add_argument("--rtol", type=_pos_float, default=None, help="override the checkpoint's solver rtol")
    p.add_argument("--atol", type=_pos_float, default=None, help="override the checkpoint's solver atol")
    p.add_argument("--fast", action="store_true", help="sparsify the pruned field (jf.sparsify): block-sparse kernels")
    _add_device(p)
    _add_common(p)


def cmd_sample(args) -> int:
    """Draw samples from a checkpoint into .npy or .png."""
    import numpy as np
    from . import _plots

    _set_threads(args.threads)
    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".png"):
        raise UsageError(f"--out {out}: expected a .npy or .png file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    model, path = _load_checkpoint(args.checkpoint, _device(args.device))
    model = _fast(model) if args.fast else model
    if args.rtol:
        model.rtol = args.rtol
    if args.atol:
        model.atol = args.atol
    t = time.perf_counter()
    x = model.sample(args.n, seed=args.seed)
    dt = time.perf_counter() - t
    if out.suffix.lower() == ".npy":
        np.save(out, x.detach().cpu().numpy())
    elif model.dim == 2:
        _plots.scatter_png(out, x, _toy_lim(x), f"{args.n} samples", "tab:orange")
    else:
        info = _run_info(path)
        side = int(round(math.sqrt(model.dim)))
        imgs = x[:64]
        if info.get("dataset") == "digits":
            import jsp_fast as jf
            imgs = jf.data.digits(seed=int(info.get("seed", 0))).to_pixels(imgs)
        if side * side != model.dim:
            raise UsageError(f"cannot plot {model.dim}-dimensional samples; use a .npy output")
        _plots.images_png(out, imgs.reshape(-1, side, side), f"{min(args.n, 64)} samples")
    print(f"{args.n} samples, NFE {model.nfe['forward']}, {dt:.2f} s -> {out}")
    return 0


# -- eval ------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a train --out directory)")
    _add_data(p)
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--max-n", type=_pos_int, default=None, help="evaluate at most this many points")
    p.add_argument("--batch-size", type=_pos_int, default=1024)
    p.add_argument("--tol", type=_pos_float, default=1e-5, help="rtol = atol for evaluation (default 1e-5)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="Hutchinson noise seed")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--fast", action="store_true", help="sparsify the pruned field (jf.sparsify): block-sparse kernels")
    _add_device(p)
    _add_common(p)


def cmd_eval(args) -> int:
    """NLL (nats, bits/dim where defined), NFE and R of a checkpoint on a dataset split."""
    import torch

    _set_threads(args.threads)
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
    device = _device(args.device)
    model, path = _load_checkpoint(args.checkpoint, device)
    model = _fast(model) if args.fast else model
    info = _run_info(path)
    name = args.dataset or info.get("dataset")
    ds = _dataset(name, args.n or info.get("n"), args.root or info.get("root"),
                  args.data_seed if args.dataset else int(info.get("seed", args.data_seed)))
    if ds.dim != model.dim:
        raise UsageError(f"dataset {ds.name} has dim {ds.dim} but the checkpoint's model has dim {model.dim}")
    x = getattr(ds, args.split)
    if args.max_n:
        x = x[: args.max_n]
    model.eval()
    model.rtol = model.atol = args.tol
    nll = bpd = R = 0.0
    nfe = []
    t = time.perf_counter()
    from tqdm.auto import tqdm
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(args.seed)
        for i in tqdm(range(0, x.shape[0], args.batch_size), desc=f"eval {ds.name}/{args.split}", unit="batch",
                      disable=args.no_progress):
            chunk = x[i:i + args.batch_size].to(device)
            logp, stats = model.log_prob(chunk, return_stats=True)
            nll -= float(logp.double().sum())
            R += float(stats["R"].double().sum())
            nfe.append(model.nfe["forward"])
            if ds.bits_per_dim is not None:
                bpd += float(ds.bits_per_dim(logp, chunk).double().sum())
    n = x.shape[0]
    res = {"checkpoint": str(path), "dataset": ds.name, "split": args.split, "n": n, "nll": nll / n,
           "bits_per_dim": bpd / n if ds.bits_per_dim is not None else None, "R": R / n,
           "nfe_forward_mean": sum(nfe) / len(nfe), "tol": args.tol, "seconds": time.perf_counter() - t}
    if ds.log_prob is not None:
        res["true_nll"] = float(-ds.log_prob(x).double().mean())
        res["nll_gap"] = res["nll"] - res["true_nll"]
    msg = f"{ds.name}/{args.split} ({n} points): NLL {res['nll']:.4f} nats"
    if res["bits_per_dim"] is not None:
        msg += f" = {res['bits_per_dim']:.4f} bits/dim"
    if "true_nll" in res:
        msg += f" (true {res['true_nll']:.4f}, gap {res['nll_gap']:+.4f})"
    print(msg + f", NFE {res['nfe_forward_mean']:.0f}, R {res['R']:.4g}, {res['seconds']:.1f} s")
    if args.json:
        _write_json(Path(args.json), res)
    return 0


# -- wiring ----------------------------------------------------------------------------------------
COMMANDS = {
    "demo": (_demo_args, cmd_demo, "a one-minute tour: train a CNF on 8gaussians, plot data/samples/density"),
    "train": (_train_args, cmd_train, "train a CNF on a dataset (optionally pruned at init), with checkpoints"),
    "sample": (_sample_args, cmd_sample, "draw samples from a checkpoint (.npy or .png)"),
    "eval": (_eval_args, cmd_eval, "test NLL / bits-per-dim and NFE of a checkpoint"),
}
EXTERNAL = {  # owned elsewhere: module exposing add_arguments(parser) and run(args) -> int
    "compare": ("jsp_fast._compare", "prune methods x sparsities x seeds on one dataset -> report"),
    "bench": ("jsp_fast._bench_cli", "benchmarks: dense vs. sparse kernels and CNFs"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib
    from . import __version__
    p = _Parser(prog=PROG, description="Pruned continuous normalizing flows that run faster "
                                       "(Jacobian Spectrum Pruning + block-sparse kernels).")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add, fn, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=fn.__doc__)
        add(sp)
        sp.set_defaults(_run=fn)
    for name, (module, help_) in EXTERNAL.items():
        try:
            mod = importlib.import_module(module)
            run = mod.run
            add = mod.add_arguments
        except (ImportError, AttributeError):
            continue  # not built yet / not shipped: the other commands still work
        sp = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
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
    from .checkpoint import CheckpointError
    from .cnf import SolverError
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
