"""``jsp-fast train``, ``sample`` and ``eval``: one ``*_args(parser)`` and one ``cmd_*(args)`` each."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_json
from ..data import digits
from ..errors import CheckpointError, ConfigError, ResumeMismatchError
from ..training import _dist, exists, train
from ..training import checkpoint as ckpt
from ..training._sparse import layer_masks
from . import _common as c
from . import plots
from ._distributed import distributed, prune_once
from ._args import UsageError, nonneg_float, nonneg_int, pos_float, pos_int

__all__ = ["train_args", "cmd_train", "sample_args", "cmd_sample", "eval_args", "cmd_eval"]


_CHECKPOINT_HELP = "a checkpoint directory, or the --out directory of train or demo"


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
    g.add_argument("--no-resume", action="store_true",
                   help="start over: delete OUT/last (only if it is a jsp_fast checkpoint) and its leftovers")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume OUT/last even if it was made with other data, model, pruning or training settings")
    g.add_argument("--seed", type=nonneg_int, default=0, help="model init, minibatches and solver noise")
    g.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the block-sparse kernels (jf.train(sparse=True)); default: on for a model "
                        "pruned with --granularity block")
    c.add_prune(p)
    c.add_device(p)
    c.add_common(p)


def _ours(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether the JSON file ``path`` looks like one this command wrote (an object with ``keys``)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and all(k in d for k in keys)


def _check_run_dir(out: Path, last: Path) -> None:
    """Refuse, before any work, to overwrite or delete files this command did not write."""
    for name, keys in ((c.RUN_FILE, ("dataset", "prune")), ("history.json", ("rows",))):
        f = out / name
        if (f.exists() or f.is_symlink()) and not _ours(f, keys):
            raise UsageError(f"--out {out}: {name} exists and was not written by {c.PROG} train; refusing to "
                             f"overwrite it (move it away or choose another --out)")
    try:
        ckpt.check_target(last)
    except ConfigError as exc:
        raise UsageError(f"--out {out}: {exc}") from None


def _prune_record(args) -> dict | None:
    if args.prune in (None, "none"):
        return None
    return {"method": args.prune, "sparsity": args.sparsity, "granularity": args.granularity,
            "block": list(args.block) if args.granularity == "block" else None, "scope": args.scope}


def _prune_differences(args, out: Path) -> list[str]:
    """How ``--prune ...`` differs from the pruning recorded in OUT/run.json (what made OUT/last)."""
    try:
        old = json.loads((out / c.RUN_FILE).read_text()).get("prune")
    except (OSError, ValueError, AttributeError):
        return []
    new = _prune_record(args)
    if old is None or new is None:
        return [] if old is new else [f"prune: {old and old.get('method')} in the checkpoint, {args.prune} now"]
    return [f"prune {k}: {old.get(k)!r} in the checkpoint, {v!r} now" for k, v in new.items()
            if k in old and old.get(k) != v]


def _masks_from(last: Path, model) -> None:
    """Give ``model`` the masks of the checkpoint it resumes (pruning is not redone; ``train``
    then checks everything else against the checkpoint)."""
    mods = dict(model.named_modules())
    for name, mask in layer_masks(ckpt.load_checkpoint(last).model).items():  # dense or sparse checkpoint
        mine = mods.get(name)
        if hasattr(mine, "set_mask") and tuple(mine.linear.weight.shape) == tuple(mask.shape):
            mine.set_mask(mask)


@distributed
def cmd_train(args) -> int:
    """Train (optionally prune first) and checkpoint; resumes from OUT/last."""
    c.set_threads(args.threads)
    device = _dist.local_device(c.device(args.device))
    main = _dist.is_main()  # under torchrun: rank 0 prunes, prints and writes; all ranks train
    ds = c.dataset(args.dataset, args.n, args.root, args.data_seed)
    train_x, val_x = c.split(ds, "train").to(device), c.split(ds, "val")[: args.val_max].to(device)
    out = Path(args.out)
    c.prepare_out(out)
    last = out / "last"
    _check_run_dir(out, last)
    if args.no_resume and main:
        try:
            ckpt.discard(last)
        except (ConfigError, OSError) as exc:
            raise UsageError(f"--no-resume: {exc}") from None
    _dist.barrier()
    resuming = not args.no_resume and exists(last)
    torch.manual_seed(args.seed)
    model = c.build_model(args, ds.dim).to(device)
    pruned = None
    if resuming:
        diffs = _prune_differences(args, out)
        if diffs and not args.resume_anyway:
            raise UsageError(f"cannot resume from {last}: {'; '.join(diffs)} (use --resume-anyway, --no-resume "
                             f"or another --out)")
        if main:
            print(f"resuming from {last}", file=sys.stderr)
        try:
            _masks_from(last, model)
        except CheckpointError as exc:
            raise UsageError(f"{exc} (use --no-resume to start over)") from None
    else:
        pruned = prune_once(args, model, train_x)
        if pruned and main:
            note = c.block_note(pruned)
            print(f"pruned with {pruned['method']}: kept {pruned['kept']}/{pruned['total']} field weights"
                  + (f"; {note}" if note else ""), file=sys.stderr)
    info = {"dataset": ds.name, "n": args.n, "seed": args.data_seed, "root": args.root, "prune": pruned,
            "command": c.command_line(args)}
    if main and (not resuming or not (out / c.RUN_FILE).exists()):
        atomic_write_json(out / c.RUN_FILE, info)
    pruned_as = (pruned if not resuming else c.run_info(out).get("prune")) or {}
    # default: sparse when block pruning left at least one layer block-sparse (not when every layer fell back)
    fits = pruned_as.get("granularity") == "block" and \
        len(pruned_as.get("fallback") or {}) < pruned_as.get("layers", len(pruned_as.get("fallback") or {}) + 1)
    sparse = args.sparse if args.sparse is not None else fits
    reg = {k: v for k, v in (("kinetic", args.reg_kinetic), ("jacobian", args.reg_jacobian)) if v > 0} or None
    try:
        hist = train(model, train_x, val_x, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, reg=reg, eval_every=args.eval_every, seed=args.seed, weight_decay=args.weight_decay,
                     bits_per_dim=ds.bits_per_dim, checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
                     resume=("force" if args.resume_anyway else "must-match") if resuming else False,
                     progress=not args.no_progress, R_every=args.R_every, sparse=sparse)
    except ResumeMismatchError as exc:
        diffs = "; ".join(f"{k}: {_short(a)} in the checkpoint, {_short(b)} now" for k, a, b in exc.differences)
        raise UsageError(f"cannot resume from {last}: it was made with other settings ({diffs}); use "
                         f"--resume-anyway, --no-resume or another --out") from None
    except CheckpointError as exc:
        raise UsageError(f"{exc} (use --no-resume to start over)") from None
    if not main:
        return 0
    hist.to_json(out / "history.json")
    note = c.block_note(pruned or c.run_info(out).get("prune"))
    r = hist[-1]
    bpd = f" ({hist.last('val_bpd'):.3f} bits/dim)" if hist.last("val_bpd") is not None else ""
    print(f"step {r['step']}: train NLL {r.get('train_nll', float('nan')):.4f}, val NLL "
          f"{hist.last('val_nll', float('nan')):.4f}{bpd}, NFE {r.get('nfe_forward')}/{r.get('nfe_backward')}, "
          f"R {r.get('R', float('nan')):.4g} -> {last}" + (f" ({note})" if note else ""))
    return 0


def _short(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"data {v.get('shape')} sha256 {str(v['sha256'])[:10]}"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# -- sample ----------------------------------------------------------------------------------------
def sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--n", type=pos_int, default=1000, help="number of samples")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed")
    p.add_argument("--out", required=True, help="output file: .npy (the samples) or .png (a plot)")
    p.add_argument("--shard-size", type=pos_int, default=10_000,
                   help="samples are drawn in shards of this size, shard i from a seed derived from --seed "
                        "and i (shard 0 from --seed itself); under torchrun the shards are dealt over the "
                        "ranks, so the result does not depend on the number of processes (default %(default)s)")
    p.add_argument("--rtol", type=pos_float, default=None, help="solver rtol (default: the checkpoint's)")
    p.add_argument("--atol", type=pos_float, default=None, help="solver atol (default: the checkpoint's)")
    p.add_argument("--fast", action="store_true", help="sparsify the pruned field (jf.sparsify): block-sparse kernels")
    c.add_device(p)
    c.add_common(p)


@distributed
def cmd_sample(args) -> int:
    """Draw samples from a checkpoint into .npy or .png."""
    c.set_threads(args.threads)
    out = c.check_out_file(args.out, "--out", (".npy", ".png"))
    model, path = c.load_checkpoint(args.checkpoint, _dist.local_device(c.device(args.device)))
    side = int(round(math.sqrt(model.dim)))
    if out.suffix.lower() == ".png" and model.dim != 2 and side * side != model.dim:
        raise UsageError(f"--out {out}: cannot plot {model.dim}-dimensional samples; use a .npy output")
    model = c.fast(model) if args.fast else model
    if args.rtol:
        model.rtol = args.rtol
    if args.atol:
        model.atol = args.atol
    t = time.perf_counter()
    x, nfe = _sample_shards(model, args.n, args.seed, args.shard_size)
    dt = time.perf_counter() - t
    if not _dist.is_main():
        return 0
    if out.suffix.lower() == ".npy":
        np.save(out, x.detach().cpu().numpy())
    elif model.dim == 2:
        plots.scatter_png(out, x, c.toy_lim(x), f"{args.n} samples", "tab:orange")
    else:
        _images_png(out, x, model.dim, c.run_info(path), args.n)
    print(f"{args.n} samples, NFE {nfe}, {dt:.2f} s -> {out}")
    return 0


def _sample_shards(model, n: int, seed: int, size: int) -> tuple[torch.Tensor | None, int]:
    """The ``n`` samples, drawn shard by shard (this rank's shards; gathered in shard order on rank
    0, None elsewhere), and the largest forward NFE of a shard."""
    done = [(i, model.sample(b - a, seed=_dist.shard_seed(seed, i)).cpu(), model.nfe["forward"])
            for i, a, b in _dist.mine(_dist.shards(n, size))]
    if _dist.active():
        done = [d for part in _dist.all_gather_object(done) for d in part]
    done.sort(key=lambda d: d[0])
    return torch.cat([d[1] for d in done]), max(d[2] for d in done)


def _images_png(out: Path, x: torch.Tensor, dim: int, info: dict, n: int) -> None:
    side = int(round(math.sqrt(dim)))  # a square number: cmd_sample checked it before sampling
    imgs = x[:64]
    if info.get("dataset") == "digits":
        imgs = digits(seed=int(info.get("seed", 0))).to_pixels(imgs)
    plots.images_png(out, imgs.reshape(-1, side, side), f"{min(n, 64)} samples")


# -- eval ------------------------------------------------------------------------------------------
def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    c.add_data(p, from_run=True)
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="dataset split")
    p.add_argument("--max-n", type=pos_int, default=None,
                   help="evaluate at most this many points (default: the whole split)")
    p.add_argument("--batch-size", type=pos_int, default=1024, help="points per solve")
    p.add_argument("--tol", type=pos_float, default=1e-5, help="rtol = atol for evaluation (default 1e-5)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="Hutchinson noise seed")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--fast", action="store_true", help="sparsify the pruned field (jf.sparsify): block-sparse kernels")
    c.add_device(p)
    c.add_common(p)


@distributed
def cmd_eval(args) -> int:
    """NLL (nats, bits/dim where defined), NFE and R of a checkpoint on a dataset split."""
    c.set_threads(args.threads)
    if args.json is not None:
        c.check_out_file(args.json, "--json")
    device = _dist.local_device(c.device(args.device))
    model, path = c.load_checkpoint(args.checkpoint, device)
    model = c.fast(model) if args.fast else model
    info = c.run_info(path)
    name = args.dataset or info.get("dataset")
    seed = args.data_seed if args.dataset else int(info.get("seed", args.data_seed))
    ds = c.dataset(name, args.n or info.get("n"), args.root or info.get("root"), seed)
    if ds.dim != model.dim:
        raise UsageError(f"dataset {ds.name} has dim {ds.dim} but the checkpoint's model has dim {model.dim}")
    x = c.split(ds, args.split)
    max_n = args.max_n
    if max_n is None and not args.dataset and args.split == "test":
        max_n = info.get("test_points")  # the demo's test set: the same points its metrics.json reports
    if max_n:
        x = x[: max_n]
    model.eval()
    model.rtol = model.atol = args.tol
    t = time.perf_counter()
    res = {"checkpoint": str(path), "dataset": ds.name, "split": args.split, "data_seed": seed, "n": x.shape[0],
           **_eval_sums(model, x, ds, args, device), "tol": args.tol, "seconds": time.perf_counter() - t}
    if not _dist.is_main():
        return 0
    if ds.log_prob is not None:
        res["true_nll"] = float(-ds.log_prob(x).double().mean())
        res["nll_gap"] = res["nll"] - res["true_nll"]
    msg = f"{ds.name}/{args.split} ({res['n']} points, data seed {seed}): NLL {res['nll']:.4f} nats"
    if res["bits_per_dim"] is not None:
        msg += f" = {res['bits_per_dim']:.4f} bits/dim"
    if "true_nll" in res:
        msg += f" (true {res['true_nll']:.4f}, gap {res['nll_gap']:+.4f})"
    print(msg + f", NFE {res['nfe_forward_mean']:.0f}, R {res['R']:.4g}, {res['seconds']:.1f} s")
    if args.json:
        atomic_write_json(Path(args.json), res)
    return 0


def _eval_sums(model, x: torch.Tensor, ds, args, device) -> dict:
    """Mean NLL, bits/dim, R and forward NFE over ``x`` in batches, batch ``i``'s noise seeded from
    ``(--seed, i)`` (batch 0 from --seed itself). Under torchrun the batches are dealt over the ranks
    and their sums added in batch order, so the result does not depend on the number of processes."""
    from tqdm.auto import tqdm
    parts = []
    mine = _dist.mine(_dist.shards(x.shape[0], args.batch_size))
    with torch.random.fork_rng(), torch.no_grad():
        for i, a, b in tqdm(mine, desc=f"eval {ds.name}/{args.split}", unit="batch",
                            disable=args.no_progress or not _dist.is_main()):
            torch.manual_seed(_dist.shard_seed(args.seed, i))
            chunk = x[a:b].to(device)
            logp, stats = model.log_prob(chunk, return_stats=True)
            bpd_i = float(ds.bits_per_dim(logp, chunk).double().sum()) if ds.bits_per_dim is not None else 0.0
            parts.append((i, float(logp.double().sum()), float(stats["R"].double().sum()), model.nfe["forward"],
                          bpd_i))
    if _dist.active():
        parts = [p for rank_parts in _dist.all_gather_object(parts) for p in rank_parts]
    nll = bpd = R = 0.0
    nfe = []
    for _, logp_sum, R_sum, nfe_i, bpd_i in sorted(parts, key=lambda p: p[0]):
        nll -= logp_sum
        R += R_sum
        nfe.append(nfe_i)
        bpd += bpd_i
    n = x.shape[0]
    return {"nll": nll / n, "bits_per_dim": bpd / n if ds.bits_per_dim is not None else None, "R": R / n,
            "nfe_forward_mean": sum(nfe) / len(nfe)}
