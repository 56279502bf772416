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
import inspect
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_METHODS = "jsp,random,magnitude,snip,synflow"
REFERENCES = ("dense", "rnode")


# -- arguments -------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="8gaussians", help="a jf.data name (toy set, digits, ...)")
    p.add_argument("--out", default=None, help="output directory (default: compare-<dataset>)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of jf.prune.METHODS (default {DEFAULT_METHODS})")
    p.add_argument("--sparsities", default="0.8,0.9,0.95", help="comma list in [0, 1)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--no-references", action="store_true", help="skip the dense and RNODE runs")
    p.add_argument("--rnode", type=float, default=0.01, help="RNODE weight λ for kinetic and Jacobian terms")
    p.add_argument("--reg-pruned", type=float, default=0.0,
                   help="also train every pruned model with RNODE at this λ (default 0: plain NLL)")
    p.add_argument("--hidden", default=None, help="hidden widths, e.g. 64,64,64 (default per dataset)")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--trace", default=None, choices=("exact", "hutchinson"), help="default: exact for dim <= 8")
    p.add_argument("--solver", default="dopri5")
    p.add_argument("--tol", type=float, default=1e-3, help="rtol = atol while training")
    p.add_argument("--eval-tol", type=float, default=1e-5, help="rtol = atol for the final test evaluation")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eval-every", type=int, default=100, help="validation NLL every this many steps")
    p.add_argument("--R-every", dest="R_every", type=int, default=5,
                   help="measure R on a fixed validation batch every this many steps")
    p.add_argument("--n", type=int, default=None, help="training set size for generated data")
    p.add_argument("--n-test", type=int, default=2000, help="test points evaluated at the end (at most)")
    p.add_argument("--n-samples", type=int, default=1000, help="samples drawn per run for the grids")
    p.add_argument("--granularity", default="unstructured", choices=("unstructured", "block"))
    p.add_argument("--block", default="16,16", help="block shape rows,cols for --granularity block")
    p.add_argument("--scope", default="global", choices=("global", "layer"))
    p.add_argument("--prune-batch", type=int, default=512, help="data points used for the pruning scores")
    p.add_argument("--rounds", type=int, default=None,
                   help="pruning rounds per method (jf.prune rounds=; default: 100 for synflow, else 1)")
    p.add_argument("--root", default=None, help="data directory for file-based datasets")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and plots from the JSONs")


# -- one run ---------------------------------------------------------------------------------------
def _run_name(method: str, sparsity: float | None, seed: int) -> str:
    return f"{method}_s{seed}" if sparsity is None else f"{method}_{sparsity:g}_s{seed}"


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _history_rows(hist) -> list[dict]:
    """Normalise jf.train's history (list of dicts, dict of lists, or an object with either)."""
    for attr in ("rows", "records", "steps", "history"):
        if not isinstance(hist, (list, dict)) and hasattr(hist, attr):
            hist = getattr(hist, attr)
            break
    if not isinstance(hist, (list, dict)) and hasattr(hist, "__dict__"):
        hist = vars(hist)
    if isinstance(hist, dict):
        keys = [k for k, v in hist.items() if isinstance(v, (list, tuple))]
        n = max((len(hist[k]) for k in keys), default=0)
        return [{k: hist[k][i] for k in keys if i < len(hist[k])} for i in range(n)]
    return [dict(r) for r in hist]


def _get(row: dict, *names, default=None):
    for n in names:
        if n in row and row[n] is not None:
            v = row[n]
            return float(v.item() if isinstance(v, torch.Tensor) else v)
    return default


def _curves(hist) -> dict[str, list]:
    """Per-step curves: train NLL and NFE of the training solve; R and validation NLL where logged."""
    rows = _history_rows(hist)
    out = {"step": [], "train_nll": [], "nfe_forward": [], "nfe_backward": [], "R_step": [], "R": [],
           "val_step": [], "val_nll": []}
    for i, r in enumerate(rows):
        step = int(_get(r, "step", default=i + 1))
        tr = _get(r, "train_nll", "nll", "train_loss")
        if tr is not None:
            out["step"].append(step)
            out["train_nll"].append(tr)
            nfe = r.get("nfe")
            fwd = _get(r, "nfe_forward", "nfe_f") if not isinstance(nfe, dict) else float(nfe["forward"])
            bwd = _get(r, "nfe_backward", "nfe_b") if not isinstance(nfe, dict) else float(nfe["backward"])
            out["nfe_forward"].append(fwd)
            out["nfe_backward"].append(bwd)
        R = _get(r, "R", "train_R")
        if R is not None and math.isfinite(R):
            out["R_step"].append(step)
            out["R"].append(R)
        val = _get(r, "val_nll")
        if val is not None and math.isfinite(val):
            out["val_step"].append(step)
            out["val_nll"].append(val)
    return out


def _dataset(args, seed: int):
    from jsp_fast import data
    kw = {"seed": seed}
    if args.n is not None:
        kw["n"] = args.n
    if args.root is not None:
        kw["root"] = args.root
    return data.get(args.dataset, **kw)


def _default_hidden(dim: int) -> tuple[int, ...]:
    return (64, 64, 64) if dim <= 8 else (256, 256)


@torch.no_grad()
def _evaluate(model, x: torch.Tensor, tol: float, bits_per_dim=None) -> dict:
    rtol, atol = model.rtol, model.atol
    model.rtol = model.atol = tol
    try:
        t = time.perf_counter()
        logp, stats = model.log_prob(x, return_stats=True)
        out = {"test_nll": float(-logp.mean()), "test_nfe_forward": model.nfe["forward"],
               "test_R": float(stats["R"].mean()), "eval_seconds": time.perf_counter() - t}
        if bits_per_dim is not None:
            out["test_bpd"] = float(bits_per_dim(logp, x).mean())
        return out
    finally:
        model.rtol, model.atol = rtol, atol


SETTINGS = ("dataset", "hidden", "activation", "trace", "solver", "tol", "eval_tol", "steps", "batch_size", "lr",
            "eval_every", "R_every", "n", "n_test", "granularity", "block", "scope", "prune_batch", "rnode", "root", "rounds", "reg_pruned")


def _settings(args) -> dict:
    """The options that change a run's result; a stored run is reused only when they all match."""
    return {k: getattr(args, k) for k in SETTINGS}


def run_one(args, method: str, sparsity: float | None, seed: int) -> dict:
    """Build, prune (unless a reference), train and evaluate one model; returns the JSON record."""
    import jsp_fast as jf
    ds = _dataset(args, seed)
    dim = int(ds.dim)
    hidden = tuple(_ints(args.hidden)) if args.hidden else _default_hidden(dim)
    trace = args.trace or ("exact" if dim <= 8 else "hutchinson")
    torch.manual_seed(seed)  # the same initialisation for every method at this seed
    model = jf.CNF(dim, hidden=hidden, activation=args.activation, trace=trace, solver=args.solver,
                   rtol=args.tol, atol=args.tol)
    record = {"dataset": args.dataset, "method": method, "sparsity": sparsity, "seed": seed,
              "settings": _settings(args),
              "config": {"hidden": list(hidden), "trace": trace, "solver": args.solver, "tol": args.tol,
                         "eval_tol": args.eval_tol, "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "granularity": args.granularity, "block": args.block, "scope": args.scope,
                         "rnode": args.rnode, "prune_batch": args.prune_batch, "rounds": args.rounds,
                         "reg_pruned": args.reg_pruned}}
    t0 = time.perf_counter()
    if method not in REFERENCES:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(ds.train.shape[0], generator=gen)[: args.prune_batch]
        res = jf.prune(model, method, sparsity, ds.train[idx], granularity=args.granularity,
                       block=tuple(_ints(args.block)), scope=args.scope, seed=seed, rounds=args.rounds)
        record["prune"] = {"seconds": res.seconds, "density": res.density, "kept": res.kept,
                           "total": res.total, "fallback": res.fallback,
                           "info": {k: v for k, v in res.info.items() if isinstance(v, (int, float))}}
    t1 = time.perf_counter()
    lam = args.rnode if method == "rnode" else (args.reg_pruned if method not in REFERENCES else 0.0)
    reg = {"kinetic": lam, "jacobian": lam} if lam > 0 else None
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, reg=reg, eval_every=args.eval_every,
              seed=seed, progress=False, R_every=args.R_every, bits_per_dim=getattr(ds, "bits_per_dim", None))
    from jsp_fast.train import train
    params = inspect.signature(train).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    hist = train(model, ds.train, ds.val, **kw)
    t2 = time.perf_counter()
    record["history"] = _curves(hist)
    test = ds.test[: args.n_test]
    record.update(_evaluate(model, test, args.eval_tol, getattr(ds, "bits_per_dim", None)))
    record["train_seconds"] = t2 - t1
    record["wall_seconds"] = t2 - t0
    if args.n_samples > 0:
        try:
            s = model.sample(args.n_samples if dim <= 8 else min(args.n_samples, 64), seed=seed)
            if getattr(ds, "to_pixels", None) is not None and getattr(ds, "shape", None):
                s = ds.to_pixels(s) / 16.0  # digits' pixels take the levels 0..16
                record["samples_shape"] = list(ds.shape)
            record["samples"] = [[round(float(v), 4) for v in row] for row in s]
        except Exception as exc:  # noqa: BLE001 (a failed sample solve must not lose the run)
            record["samples_error"] = str(exc)
    if any(p.numel() for p in model.prunable_parameters().values()):
        record["final_density"] = {n: float((p != 0).float().mean()) for n, p in model.prunable_parameters().items()}
    return record


# -- the whole comparison --------------------------------------------------------------------------
def _plan(args) -> list[tuple[str, float | None, int]]:
    import jsp_fast as jf
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in jf.prune.METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected names from {jf.prune.METHODS}")
    if args.rnode < 0 or args.reg_pruned < 0:
        raise ValueError(f"--rnode and --reg-pruned must be >= 0, got {args.rnode} and {args.reg_pruned}")
    sparsities = _floats(args.sparsities)
    if any(not 0 <= s < 1 for s in sparsities):
        raise ValueError(f"sparsities must lie in [0, 1), got {sparsities}")
    seeds = _ints(args.seeds)
    plan = [] if args.no_references else [(r, None, s) for s in seeds for r in REFERENCES]
    plan += [(m, sp, s) for s in seeds for sp in sparsities for m in methods]
    return plan


def run(args) -> int:
    from tqdm import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"compare-{args.dataset}")
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    prog = Path(sys.argv[0]).name
    prog = "python -m jsp_fast._compare" if prog == "_compare.py" else shlex.quote(prog)
    command = " ".join([prog, *map(shlex.quote, sys.argv[1:])])
    meta_path = out / "command.txt"
    if command and not args.report_only:
        meta_path.write_text(command + "\n")
    try:
        plan = _plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = []
    if not args.report_only:
        todo, mine = [], _settings(args)
        for p in plan:
            path = runs / f"{_run_name(*p)}.json"
            if not path.exists():
                todo.append(p)
                continue
            theirs = json.loads(path.read_text()).get("settings", {})
            diff = sorted(k for k in mine if k in theirs and theirs[k] != mine[k])
            if diff:
                print(f"error: {path} was run with different settings "
                      f"({', '.join(f'{k}={theirs[k]!r} now {mine[k]!r}' for k in diff)}); use another --out "
                      f"or delete the stale runs", file=sys.stderr)
                return 2
        if len(todo) < len(plan):
            print(f"{len(plan) - len(todo)} of {len(plan)} runs already done in {runs}; resuming")
        bar = tqdm(todo, desc=f"compare {args.dataset}", unit="run")
        for method, sp, seed in bar:
            name = _run_name(method, sp, seed)
            bar.set_postfix_str(name)
            try:
                rec = run_one(args, method, sp, seed)
            except Exception as exc:  # noqa: BLE001 (record the failure, keep going)
                failed.append(name)
                tqdm.write(f"{name} failed: {type(exc).__name__}: {exc}")
                continue
            _atomic_json(runs / f"{name}.json", rec)
            tqdm.write(f"{name}: test NLL {rec['test_nll']:.3f}, NFE-F {rec['test_nfe_forward']}, "
                       f"R {rec['test_R']:.3g}, {rec['wall_seconds']:.0f}s")
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    path = write_report(out, records, command or (meta_path.read_text().strip() if meta_path.exists() else ""))
    print(f"report: {path}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# -- report ----------------------------------------------------------------------------------------
def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _tail(vals: list, frac: float = 0.1) -> float | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    k = max(1, int(len(vals) * frac))
    return sum(vals[-k:]) / k


def _fmt(m: float, sd: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}g} ± {sd:.2g}" if sd else f"{m:.{digits}g}"


def _label(method: str, sp) -> str:
    return method if sp is None else f"{method} @ {sp:g}"


def _smooth(y: list, w: int) -> list:
    out, acc, q = [], 0.0, []
    for v in y:
        q.append(v)
        acc += v
        if len(q) > w:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _groups(records: list[dict]) -> dict:
    g: dict = {}
    for r in records:
        g.setdefault((r["method"], r["sparsity"]), []).append(r)
    return g


def _mean_curve(recs: list[dict], key: str, w: int):
    step_key = "R_step" if key == "R" else "step"
    curves = [(r["history"][step_key], r["history"][key]) for r in recs
              if r["history"].get(key) and all(v is not None for v in r["history"][key])]
    if not curves:
        return None
    n = min(len(c[1]) for c in curves)
    steps = curves[0][0][:n]
    ys = [_smooth(c[1][:n], w) for c in curves]
    mean = [sum(col) / len(col) for col in zip(*ys)]
    lo = [min(col) for col in zip(*ys)]
    hi = [max(col) for col in zip(*ys)]
    return steps, mean, lo, hi


def _plots(out: Path, records: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = _groups(records)
    methods = sorted({m for m, sp in g if sp is not None}, key=lambda m: (m != "jsp", m != "random", m))
    sparsities = sorted({sp for m, sp in g if sp is not None})
    refs = [r for r in REFERENCES if (r, None) in g]
    colors = {m: f"C{i}" for i, m in enumerate(methods + refs)}
    files = []
    for key, ylabel, fname in (("R", "R = ∫‖J‖_F dt (fixed val batch)", "R_training.png"),
                               ("nfe_forward", "NFE forward per step", "nfe_training.png")):
        ncol = max(1, len(sparsities))
        fig, axes = plt.subplots(1, ncol, figsize=(4.2 * ncol, 3.4), squeeze=False, sharey=True)
        for ax, sp in zip(axes[0], sparsities or [None]):
            for m in methods + refs:
                recs = g.get((m, None if m in REFERENCES else sp))
                c = _mean_curve(recs, key, 3 if key == "R" else 10) if recs else None
                if c is None:
                    continue
                steps, mean, lo, hi = c
                ls = "--" if m in REFERENCES else "-"
                ax.plot(steps, mean, ls, color=colors[m], label=m, lw=1.4)
                ax.fill_between(steps, lo, hi, color=colors[m], alpha=0.12, lw=0)
            ax.set_title("references" if sp is None else f"sparsity {sp:g}")
            ax.set_xlabel("training step")
            if key == "R":
                ax.set_yscale("log")
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (key, name) in zip(axes, (("test_nll", "test NLL (nats)"), ("test_nfe_forward", "test NFE forward"),
                                       ("test_R", "test R"))):
        for m in methods:
            pts = [(sp, *_mean_std([r[key] for r in g[(m, sp)]])) for sp in sparsities if (m, sp) in g]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, color=colors[m], label=m)
        for r in refs:
            mean, sd = _mean_std([x[key] for x in g[(r, None)]])
            ax.axhline(mean, ls="--", color=colors[r], label=r)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(name)
        if key == "test_R":
            ax.set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "nll_vs_sparsity.png", dpi=110)
    plt.close(fig)
    files.append("nll_vs_sparsity.png")

    cols = methods + refs
    rows = sparsities or [None]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.1 * len(rows)), squeeze=False)
    for i, sp in enumerate(rows):
        for j, m in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            recs = sorted(g.get((m, None if m in REFERENCES else sp), []), key=lambda r: r["seed"])
            recs = [r for r in recs if r.get("samples")]
            if i == 0:
                ax.set_title(m, fontsize=9)
            if j == 0 and sp is not None:
                ax.set_ylabel(f"sparsity {sp:g}", fontsize=9)
            if not recs or (m in REFERENCES and i > 0):
                ax.axis("off") if not recs else None
                if m in REFERENCES and i > 0:
                    ax.axis("off")
                continue
            s = torch.tensor(recs[0]["samples"])
            if recs[0].get("samples_shape"):
                h, w = recs[0]["samples_shape"]
                k = int(math.sqrt(min(16, s.shape[0])))
                imgs = s[: k * k].reshape(k, k, h, w).permute(0, 2, 1, 3).reshape(k * h, k * w)
                ax.imshow(imgs.numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                s = s[torch.isfinite(s).all(1)]
                ax.hist2d(s[:, 0].numpy(), s[:, 1].numpy(), bins=40, range=[[-4, 4], [-4, 4]], cmap="magma")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    files.append("samples.png")
    return files


def write_report(out: Path, records: list[dict], command: str = "") -> Path:
    """``report.md`` (tables) and the plots, from the run records found so far."""
    out = Path(out)
    g = _groups(records)
    lines = [f"# compare: {records[0]['dataset'] if records else '(no runs)'}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    if records:
        cfg = records[0]["config"]
        lines += ["Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), ""]
        lines += ["Test metrics come from one solve of the test set at the evaluation tolerance "
                  f"(rtol = atol = {cfg['eval_tol']:g}). *(end)* columns are means over the last 10% of training at the "
                  f"training tolerance ({cfg['tol']:g}): NFE-F of the training solve, and R measured by `jf.train` on "
                  f"a fixed validation batch. NLL in nats; mean ± std over seeds.",
                  ""]
    bpd = any("test_bpd" in r for r in records)
    hdr = ("| method | sparsity | runs | test NLL | test NFE-F | test R | train NFE-F (end) | R (end) "
           "| wall s |" + (" test bits/dim |" if bpd else ""))
    lines += [hdr, "|" + "---|" * (10 if bpd else 9)]
    keys = sorted(g, key=lambda k: (k[1] is not None, k[1] or 0, k[0] != "jsp", k[0] != "random", k[0]))
    for m, sp in keys:
        recs = g[(m, sp)]
        cells = [_fmt(*_mean_std([r["test_nll"] for r in recs]), 4),
                 _fmt(*_mean_std([r["test_nfe_forward"] for r in recs])),
                 _fmt(*_mean_std([r["test_R"] for r in recs])),
                 _fmt(*_mean_std([_tail(r["history"]["nfe_forward"]) for r in recs])),
                 _fmt(*_mean_std([_tail(r["history"]["R"]) for r in recs])),
                 _fmt(*_mean_std([r["wall_seconds"] for r in recs]))]
        if bpd:
            cells.append(_fmt(*_mean_std([r.get("test_bpd", float("nan")) for r in recs]), 4))
        lines.append(f"| {m} | {'–' if sp is None else f'{sp:g}'} | {len(recs)} | " + " | ".join(cells) + " |")
    # Paired comparison against random pruning at the same sparsity and seed.
    pairs = []
    for (m, sp), recs in sorted(g.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0] != "jsp", kv[0][0])):
        if sp is None or m == "random" or ("random", sp) not in g:
            continue
        rnd = {r["seed"]: r for r in g[("random", sp)]}
        both = [(r, rnd[r["seed"]]) for r in recs if r["seed"] in rnd]
        if not both:
            continue
        dR = _mean_std([100 * (a["test_R"] / b["test_R"] - 1) for a, b in both])
        dN = _mean_std([100 * (a["test_nfe_forward"] / b["test_nfe_forward"] - 1) for a, b in both])
        dNt = _mean_std([100 * (_tail(a["history"]["nfe_forward"]) / _tail(b["history"]["nfe_forward"]) - 1)
                         for a, b in both])
        dL = _mean_std([a["test_nll"] - b["test_nll"] for a, b in both])
        wins = sum(a["test_R"] < b["test_R"] for a, b in both)
        pairs.append(f"| {m} | {sp:g} | {len(both)} | {dR[0]:+.1f} ± {dR[1]:.1f} | {wins}/{len(both)} "
                     f"| {dN[0]:+.1f} ± {dN[1]:.1f} | {dNt[0]:+.1f} ± {dNt[1]:.1f} | {dL[0]:+.4f} ± {dL[1]:.4f} |")
    if pairs:
        lines += ["", "## Against random pruning (paired by seed: same init, same data)", "",
                  "Relative change of the method's metric against random at the same sparsity; negative R and "
                  "NFE changes mean a smoother, cheaper flow; positive ΔNLL means worse likelihood.", "",
                  "| method | sparsity | pairs | ΔR test % | R lower in | ΔNFE-F test % | ΔNFE-F train (end) % "
                  "| ΔNLL test (nats) |", "|" + "---|" * 8, *pairs]
    fails = [r for r in records if r.get("samples_error")]
    if fails:
        lines += ["", "Sampling failed for: " + ", ".join(_run_name(r["method"], r["sparsity"], r["seed"]) for r in fails)]
    if records:
        files = _plots(out, records)
        lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jsp-fast compare", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
