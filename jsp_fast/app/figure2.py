"""``jsp-fast figure2``: the poster's Figure 2 on real digits — JSP against random pruning of the same init.

For every seed one initialization is pruned to ``--sparsity`` (0.9) by JSP (the poster's signed score
``dR ⊙ dL``, the largest kept, global scope) and by random scores, in every *cell*: granularity
(``block``: the tiles the sparse kernels run; ``unstructured``) × which layers are prunable (``all``;
``hidden``: every layer but the field's first and last). Which layers are prunable decides the outcome
(with all of them JSP starves the hidden layers), so both are reported, as separate cells. Each cell
also holds the two natural variants of the score, as separate rows, never instead of it: ``jsp-abs``
(rank by ``|dR ⊙ dL|``) and ``jsp-rounds<k>`` (progressive JSP, rescored over ``k`` rounds). A dense
model per seed is the reference. Every model is trained the same way and measured the same way:

- during training, every ``--R-every`` steps, ``R = ∫_0^T ‖J‖_F dt`` on a fixed batch of validation
  points (exact for dim <= 16, else ``--probes`` Rademacher vectors per point averaged before the
  square root; ``jsp_fast.cnf._measure``), and the train / validation NLL and bits/dim;
- at the end (``app/_evaluate.py``): test NLL, bits/dim and the NFE of a *plain* ``log_prob`` solve at
  ``--eval-tol``, and ``R`` on ``--n-R`` test points; samples.

Outputs in ``--out``: ``runs/<cell>/<run>.json`` (one record per run, the ``compare`` record format;
an existing record with the same settings is reused, so an interrupted command resumes), then
``report.md`` (tables, paired JSP-vs-random statistics with t-intervals and sign tests,
significance), ``figure2.png`` (samples of the JSP-pruned model above validation images | R during
training, JSP vs random, mean ± std over seeds), ``R_training.png``, ``nll_training.png`` and
``nfe_training.png`` (one panel per cell).

Sizing (defaults, ``--dataset mnist14``: 196-d, 2×2-pooled 5k MNIST subset): field 196→224→224→196
tanh, Hutchinson trace, dopri5 at rtol = atol = 1e-3 while training, 14×14 blocks, 200 Adam steps of
batch 128 at lr 2e-3, evaluation at 1e-4 on the 1,000 test images; 4 cells × (random, jsp, jsp-abs,
jsp-rounds10) × 3 seeds + 3 dense = 51 runs. Measured: one 150-step run takes 30 s of CPU time on
one thread (0.2 s per step including R curve, evaluation and samples; NFE grows from 14 to 50-100
during training), so the default is about 40-60 minutes on two quiet cores. ``--dataset mnist
--device cuda`` (784-d, 1024-wide, 16×16 blocks) is the GPU version; ``--dataset 8gaussians`` and the
other toy sets work too (64-wide fields, exact trace and exact R, 8×8 blocks).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_write_json, atomic_write_text
from ..cnf import CNF, TRACES
from ..cnf._measure import EXACT_MAX_DIM, PROBES, jacobian_norm
from ..data import get as get_data
from ..prune import prune
from ..training import train
from . import _common, _fig2_report
from ._args import (
    UsageError,
    names,
    nonneg_int,
    nonneg_ints,
    pos_float,
    pos_int,
    pos_ints,
    sparsity,
)
from ._args import block as block_shape
from ._evaluate import evaluate
from ._records import run_name
from .compare import _todo as _compare_todo
from .compare import curves

__all__ = [
    "GRANULARITIES",
    "LAYERS",
    "VARIANTS",
    "Spec",
    "add_arguments",
    "default_model",
    "plan",
    "run",
    "run_one",
]

LAYERS = ("all", "hidden")
GRANULARITIES = ("block", "unstructured")
VARIANTS = ("abs", "rounds", "none")
# Block sides tried, largest first, for the default block: it must divide the data dimension and
# every hidden width (196 = 14², so 14×14 for mnist14; 16×16 for 784-d MNIST and 64-d digits).
_BLOCK_SIDES = (16, 14, 8, 7, 4, 2, 1)
# Default hidden widths by data dimension (two hidden layers; multiples of the block side).
_HIDDEN = {196: (224, 224), 784: (1024, 1024)}


# -- arguments -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist14", help="mnist14 (default), mnist, or any jf.data name")
    p.add_argument("--out", default=None, help="output directory (default: figure2-<dataset>)")
    p.add_argument("--steps", type=pos_int, default=200, help="Adam steps per run (default %(default)s)")
    p.add_argument("--seeds", type=nonneg_ints, default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--sparsity", type=sparsity, default=0.9, help="fraction of prunable weights removed")
    p.add_argument("--layers", type=names(LAYERS), default="all,hidden",
                   help="prunable layers, one cell each: all, hidden or both (default all,hidden)")
    p.add_argument("--granularity", type=names(GRANULARITIES), default="block,unstructured",
                   help="one cell each: block, unstructured or both (default both)")
    p.add_argument("--variants", type=names(VARIANTS), default="abs,rounds",
                   help="extra JSP rows per cell: abs (|score|), rounds (progressive), none (default abs,rounds)")
    p.add_argument("--rounds", type=pos_int, default=10, help="rounds of the progressive JSP row (default 10)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference runs")
    p.add_argument("--no-sparse", action="store_true",
                   help="train block cells as masked dense models (default: on the block-sparse kernels, as "
                        "jf.train(sparse=True); the same trajectory up to float rounding, several times faster)")
    p.add_argument("--hidden", type=pos_ints, default=None,
                   help="hidden widths (default: 224,224 for 196-d, 1024,1024 for 784-d, 64,64,64 for dim <= 8, "
                        "else 256,256)")
    p.add_argument("--block", type=block_shape, default=None,
                   help="block rows,cols (default: the largest of 16, 14, 8, ... dividing dim and the widths)")
    p.add_argument("--trace", default=None, choices=TRACES, help="default: exact for dim <= 8, else hutchinson")
    p.add_argument("--tol", type=pos_float, default=1e-3, help="rtol = atol while training (default 1e-3)")
    p.add_argument("--eval-tol", type=pos_float, default=1e-4, help="rtol = atol of the test evaluation")
    p.add_argument("--batch-size", type=pos_int, default=128)
    p.add_argument("--lr", type=pos_float, default=2e-3)
    p.add_argument("--eval-every", type=pos_int, default=None,
                   help="validation NLL every this many steps (default: steps // 5)")
    p.add_argument("--R-every", dest="R_every", type=pos_int, default=10,
                   help="measure R on the fixed validation batch every this many steps (default 10)")
    p.add_argument("--R-batch", dest="R_batch", type=pos_int, default=64, help="validation points R is measured on")
    p.add_argument("--probes", type=pos_int, default=PROBES,
                   help=f"Rademacher vectors per point for R when dim > {EXACT_MAX_DIM} (default %(default)s)")
    p.add_argument("--n-test", type=pos_int, default=1000, help="test points for the final NLL and NFE (at most)")
    p.add_argument("--n-R", dest="n_R", type=pos_int, default=256, help="test points for the final R")
    p.add_argument("--n-samples", type=nonneg_int, default=None,
                   help="samples drawn per run (default: 64 images, or 1000 points for non-image data)")
    p.add_argument("--prune-batch", type=pos_int, default=256, help="training points the pruning scores use")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=pos_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and the figures from the runs")


def _check_args(args) -> None:
    if "none" in args.variants and len(args.variants) > 1:
        raise UsageError(f"--variants none cannot be combined with others, got {','.join(args.variants)}")


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One run: its cell (``<granularity>-<layers>`` or ``dense``), row label and seed, and how it prunes."""

    cell: str
    method: str
    seed: int
    granularity: str | None = None
    layers: str | None = None
    prune_method: str | None = None
    abs_scores: bool = False
    rounds: int = 1
    sparsity: float | None = None  # None for dense


def _variants(args) -> list[tuple[str, str, bool, int]]:
    """(label, jf.prune method, abs_scores, rounds) of the rows of a cell, random first."""
    rows = [("random", "random", False, 1), ("jsp", "jsp", False, 1)]
    if "abs" in args.variants:
        rows.append(("jsp-abs", "jsp", True, 1))
    if "rounds" in args.variants:
        rows.append((f"jsp-rounds{args.rounds}", "jsp", False, args.rounds))
    return rows


def cells(args) -> list[str]:
    return [f"{g}-{lay}" for g in args.granularity for lay in args.layers]


def plan(args) -> list[Spec]:
    """Every run: dense references first, then per seed every cell's rows (so a partial run already
    holds complete pairs)."""
    out = [] if args.no_dense else [Spec("dense", "dense", s) for s in args.seeds]
    for s in args.seeds:
        for g in args.granularity:
            for lay in args.layers:
                for label, method, ab, rounds in _variants(args):
                    out.append(Spec(f"{g}-{lay}", label, s, g, lay, method, ab, rounds, args.sparsity))
    return out


# -- the model -------------------------------------------------------------------------------------
def default_model(dim: int, hidden=None, trace=None, block=None) -> tuple[tuple[int, ...], str, tuple[int, int]]:
    """(hidden widths, trace, block) for ``dim``-dimensional data, filling in what is None."""
    if hidden is None:
        hidden = _HIDDEN.get(dim, (64, 64, 64) if dim <= 8 else (256, 256))
    trace = trace or ("exact" if dim <= 8 else "hutchinson")
    if block is None:
        # dim <= 8: the 2-wide layers fall back to unstructured masks (jf.prune's fallback); the
        # block is chosen for the hidden layers.
        # 8×8 on the 64-wide toy fields, as in docs/results (16×16 leaves ~2 blocks per layer at 90%).
        g = math.gcd(8, *hidden) if dim <= 8 else math.gcd(dim, *hidden)
        side = next(b for b in _BLOCK_SIDES if g % b == 0)
        block = (side, side)
    return tuple(int(h) for h in hidden), trace, tuple(block)


def _dataset(args, seed: int, cache: dict):
    if seed not in cache:
        try:
            cache[seed] = get_data(args.dataset, seed=seed)
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
    return cache[seed]


def _settings(args, spec: Spec, dim: int) -> dict:
    """What changes a run's result; a stored run is reused only when every key matches."""
    hidden, trace, block = default_model(dim, args.hidden, args.trace, args.block)
    s = {"dataset": args.dataset, "hidden": ",".join(map(str, hidden)), "trace": trace, "tol": args.tol,
         "eval_tol": args.eval_tol, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
         "eval_every": _eval_every(args), "R_every": args.R_every, "R_batch": args.R_batch, "probes": args.probes,
         "n_test": args.n_test, "n_R": args.n_R}
    if spec.cell != "dense":
        s.update(granularity=spec.granularity, layers=spec.layers, block=f"{block[0]},{block[1]}",
                 prune_batch=args.prune_batch, sparsity=args.sparsity, rounds=args.rounds)
    return s


def _eval_every(args) -> int:
    return args.eval_every or max(1, args.steps // 5)


def _pixels01(ds, x: torch.Tensor) -> tuple[torch.Tensor, list | None]:
    """Images in [0, 1] (flattened rows) and their shape, or the points unchanged (non-image data)."""
    if getattr(ds, "to_pixels", None) is not None and getattr(ds, "shape", None):
        return ds.to_pixels(x.detach().cpu()) / (ds.info.get("levels", 256) - 1), list(ds.shape)
    return x.detach().cpu(), None


def _samples(model, ds, n: int | None, seed: int) -> dict:
    """Samples for the figure; a failure is recorded, not raised (it must not lose a trained run)."""
    images = bool(getattr(ds, "shape", None))
    n = (64 if images else 1000) if n is None else n
    if n <= 0:
        return {}
    try:
        s = model.sample(min(n, 64) if images else n, seed=seed)
        s, shape = _pixels01(ds, s)
        out = {"samples": [[round(float(v), 4) for v in row] for row in s]}
        if shape:
            out["samples_shape"] = shape
        return out
    except Exception as exc:  # noqa: BLE001
        return {"samples_error": f"{type(exc).__name__}: {exc}"}


def _dead_inputs(first_layer_inputs) -> int | None:
    return None if first_layer_inputs is None else int((first_layer_inputs == 0).sum())


def _block_sparse(model: CNF, block) -> tuple[CNF, bool]:
    """``(jf.sparsify(model, block=block), True)`` when a layer of the model block-pruned with ``block``
    runs block-sparse, else ``(model, False)``. Layers that cannot (a 2-d input layer) stay dense inside
    the sparse model."""
    from ..sparse import sparsify  # noqa: PLC0415  (the compute layer: not imported by `--help`)

    out = sparsify(model, block=block)
    return (out, True) if out.net.sparse_layers else (model, False)


def run_one(args, spec: Spec, ds, device: torch.device, on_step=None) -> dict:
    """Build, prune (unless dense), train and evaluate one model; returns its record."""
    dim = int(ds.dim)
    hidden, trace, block = default_model(dim, args.hidden, args.trace, args.block)
    torch.manual_seed(spec.seed)  # the same initialization for every row at this seed (built on the CPU)
    model = CNF(dim, hidden=hidden, trace=trace, rtol=args.tol, atol=args.tol)
    model.to(device)
    train_x, val_x, test_x = (t.to(device) for t in (ds.train, ds.val, ds.test))
    record = {"dataset": args.dataset, "cell": spec.cell, "method": spec.method, "sparsity": spec.sparsity,
              "seed": spec.seed, "settings": _settings(args, spec, dim),
              "config": {"dim": dim, "hidden": list(hidden), "trace": trace, "solver": model.solver, "tol": args.tol,
                         "eval_tol": args.eval_tol, "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "T": float(model.T), "device": str(device)}}
    # The pairing rests on this: every row of a seed starts from these very weights.
    record["init_checksum"] = float(sum(p.detach().double().sum() for p in model.parameters()))
    t0 = time.perf_counter()
    if spec.cell != "dense":
        gen = torch.Generator().manual_seed(spec.seed)
        idx = torch.randperm(train_x.shape[0], generator=gen)[: args.prune_batch].to(device)
        res = prune(model, spec.prune_method, args.sparsity, train_x[idx], granularity=spec.granularity,
                    block=block, scope="global", abs_scores=spec.abs_scores, rounds=spec.rounds, seed=spec.seed,
                    layers=spec.layers)
        record["prune"] = {"method": spec.prune_method, "abs_scores": spec.abs_scores, "rounds": spec.rounds,
                           "granularity": spec.granularity, "block": list(block), "layers": spec.layers,
                           "seconds": res.seconds, "density": res.density, "kept": res.kept, "total": res.total,
                           "fallback": res.fallback, "excluded": list(res.excluded),
                           "dead_inputs": _dead_inputs(res.first_layer_inputs),
                           "info": {k: v for k, v in res.info.items() if isinstance(v, (int, float))}}
    sparse = spec.granularity == "block" and not args.no_sparse
    if sparse:  # trained, measured and sampled as the sparse model itself (train's sparse copy is it)
        model, sparse = _block_sparse(model, block)
    record["sparse_training"] = sparse
    t1 = time.perf_counter()
    r_x = val_x[: args.R_batch]
    R_step, R_val = [], []

    def measure_R(step: int) -> None:
        # Own seeded probes (same for every measurement and every row): the training RNG is untouched.
        R_step.append(step)
        R_val.append(float(jacobian_norm(model, r_x, probes=args.probes, seed=spec.seed).R.double().mean()))

    def callback(row: dict) -> None:
        if row["step"] % args.R_every == 0 or row["step"] == args.steps:
            measure_R(row["step"])
        if on_step is not None:
            on_step(row)

    measure_R(0)
    bits_per_dim = getattr(ds, "bits_per_dim", None)
    hist = train(model, train_x, val_x, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 eval_every=_eval_every(args), seed=spec.seed, progress=False, R_every=0,
                 bits_per_dim=bits_per_dim, callback=callback, sparse=sparse)
    t2 = time.perf_counter()
    h = curves(hist)
    h["R_step"], h["R"] = R_step, R_val
    for key in ("train_bpd", "val_bpd"):
        steps, vals = hist.column(key)
        if steps:
            h[key + "_step"], h[key] = [int(s) for s in steps], [float(v) for v in vals]
    record["history"] = h
    record.update(evaluate(model, test_x[: args.n_test], args.eval_tol, bits_per_dim, R_points=args.n_R,
                           probes=args.probes, seed=spec.seed))
    record.update(prune_seconds=t1 - t0, train_seconds=t2 - t1, seconds_per_step=(t2 - t1) / args.steps)
    record.update(_samples(model, ds, args.n_samples, spec.seed))
    record["wall_seconds"] = time.perf_counter() - t0
    return record


# -- the whole figure --------------------------------------------------------------------------------
def _path(runs: Path, spec: Spec) -> Path:
    return runs / spec.cell / f"{run_name(spec.method, spec.sparsity, spec.seed)}.json"


def _todo(args, specs: list[Spec], runs: Path, dim: int) -> list[Spec]:
    """The specs without a stored record (``compare``'s check: a record with other settings is an error)."""
    missing = []
    for cell in dict.fromkeys(s.cell for s in specs):
        mine = [s for s in specs if s.cell == cell]
        todo = _compare_todo([(s.method, s.sparsity, s.seed) for s in mine], runs / cell,
                            _settings(args, mine[0], dim))
        missing += [s for s in mine if (s.method, s.sparsity, s.seed) in todo]
    return missing


def _run_all(args, todo: list[Spec], runs: Path, device: torch.device, cache: dict) -> list[str]:
    from tqdm import tqdm
    failed = []
    bar = tqdm(total=len(todo) * args.steps, desc=f"figure2 {args.dataset}", unit="step", dynamic_ncols=True,
               disable=args.no_progress)
    try:
        for i, spec in enumerate(todo):
            name = f"{spec.cell}/{run_name(spec.method, spec.sparsity, spec.seed)}"

            def on_step(row, name=name, i=i):
                bar.set_postfix_str(f"run {i + 1}/{len(todo)} {name} nll {row['train_nll']:.3g} "
                                    f"nfe {row['nfe_forward']}", refresh=False)
                bar.update(1)

            done = bar.n
            try:
                rec = run_one(args, spec, _dataset(args, spec.seed, cache), device, on_step)
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001 (record the failure, keep going)
                failed.append(name)
                tqdm.write(f"{name} failed: {type(exc).__name__}: {exc}")
                bar.update(done + args.steps - bar.n)
                continue
            _path(runs, spec).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(_path(runs, spec), rec, indent=None)
            bpd = f", {rec['test_bpd']:.3f} bits/dim" if "test_bpd" in rec else ""
            tqdm.write(f"{name}: test NLL {rec['test_nll']:.3f}{bpd}, NFE {rec['test_nfe_forward']}, "
                       f"R {rec['test_R']:.3g}, {rec['seconds_per_step']:.2f} s/step, {rec['wall_seconds']:.0f}s")
    finally:
        bar.close()
    return failed


def _write_val_images(out: Path, ds) -> None:
    """The validation images (or points) the figure shows under the samples."""
    images = getattr(ds, "to_pixels", None) is not None and bool(getattr(ds, "shape", None))
    x, shape = _pixels01(ds, ds.val[:32] if images else ds.val[:2000])
    atomic_write_json(out / "val_images.json", {"shape": shape, "x": [[round(float(v), 4) for v in row] for row in x]},
                      indent=None)


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("*/*.json"))]


def run(args) -> int:
    """Run what is missing of Figure 2, then rebuild the report; 1 if a run failed."""
    _check_args(args)
    _common.set_threads(args.threads)
    device = _common.device(args.device)
    out = Path(args.out or f"figure2-{args.dataset}")
    runs = out / "runs"
    meta = out / "command.txt"
    command = _common.command_line(args)
    failed: list[str] = []
    if not args.report_only:
        cache: dict = {}
        ds = _dataset(args, min(args.seeds), cache)
        runs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta, command + "\n")
        _write_val_images(out, ds)
        specs = plan(args)
        todo = _todo(args, specs, runs, int(ds.dim))
        if len(todo) < len(specs):
            print(f"{len(specs) - len(todo)} of {len(specs)} runs already done in {runs}; resuming")
        failed = _run_all(args, todo, runs, device, cache)
    elif meta.exists():
        command = meta.read_text().strip()
    if not runs.is_dir():
        raise UsageError(f"{runs} does not exist: nothing to report (run without --report-only first)")
    print(f"report: {_fig2_report.write(out, load_records(out), command)}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
