"""``jsp-fast demo``: the whole story in a minute or two on a CPU — JSP at initialization, training
with the masks, samples and a density plot, then the same model on the block-sparse kernels."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from .._io import atomic_write_json
from .._timing import round_robin
from ..cnf import CNF
from ..data import TOY_NAMES, get
from ..training import save, train
from . import _common as c
from . import plots
from ._args import UsageError, nonneg_int, pos_float, pos_int, pos_ints

__all__ = ["demo_args", "cmd_demo"]


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default %(default)s)")
    p.add_argument("--dataset", default="8gaussians", help="a 2-D toy set (default %(default)s)")
    p.add_argument("--steps", type=pos_int, default=200, help="training steps (default %(default)s)")
    p.add_argument("--batch-size", type=pos_int, default=256, help="default %(default)s")
    p.add_argument("--lr", type=pos_float, default=1e-2, help="Adam learning rate (default %(default)s)")
    p.add_argument("--hidden", type=pos_ints, default=(64, 64, 64), help="hidden widths (default 64,64,64)")
    p.add_argument("--tol", type=pos_float, default=1e-3, help="rtol = atol while training (default 1e-3)")
    p.add_argument("--eval-tol", type=pos_float, default=1e-5, help="rtol = atol for the test NLL (default 1e-5)")
    p.add_argument("--n-test", type=pos_int, default=4000, help="test points (default %(default)s)")
    p.add_argument("--grid", type=pos_int, default=100, help="density heatmap resolution (default %(default)s)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="data, init, minibatches (default 0)")
    # 8x8 blocks because the field is only 64 wide; --prune none: dense.
    c.add_prune(p, default="jsp", sparsity=0.8, granularity="block", block=(8, 8))
    p.add_argument("--threads", type=pos_int, default=1, help="torch CPU threads (default 1: fastest for this size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Clock:
    """Elapsed seconds per phase, for metrics.json (log stamps, not a benchmark)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.s: dict[str, float] = {}

    def phase(self, name: str, fn):
        t = time.perf_counter()
        out = fn()
        self.s[name] = time.perf_counter() - t
        return out


def cmd_demo(args) -> int:
    """Prune (JSP) and train a small CNF on a 2-D toy set; write PNGs and metrics.json; time it sparse."""
    clock = _Clock()
    c.set_threads(args.threads)
    name = args.dataset.lower()
    if name not in TOY_NAMES:
        raise UsageError(f"demo needs a 2-D toy set; {args.dataset!r} is not one of {', '.join(TOY_NAMES)}")
    out = Path(args.out)
    c.prepare_out(out)
    # The test points are the test split `jsp-fast eval --checkpoint OUT` reads back through run.json,
    # so both report the same NLL (up to eval's batching).
    n = max(20_000, 5 * args.n_test)
    ds = get(name, n=n, seed=args.seed)
    test = ds.test[: args.n_test]
    test_set = f"the {name} test split of jf.data.get(n={n}, seed={args.seed}), first {len(test)} points"
    torch.manual_seed(args.seed)
    model = CNF(2, hidden=args.hidden, rtol=args.tol, atol=args.tol)
    say = (lambda *a: None) if args.no_progress else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"demo: {name}, CNF 2-{'-'.join(map(str, args.hidden))}-2, {args.steps} steps of {args.batch_size} "
        f"-> {out}/")
    pruned = clock.phase("prune", lambda: c.maybe_prune(args, model, ds.train, args.seed))
    hist = clock.phase("train", lambda: train(
        model, ds.train, ds.val[:1000], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        eval_every=max(1, args.steps // 5), seed=args.seed, progress=not args.no_progress))

    say("demo: evaluating the test NLL, sampling, density grid")
    model.eval()
    model.rtol = model.atol = args.eval_tol
    test_nll, R_test, test_nfe = clock.phase("test_eval", lambda: _test_nll(model, test))
    true_nll = float(-ds.log_prob(test).double().mean()) if ds.log_prob is not None else None
    model.rtol = model.atol = min(1e-4, args.tol)
    samples = clock.phase("sample", lambda: model.sample(2000, seed=args.seed))
    lim = c.toy_lim(ds.train)
    grid_logp, true_grid = clock.phase("grid", lambda: (
        plots.grid_log_prob(model.log_prob, lim, args.grid),
        plots.grid_log_prob(ds.log_prob, lim, args.grid) if ds.log_prob is not None else None))
    speed = _sparse_speed(model, test, args.seed) if pruned and args.granularity == "block" else None
    model.rtol = model.atol = args.tol

    title = f"{name}: test NLL {test_nll:.3f}" + (f", true {true_nll:.3f}" if true_nll else "")
    files = _figures(out, name, ds.train[:2000], samples, grid_logp, true_grid, lim, title, hist, true_nll)
    save(out / "checkpoint", model, history=hist)
    atomic_write_json(out / c.RUN_FILE, {"dataset": name, "n": n, "seed": args.seed, "root": None,
                                         "prune": pruned, "test_points": len(test), "command": c.command_line(args)})
    hist.to_json(out / "history.json")
    last = hist[-1]
    metrics = {
        "dataset": name, "seed": args.seed, "test_points": len(test), "test_set": test_set,
        "test_nll": test_nll, "true_nll": true_nll,
        "nll_gap": None if true_nll is None else test_nll - true_nll,
        "initial_val_nll": hist[0].get("val_nll"), "final_val_nll": hist.last("val_nll"),
        "R_test": R_test, "R_val_batch": last.get("R"),
        "nfe": {"test_forward": test_nfe, "train_forward_last": last.get("nfe_forward"),
                "train_backward_last": last.get("nfe_backward")},
        "model": model.config(), "prune": pruned, "sparse_speed": speed,
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "tol": args.tol,
                  "eval_tol": args.eval_tol},
        "time_s": {**clock.s, "total": time.perf_counter() - clock.start},
        "threads": torch.get_num_threads(),
        "files": sorted([f.name for f in files] + ["checkpoint", "history.json", "metrics.json", c.RUN_FILE]),
    }
    atomic_write_json(out / "metrics.json", metrics)
    gap = "" if true_nll is None else f" | true {true_nll:.3f} | gap {test_nll - true_nll:+.3f} nats"
    note = c.block_note(pruned)
    print(f"test NLL {test_nll:.3f}{gap} | NFE {test_nfe} | {metrics['time_s']['total']:.0f} s | {out}/\n"
          f"  (test set: {test_set}; `{c.PROG} eval --checkpoint {out}` reads the same points)"
          + (f"\n  ({note})" if note else ""))
    if speed:
        print(f"block-sparse field (jf.sparsify): sample x{speed['sample_speedup']:.1f}, log_prob "
              f"x{speed['log_prob_speedup']:.1f} vs the masked dense model; |dlogp| median "
              f"{speed['median_abs_dlogp']:.1e}, max {speed['max_abs_dlogp']:.1e} at rtol = atol = "
              f"{speed['tol']:g} (the solver controls the batch's RMS error, not each point's: far-tail "
              f"points differ most)")
    return 0


def _figures(out: Path, name: str, data, samples, grid_logp, true_grid, lim: float, title: str, hist,
             true_nll: float | None) -> list[Path]:
    return [
        plots.scatter_png(out / "data.png", data, lim, f"{name}: data"),
        plots.scatter_png(out / "samples.png", samples, lim, f"{name}: CNF samples", "tab:orange"),
        plots.density_png(out / "density.png", grid_logp, lim, f"{name}: learned density"),
        plots.overview_png(out / "demo.png", data, samples, grid_logp, true_grid, lim, title),
        plots.history_png(out / "training.png", hist, true_nll),
    ]


@torch.no_grad()
def _test_nll(model, x: torch.Tensor) -> tuple[float, float, int]:
    """(mean NLL, mean R, forward NFE) of one solve over ``x``."""
    logp, stats = model.log_prob(x, return_stats=True)
    return float(-logp.double().mean()), float(stats["R"].double().mean()), model.nfe["forward"]


def _sparse_speed(model, x: torch.Tensor, seed: int, repeats: int = 3) -> dict:
    """Masks become speed: the trained pruned model against its jf.sparsify copy, same solver and
    tolerance, timed round-robin (medians); the first calls double as warm-up and accuracy check."""
    from ..sparse import sparsify  # the compiled core and kernels: only when there is a block-pruned model

    fast = sparsify(model)
    fast.rtol, fast.atol = model.rtol, model.atol
    n = min(len(x), 4000)
    xs = x[:n]
    with torch.no_grad():
        lp_dense, lp_fast = model.log_prob(xs), fast.log_prob(xs)
        t = round_robin({"log_prob_dense": lambda: model.log_prob(xs), "log_prob_sparse": lambda: fast.log_prob(xs),
                         "sample_dense": lambda: model.sample(n, seed=seed),
                         "sample_sparse": lambda: fast.sample(n, seed=seed)}, repeats=repeats, warmup=0)
    med = {k: statistics.median(v) for k, v in t.items()}
    dense_layers = dict(getattr(fast.net, "dense_layers", {}))
    return {"points": n, "sparse_layers": len(fast.net.layers) - len(dense_layers),
            "dense_layers": {str(k): v for k, v in dense_layers.items()},
            "log_prob_ms": {"dense": 1e3 * med["log_prob_dense"], "sparse": 1e3 * med["log_prob_sparse"]},
            "sample_ms": {"dense": 1e3 * med["sample_dense"], "sparse": 1e3 * med["sample_sparse"]},
            "log_prob_speedup": med["log_prob_dense"] / med["log_prob_sparse"],
            "sample_speedup": med["sample_dense"] / med["sample_sparse"],
            "max_abs_dlogp": float((lp_dense - lp_fast).abs().max()),
            "median_abs_dlogp": float((lp_dense - lp_fast).abs().median()), "tol": float(model.rtol)}
