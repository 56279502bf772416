"""``jsp-fast train``, ``sample`` and ``eval``: one ``*_args(parser)`` and one ``cmd_*(args)`` each."""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_json
from ..data import digits
from ..training import CheckpointError, exists, train
from . import _common as c
from . import plots
from ._args import UsageError, nonneg_float, nonneg_int, pos_float, pos_int

__all__ = ["train_args", "cmd_train", "sample_args", "cmd_sample", "eval_args", "cmd_eval"]


# -- train -----------------------------------------------------------------------------------------
def train_args(p: argparse.ArgumentParser) -> None:
    c.add_data(p, required=True)
    p.add_argument("--out", required=True, help="run directory: checkpoint (OUT/last), history.json, run.json")
    c.add_model(p)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=pos_int, default=1000, help="total optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=pos_int, default=256, help="default %(default)s")
    g.add_argument("--lr", type=pos_float, default=1e-3, help="Adam learning rate (default %(default)s)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="Adam L2 weight decay (default 0)")
    g.add_argument("--reg-kinetic", type=nonneg_float, default=0.0, help="RNODE kinetic-energy weight λ")
    g.add_argument("--reg-jacobian", type=nonneg_float, default=0.0, help="RNODE Jacobian-norm weight λ")
    g.add_argument("--eval-every", type=pos_int, default=100, help="validation NLL every N steps (default 100)")
    g.add_argument("--val-max", type=pos_int, default=10_000,
                   help="validate on at most this many points (default %(default)s)")
    g.add_argument("--R-every", dest="R_every", type=nonneg_int, default=1,
                   help="measure R on a fixed validation batch every this many steps (0: never)")
    g.add_argument("--checkpoint-every", type=pos_int, default=None, help="default: --eval-every")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUT/last exists")
    g.add_argument("--seed", type=nonneg_int, default=0, help="model init, minibatches and solver noise")
    g.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the block-sparse kernels (jf.train(sparse=True)); default: on for a model "
                        "pruned with --granularity block")
    c.add_prune(p)
    c.add_device(p)
    c.add_common(p)


def cmd_train(args) -> int:
    """Train (optionally prune first) and checkpoint; resumes from OUT/last."""
    c.set_threads(args.threads)
    device = c.device(args.device)
    ds = c.dataset(args.dataset, args.n, args.root, args.data_seed)
    train_x, val_x = ds.train.to(device), ds.val[: args.val_max].to(device)
    out = Path(args.out)
    c.prepare_out(out)
    last = out / "last"
    if args.no_resume and last.exists():
        shutil.rmtree(last)
    resuming = exists(last)
    torch.manual_seed(args.seed)
    model = c.build_model(args, ds.dim).to(device)
    pruned = None
    if resuming:
        print(f"resuming from {last}", file=sys.stderr)
    else:
        pruned = c.maybe_prune(args, model, train_x, args.seed)
        if pruned:
            print(f"pruned with {pruned['method']}: kept {pruned['kept']}/{pruned['total']} field weights",
                  file=sys.stderr)
    info = {"dataset": ds.name, "n": args.n, "seed": args.data_seed, "root": args.root, "prune": pruned,
            "command": c.command_line(args)}
    if not resuming or not (out / c.RUN_FILE).exists():
        atomic_write_json(out / c.RUN_FILE, info)
    pruned_as = (pruned if not resuming else c.run_info(out).get("prune")) or {}
    sparse = args.sparse if args.sparse is not None else pruned_as.get("granularity") == "block"
    reg = {k: v for k, v in (("kinetic", args.reg_kinetic), ("jacobian", args.reg_jacobian)) if v > 0} or None
    try:
        hist = train(model, train_x, val_x, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, reg=reg, eval_every=args.eval_every, seed=args.seed, weight_decay=args.weight_decay,
                     bits_per_dim=ds.bits_per_dim, checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
                     resume=True, progress=not args.no_progress, R_every=args.R_every, sparse=sparse)
    except CheckpointError as exc:
        raise UsageError(f"{exc} (use --no-resume to start over)") from None
    hist.to_json(out / "history.json")
    r = hist[-1]
    bpd = f" ({hist.last('val_bpd'):.3f} bits/dim)" if hist.last("val_bpd") is not None else ""
    print(f"step {r['step']}: train NLL {r.get('train_nll', float('nan')):.4f}, val NLL "
          f"{hist.last('val_nll', float('nan')):.4f}{bpd}, NFE {r.get('nfe_forward')}/{r.get('nfe_backward')}, "
          f"R {r.get('R', float('nan')):.4g} -> {last}")
    return 0


# -- sample ----------------------------------------------------------------------------------------
def sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a train --out directory)")
    p.add_argument("--n", type=pos_int, default=1000, help="number of samples")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", required=True, help="output file: .npy (the samples) or .png (a plot)")
    p.add_argument("--rtol", type=pos_float, default=None, help="override the checkpoint's solver rtol")
    p.add_argument("--atol", type=pos_float, default=None, help="override the checkpoint's solver atol")
    p.add_argument("--fast", action="store_true", help="sparsify the pruned field (jf.sparsify): block-sparse kernels")
    c.add_device(p)
    c.add_common(p)


def cmd_sample(args) -> int:
    """Draw samples from a checkpoint into .npy or .png."""
    c.set_threads(args.threads)
    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".png"):
        raise UsageError(f"--out {out}: expected a .npy or .png file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    model, path = c.load_checkpoint(args.checkpoint, c.device(args.device))
    model = c.fast(model) if args.fast else model
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
        plots.scatter_png(out, x, c.toy_lim(x), f"{args.n} samples", "tab:orange")
    else:
        _images_png(out, x, model.dim, c.run_info(path), args.n)
    print(f"{args.n} samples, NFE {model.nfe['forward']}, {dt:.2f} s -> {out}")
    return 0


def _images_png(out: Path, x: torch.Tensor, dim: int, info: dict, n: int) -> None:
    side = int(round(math.sqrt(dim)))
    imgs = x[:64]
    if info.get("dataset") == "digits":
        imgs = digits(seed=int(info.get("seed", 0))).to_pixels(imgs)
    if side * side != dim:
        raise UsageError(f"cannot plot {dim}-dimensional samples; use a .npy output")
    plots.images_png(out, imgs.reshape(-1, side, side), f"{min(n, 64)} samples")


# -- eval ------------------------------------------------------------------------------------------
def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (or a train --out directory)")
    c.add_data(p)
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--max-n", type=pos_int, default=None, help="evaluate at most this many points")
    p.add_argument("--batch-size", type=pos_int, default=1024)
    p.add_argument("--tol", type=pos_float, default=1e-5, help="rtol = atol for evaluation (default 1e-5)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="Hutchinson noise seed")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--fast", action="store_true", help="sparsify the pruned field (jf.sparsify): block-sparse kernels")
    c.add_device(p)
    c.add_common(p)


def cmd_eval(args) -> int:
    """NLL (nats, bits/dim where defined), NFE and R of a checkpoint on a dataset split."""
    c.set_threads(args.threads)
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
    device = c.device(args.device)
    model, path = c.load_checkpoint(args.checkpoint, device)
    model = c.fast(model) if args.fast else model
    info = c.run_info(path)
    name = args.dataset or info.get("dataset")
    ds = c.dataset(name, args.n or info.get("n"), args.root or info.get("root"),
                   args.data_seed if args.dataset else int(info.get("seed", args.data_seed)))
    if ds.dim != model.dim:
        raise UsageError(f"dataset {ds.name} has dim {ds.dim} but the checkpoint's model has dim {model.dim}")
    x = getattr(ds, args.split)
    if args.max_n:
        x = x[: args.max_n]
    model.eval()
    model.rtol = model.atol = args.tol
    t = time.perf_counter()
    res = {"checkpoint": str(path), "dataset": ds.name, "split": args.split, "n": x.shape[0],
           **_eval_sums(model, x, ds, args, device), "tol": args.tol, "seconds": time.perf_counter() - t}
    if ds.log_prob is not None:
        res["true_nll"] = float(-ds.log_prob(x).double().mean())
        res["nll_gap"] = res["nll"] - res["true_nll"]
    msg = f"{ds.name}/{args.split} ({res['n']} points): NLL {res['nll']:.4f} nats"
    if res["bits_per_dim"] is not None:
        msg += f" = {res['bits_per_dim']:.4f} bits/dim"
    if "true_nll" in res:
        msg += f" (true {res['true_nll']:.4f}, gap {res['nll_gap']:+.4f})"
    print(msg + f", NFE {res['nfe_forward_mean']:.0f}, R {res['R']:.4g}, {res['seconds']:.1f} s")
    if args.json:
        atomic_write_json(Path(args.json), res)
    return 0


def _eval_sums(model, x: torch.Tensor, ds, args, device) -> dict:
    """Mean NLL, bits/dim, R and forward NFE over ``x`` in batches, under a fixed noise seed."""
    from tqdm.auto import tqdm
    nll = bpd = R = 0.0
    nfe = []
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
    return {"nll": nll / n, "bits_per_dim": bpd / n if ds.bits_per_dim is not None else None, "R": R / n,
            "nfe_forward_mean": sum(nfe) / len(nfe)}
