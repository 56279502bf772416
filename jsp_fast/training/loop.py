"""Training loop: ``jf.train(model, train, val, steps=..., batch_size=..., lr=...)``.

Adam on the mean negative log-likelihood (nats), optionally with RNODE's regularisers
``λ_k ∫‖f‖² dt + λ_j ∫‖J‖_F² dt`` (``reg={"kinetic": λ_k, "jacobian": λ_j}``). After every optimizer
step ``model.apply_masks_()`` re-zeroes pruned weights, so a pruned model stays exactly as sparse as
it was pruned. Every step is logged (train NLL, NFE of the training solve, the cumulative Jacobian
norm ``R = mean ∫‖J‖_F dt`` on a fixed validation batch, wall time); the validation NLL every
``eval_every`` steps.

Determinism: minibatch ``k`` of epoch ``e`` is a pure function of ``(seed, e)``, and the global
torch RNG (Hutchinson noise) runs inside ``torch.random.fork_rng`` seeded with ``seed``, its state
saved in every checkpoint. A run resumed from a checkpoint therefore ends with the same parameters
as an uninterrupted one (same thread count, same machine). The caller's global RNG is untouched.
The order of everything that draws from that RNG (step 0's evaluation, each step's training solve,
then its ``R``/validation solves) is part of this contract.

Under torchrun (more than one process) the same function trains with DistributedDataParallel; what
changes and what stays equal to the single-process run is described in ``_ddp``.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._device import check_device
from ..errors import CheckpointError, ConfigError, ResumeMismatchError
from . import _dist
from . import _sparse
from . import checkpoint as ckpt
from ._ddp import DDPRun
from .history import History

__all__ = ["train", "REG_KEYS", "CHECKPOINT_NAME", "RESUME_MODES"]

REG_KEYS = ("kinetic", "jacobian")
CHECKPOINT_NAME = "last"  # the trainer's checkpoint lives at <checkpoint_dir>/last


# -- argument checks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    """``train``'s validated keyword arguments."""

    steps: int
    batch_size: int
    lr: float
    reg: dict[str, float]
    eval_every: int
    seed: int
    weight_decay: float
    bits_per_dim: Callable | None
    checkpoint_every: int | None
    R_batch: int
    R_every: int
    eval_batch: int
    max_grad_norm: float | None

    def settings(self, train: torch.Tensor, val: torch.Tensor | None) -> dict:
        """What a checkpoint records; a resume must match all of it but ``steps`` (see ``_resume``)."""
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "reg": self.reg, "seed": self.seed,
                "eval_every": self.eval_every, "R_batch": self.R_batch, "R_every": self.R_every,
                "eval_batch": self.eval_batch, "max_grad_norm": self.max_grad_norm,
                "n_train": int(train.shape[0]), "n_val": None if val is None else int(val.shape[0]),
                "train_data": _fingerprint(train), "val_data": None if val is None else _fingerprint(val)}


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


def _check_reg(reg) -> dict[str, float]:
    if reg is None:
        return {}
    if not isinstance(reg, Mapping):
        raise TypeError(f"reg must be None or a dict like {{'kinetic': 0.01, 'jacobian': 0.01}}, got {reg!r}")
    bad = [k for k in reg if k not in REG_KEYS]
    if bad:
        raise ValueError(f"unknown reg key(s) {bad}; expected a subset of {REG_KEYS}")
    out = {}
    for k, v in reg.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"reg[{k!r}] must be a finite number >= 0, got {v!r}")
        if v > 0:
            out[k] = float(v)
    return out


def _check_options(steps, batch_size, lr, reg, eval_every, seed, weight_decay, bits_per_dim,
                   checkpoint_every, R_batch, R_every, eval_batch, max_grad_norm) -> _Options:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and not (max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if bits_per_dim is not None and not callable(bits_per_dim):
        raise TypeError("bits_per_dim must be a callable (log_prob, x) -> bits/dim per row, or None")
    return _Options(
        steps=_positive_int("steps", steps), batch_size=_positive_int("batch_size", batch_size), lr=lr,
        reg=_check_reg(reg), eval_every=_positive_int("eval_every", eval_every), seed=_nonneg_int("seed", seed),
        weight_decay=weight_decay, bits_per_dim=bits_per_dim,
        checkpoint_every=None if checkpoint_every is None else _positive_int("checkpoint_every", checkpoint_every),
        R_batch=_positive_int("R_batch", R_batch), R_every=_nonneg_int("R_every", R_every),
        eval_batch=_positive_int("eval_batch", eval_batch), max_grad_norm=max_grad_norm)


def _check_data(model: nn.Module, x, what: str, allow_none: bool = False) -> torch.Tensor | None:
    if x is None:
        if allow_none:
            return None
        raise ValueError(f"{what} data is required")
    if hasattr(x, "train") and not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor; pass ds.train / ds.val of a jf.data dataset")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape [n, dim], got {type(x).__name__}")
    dim = getattr(model, "dim", None)
    if x.dim() != 2:
        raise ValueError(f"{what} must have shape [n, dim], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} data is empty (shape {tuple(x.shape)})")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} has dimension {x.shape[1]} but the model has dim={dim}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    check_device(x.device, what)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


def _check_inputs(model, train, val) -> tuple[torch.Tensor, torch.Tensor | None, list[nn.Parameter]]:
    """The data checked against the model; the trainable parameters."""
    train = _check_data(model, train, "train")
    val = _check_data(model, val, "val", allow_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    ref = params[0]
    for name, x in (("train", train), ("val", val)):
        if x is not None and (x.dtype != ref.dtype or x.device != ref.device):
            raise TypeError(f"{name} is {x.dtype} on {x.device} but the model is {ref.dtype} on {ref.device}")
    return train, val, params


# -- minibatches ---------------------------------------------------------------------------------------
class _Batches:
    """Epoch-shuffled minibatches where batch ``k`` depends only on ``(seed, k)``.

    The stream is the concatenation of permutations of ``range(n)``, epoch ``e``'s drawn from a
    generator seeded with ``seed * 1_000_003 + e``; batch ``k`` is items ``[kB, (k+1)B)`` of it.
    Nothing but the step number is needed to resume.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.b, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, k: int) -> torch.Tensor:
        start, parts, need = k * self.b, [], self.b
        while need:
            epoch, off = divmod(start, self.n)
            take = min(need, self.n - off)
            parts.append(self._perm_of(epoch)[off:off + take])
            start, need = start + take, need - take
        return torch.cat(parts)


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def _mean_nll(model, x: torch.Tensor, batch: int, bits_per_dim: Callable | None) -> tuple[float, float | None]:
    """Mean NLL (nats) over ``x`` in chunks, and mean bits/dim when a converter is given."""
    nll = bpd = 0.0
    for i in range(0, x.shape[0], batch):
        chunk = x[i:i + batch]
        logp = model.log_prob(chunk)
        nll -= float(logp.double().sum())
        if bits_per_dim is not None:
            bpd += float(torch.as_tensor(bits_per_dim(logp, chunk)).double().sum())
    n = x.shape[0]
    return nll / n, (bpd / n if bits_per_dim is not None else None)


@torch.no_grad()
def _measure_R(model, x: torch.Tensor) -> tuple[float, int]:
    _, stats = model.log_prob(x, return_stats=True)
    return float(stats["R"].double().mean()), int(model.nfe["forward"])


# -- RNG state and resume ------------------------------------------------------------------------------
def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"rng_torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng_cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(extra: dict, device: torch.device, path: Path) -> None:
    for key, now in (("rng_torch", torch.get_rng_state),
                     ("rng_cuda", (lambda: torch.cuda.get_rng_state(device)) if device.type == "cuda" else None)):
        if key not in extra or now is None:
            continue
        v, want = extra[key], now()
        if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.shape != want.shape:
            raise CheckpointError(f"{path}: extra {key!r}: expected a uint8 tensor of shape {tuple(want.shape)}, "
                                  f"got {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
        if key == "rng_torch":
            torch.set_rng_state(v)
        else:
            torch.cuda.set_rng_state(v, device)


def _fingerprint(x: torch.Tensor) -> dict:
    """Shape, dtype and sha256 of a data tensor: a resume on other data is caught, not trained on."""
    t = x.detach().contiguous().cpu()
    digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sha256": digest}


RESUME_MODES = ("must-match", "force")
_NOT_COMPARED = ("steps",)  # a resume may extend a run


def _check_resume(resume) -> str | None:
    if resume is True:
        return "must-match"
    if resume is False or resume is None:
        return None
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume must be 'must-match' (the default), 'force' or False, got {resume!r}")
    return resume


def _show(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('shape')} {v.get('dtype')} sha256 {str(v['sha256'])[:10]}"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _describe_masks(masks: dict[str, torch.Tensor]) -> str:
    if not masks:
        return "no masks (dense)"
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return f"{len(masks)} masked layers, density {kept / total:.3f}"


def _differences(state, model: nn.Module, settings: dict) -> list[tuple[str, Any, Any]]:
    """``(what, in the checkpoint, now)`` for every setting the resumed run would silently change."""
    diffs = []
    old = state.extra.get("settings", {})
    for k in sorted(set(old) | set(settings)):
        if k in _NOT_COMPARED or k not in old or k not in settings:
            continue  # an older checkpoint that did not record k cannot be checked on it
        if old[k] != settings[k]:
            diffs.append((k, old[k], settings[k]))
    mine = _model_config(model)
    if mine is not None:
        mine, theirs = ckpt._jsonable(mine), state.config["model"]
        for k in sorted(set(mine) | set(theirs)):
            if k == "T" and (mine.get("train_T") or theirs.get("train_T")):
                continue  # a learned end time moves during training
            if k == "sparse":
                continue  # a sparse checkpoint's layout: its kept blocks are compared as masks below
            if mine.get(k) != theirs.get(k):
                diffs.append((f"model.{k}", theirs.get(k), mine.get(k)))
    a, b = _sparse.layer_masks(state.model), _sparse.layer_masks(model)
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        da, db = _describe_masks(a), _describe_masks(b)
        if da == db:
            db += " (another pattern)"
        diffs.append(("masks", da, db))
    return diffs


def _check_optimizer_state(state, opt: torch.optim.Optimizer, path: Path) -> None:
    """The saved Adam moments fit the parameters they will update (else the first step would fail
    far from the cause)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = [i for g in state.optimizer["param_groups"] for i in g["params"]]
    if len(saved) != len(params):
        raise CheckpointError(f"{path}: the optimizer state covers {len(saved)} parameters, the model has "
                              f"{len(params)} trainable ones")
    for pos, pid in enumerate(saved):
        for key, v in state.optimizer["state"].get(pid, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(params[pos].shape):
                raise CheckpointError(f"{path}: optimizer tensor optimizer.{pid}.{key} has shape {tuple(v.shape)}, "
                                      f"its parameter {tuple(params[pos].shape)}")


def _resume(path: Path, model, opt: torch.optim.Optimizer, history: History, settings: dict,
            device: torch.device, mode: str) -> tuple[int, float]:
    """Load ``path`` into the model, optimizer, history and RNG; the step to continue from and the
    wall time already spent. Any difference between the checkpoint's settings (data, model config,
    masks, solver, optimizer) and this call's stops the run (``mode="must-match"``) or is warned
    about (``"force"``)."""
    state = ckpt.load_checkpoint(path)  # validated in full before it touches the caller's model
    why = _sparse.mismatch(model, state.config["model"])  # sparse vs dense: no setting can bridge that
    if why:
        raise CheckpointError(f"checkpoint {path} {why}")
    diffs = _differences(state, model, settings)
    if diffs:
        listing = "; ".join(f"{k}: {_show(a)} in the checkpoint, {_show(b)} now" for k, a, b in diffs)
        if mode == "must-match":
            raise ResumeMismatchError(
                f"cannot resume from {path}: it was made with other settings ({listing}). Pass "
                f"resume='force' to resume anyway, resume=False to start over, or another checkpoint_dir",
                diffs)
        warnings.warn(f"resuming from {path} with other settings ({listing}): the run will not match an "
                      f"uninterrupted one", stacklevel=3)
    ckpt._load_state_into(model, {k: v.to(device) for k, v in state.model.state_dict().items()}, state.path)
    if state.optimizer is not None:
        _check_optimizer_state(state, opt, state.path)
        try:
            opt.load_state_dict(state.optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{state.path}: the optimizer state does not fit: {exc}") from None
        for g in opt.param_groups:  # equal unless forced; then the caller's lr / weight decay win
            g["lr"], g["weight_decay"] = settings["lr"], settings["weight_decay"]
    if state.history is not None:
        history.rows = list(state.history.rows)
    _set_rng_states(state.extra, device, state.path)
    t_spent = float(history.rows[-1].get("time", 0.0)) if history.rows else 0.0
    return int(state.extra.get("step", 0)), t_spent


# -- the loop ------------------------------------------------------------------------------------------
class _Loop:
    """One training run's state; ``run(start)`` does steps ``start + 1 .. steps``."""

    def __init__(self, model, opt, params, train, val, o: _Options, history: History, settings: dict,
                 ckpt_path: Path | None, device: torch.device, callback, ddp: DDPRun | None = None):
        self.ddp = ddp  # None: this process alone; else its rank's share of a DDP run
        self.model, self.opt, self.params, self.train, self.val = model, opt, params, train, val
        self.o, self.history, self.settings, self.ckpt_path, self.device = o, history, settings, ckpt_path, device
        self.callback = callback
        self.r_x = (val if val is not None else train)[:o.R_batch]
        self.batches = _Batches(train.shape[0], o.batch_size, o.seed)
        self.ckpt_every = o.checkpoint_every or o.eval_every
        self.t0 = time.perf_counter()

    def run(self, start: int, t_spent: float, progress: bool) -> None:
        self.t0 = time.perf_counter() - t_spent
        if start == 0 and not self.history.rows:
            self._log(self._evaluate({"step": 0}, 0))
        bar = _progress_bar(start, self.o.steps) if progress and start < self.o.steps else None
        try:
            for step in range(start + 1, self.o.steps + 1):
                row = self._evaluate(self._step(step), step)
                self._log(row)
                if self.callback is not None:
                    self.callback(row)
                if bar is not None:
                    _update_bar(bar, row, self.history)
                if self.ckpt_path is not None and (step % self.ckpt_every == 0 or step == self.o.steps):
                    self._save(step)
        finally:
            if bar is not None:
                bar.close()

    def _step(self, step: int) -> dict:
        """One optimizer step on minibatch ``step - 1``; its log row."""
        model, o, ddp = self.model, self.o, self.ddp
        idx = self.batches.indices(step - 1)
        if ddp is not None:
            idx = ddp.local_indices(idx, step)
        x = self.train[idx.to(self.train.device)]
        model.train()
        log_prob = model.log_prob if ddp is None else ddp.log_prob
        if o.reg:
            logp, stats = log_prob(x, return_stats=True)
        else:
            logp, stats = log_prob(x), None
        nll = -logp.mean()
        loss = nll
        if stats is not None:
            for k, w in o.reg.items():
                loss = loss + w * stats[k].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {float(loss)} at step {step}; try a smaller lr, RNODE "
                f"regularisation or tighter solver tolerances")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
        self.opt.step()
        model.apply_masks_()
        nfe = model.nfe
        row = {"step": step, "train_nll": float(nll.detach()),
               "nfe_forward": nfe["forward"], "nfe_backward": nfe["backward"]}
        if o.bits_per_dim is not None:
            with torch.no_grad():
                row["train_bpd"] = float(torch.as_tensor(o.bits_per_dim(logp.detach(), x)).double().mean())
        if stats is not None:
            row["loss"] = float(loss.detach())
            row["train_R"] = float(stats["R"].detach().mean())
            for k in REG_KEYS:
                row[k] = float(stats[k].detach().mean())
        return row if ddp is None else ddp.reduce(row)

    def _evaluate(self, row: dict, step: int) -> dict:
        """Add ``R`` (every ``R_every`` steps) and the validation NLL (every ``eval_every``) to ``row``."""
        model, o = self.model, self.o
        was = model.training
        model.eval()
        try:
            if self.ddp is not None:
                return self.ddp.evaluate(
                    model, row, step, self.r_x, self.val, do_R=bool(o.R_every) and step % o.R_every == 0,
                    do_val=self.val is not None and (step % o.eval_every == 0 or step == o.steps),
                    eval_batch=o.eval_batch, bits_per_dim=o.bits_per_dim)
            if o.R_every and step % o.R_every == 0:
                row["R"], row["R_nfe"] = _measure_R(model, self.r_x)
            if self.val is not None and (step % o.eval_every == 0 or step == o.steps):
                row["val_nll"], bpd = _mean_nll(model, self.val, o.eval_batch, o.bits_per_dim)
                if bpd is not None:
                    row["val_bpd"] = bpd
        finally:
            model.train(was)
        return row

    def _log(self, row: dict) -> None:
        row["time"] = time.perf_counter() - self.t0
        self.history.append(row)

    def _save(self, step: int) -> None:
        extra = {"step": step, "settings": self.settings, **_rng_states(self.device)}
        if self.ddp is None:
            ckpt.save(self.ckpt_path, self.model, optimizer=self.opt, history=self.history, extra=extra)
            return
        # Rank 0 writes (atomically); the others wait, so no rank runs ahead of the last good
        # checkpoint and a resume finds it complete.
        if self.ddp.is_main:
            ckpt.save(self.ckpt_path, self.model, optimizer=self.opt, history=self.history, extra=extra)
        _dist.barrier()


def _progress_bar(start: int, steps: int):
    from tqdm.auto import tqdm
    return tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _update_bar(bar, row: dict, history: History) -> None:
    post = {"nll": f"{row['train_nll']:.3f}", "nfe": row["nfe_forward"]}
    if history.last("val_nll") is not None:
        post["val"] = f"{history.last('val_nll'):.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def _model_config(model) -> dict[str, Any] | None:
    try:
        return model.config()
    except Exception:  # noqa: BLE001 (a field without a config is still trainable)
        return None


def _wants_ddp(distributed: bool | None) -> bool:
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        return False
    if distributed is True and not (_dist.launched() or _dist.active()):
        raise ValueError("distributed=True needs several processes: launch with torchrun --nproc-per-node N "
                         "(WORLD_SIZE is unset or 1 here)")
    return _dist.launched() or _dist.active()


def train(model: nn.Module, train: torch.Tensor, val: torch.Tensor | None = None, steps: int = 1000,
          batch_size: int = 256, lr: float = 1e-3, reg: dict | None = None, eval_every: int = 100,
          seed: int = 0, weight_decay: float = 0.0, bits_per_dim: Callable | None = None,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
          resume: bool | str = "must-match", progress: bool = True, R_batch: int = 128, R_every: int = 1,
          eval_batch: int = 2048, max_grad_norm: float | None = None,
          callback: Callable[[dict], None] | None = None, distributed: bool | None = None,
          sparse: bool = False) -> History:
    """Train ``model`` (a ``jf.CNF``) by maximum likelihood with Adam; returns a ``History``.

    Args:
        model: the CNF; pruned layers (``weight_mask`` buffers) stay pruned.
        train, val: ``[n, dim]`` float tensors on the model's device/dtype. ``val`` may be None (then
            ``R`` is measured on a fixed training batch and no validation NLL is logged).
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size, lr, weight_decay: minibatch size and Adam's settings (L2 weight decay).
        reg: RNODE regularisers ``{"kinetic": λ, "jacobian": λ}`` added to the mean NLL.
        eval_every: validation NLL every this many steps (and at step 0 and the last step).
        seed: drives the minibatch order and the solver noise (Hutchinson); the caller's global
            RNG is left untouched.
        bits_per_dim: ``bits_per_dim(log_prob [n], x [n, dim]) -> [n]`` (a ``jf.data`` dataset's
            ``ds.bits_per_dim``); adds the batch / validation means ``train_bpd`` / ``val_bpd``.
        checkpoint_dir: write a checkpoint to ``<checkpoint_dir>/last`` every ``checkpoint_every``
            steps (default: every ``eval_every``) and at the end. Checked before any step: a file in
            the way or a ``last`` that is not a jsp_fast checkpoint is an error, never overwritten.
        resume: what to do with an existing ``<checkpoint_dir>/last``. ``"must-match"`` (default;
            ``True`` is the same): load it and continue from its step, but only if it was made with
            the same data (shape + sha256 of ``train``/``val``), model config, masks, solver and
            optimizer settings (``steps`` may grow); otherwise raise ``jf.errors.ResumeMismatchError``
            listing the differences. ``"force"``: resume anyway, with a warning. ``False``: start
            over (the old checkpoint is replaced at the first save).
        progress: show a tqdm progress bar.
        R_batch, R_every: the fixed validation batch (its first ``R_batch`` rows) on which
            ``R = mean ∫‖J‖_F dt`` is measured, every ``R_every`` steps (0 disables).
        eval_batch: chunk size of the validation pass.
        max_grad_norm: clip the gradient norm (off by default).
        callback: called with each logged row (on every rank of a distributed run; the rows agree).
        distributed: ``None`` (default) trains with DistributedDataParallel when launched by torchrun
            with more than one process (joining the process group it describes if none exists; it is
            left at exit) and alone otherwise; ``False`` trains this process alone even
            inside a process group; ``True`` requires torchrun. Each rank takes ``batch_size / W`` rows
            of the single-process minibatch, rank 0 writes the checkpoints, and with the exact trace
            and a fixed-step solver the run matches the single-process one up to float rounding
            (Hutchinson noise is drawn per rank; see ``jsp_fast.training._ddp``).
        sparse: train on the block-sparse kernels (``model`` block-pruned): a sparse copy of ``model`` is
            trained and its values are written back into ``model`` at the end; checkpoints are sparse.
            Layers that cannot be block-sparse stay dense (a warning lists them). See ``training/_sparse.py``.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "log_prob"):
        raise TypeError(f"model must be a jf.CNF (an nn.Module with log_prob), got {type(model).__name__}")
    o = _check_options(steps, batch_size, lr, reg, eval_every, seed, weight_decay, bits_per_dim,
                       checkpoint_every, R_batch, R_every, eval_batch, max_grad_norm)
    mode = _check_resume(resume)
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be True or False, got {sparse!r}")
    ckpt_path = None
    if checkpoint_dir is not None:
        if not isinstance(checkpoint_dir, (str, Path)):
            raise TypeError(f"checkpoint_dir must be a str or Path, got {type(checkpoint_dir).__name__}")
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        ckpt.check_target(ckpt_path)  # now, not at the first save after minutes of training
        if int(os.environ.get("RANK", "0")) == 0:  # the writer's leftovers; other nodes' pids are not ours to judge
            ckpt.clean_stale(ckpt_path)
    target = model
    if sparse:  # train a block-sparse copy; written back into `target` at the end (training/_sparse.py)
        saved = ckpt.load(ckpt_path) if ckpt_path is not None and mode is not None and ckpt.exists(ckpt_path) \
            else None
        model = _sparse.training_copy(model, saved)
    train, val, params = _check_inputs(model, train, val)
    device = params[0].device
    opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    settings = o.settings(train, val)
    history = History(meta={"settings": settings, "model": _model_config(model)})
    use_ddp = _wants_ddp(distributed)

    if use_ddp:
        _dist.join()  # launched by torchrun without a group yet: make it (kept until exit)
    with _dist.guard("training") if use_ddp else nullcontext(), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(o.seed)
        start, t_spent = 0, 0.0
        if ckpt_path is not None and mode is not None and ckpt.exists(ckpt_path):
            start, t_spent = _resume(ckpt_path, model, opt, history, settings, device, mode)
        model.apply_masks_()
        ddp = None
        if use_ddp and _dist.active():
            DDPRun.agree_on_start(start, ckpt_path)
            ddp = DDPRun(model, o.seed, o.batch_size, device)
            progress = progress and ddp.is_main
        loop = _Loop(model, opt, params, train, val, o, history, settings, ckpt_path, device, callback, ddp)
        try:
            loop.run(start, t_spent, progress)
            if ddp is not None:
                ddp.check_masks(model, "after training")
        finally:
            if ddp is not None:
                ddp.close()  # DDP's reducer must go before its process group does
            _sparse.write_back(model, target)  # no-op unless sparse
    return history
