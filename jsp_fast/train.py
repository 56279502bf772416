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
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

REG_KEYS = ("kinetic", "jacobian")
CHECKPOINT_NAME = "last"  # the trainer's checkpoint lives at <checkpoint_dir>/last


class History:
    """Per-step training records: a list of dicts (``rows``), JSON round-trippable.

    Every row has ``step``, ``train_nll`` (nats), ``nfe_forward``/``nfe_backward`` (the training
    solve), ``time`` (seconds since the run started, summed over resumes) and, when measured,
    ``R`` (mean ``∫‖J‖_F dt`` on the fixed validation batch) and ``R_nfe``. Rows at evaluation steps
    add ``val_nll`` (nats); with a bits/dim converter ``train_bpd``/``val_bpd``; with ``reg``, the
    training batch's ``train_R``, ``kinetic``, ``jacobian`` and the total ``loss``. Step 0 is the
    evaluation before any update.
    """

    def __init__(self, rows: list[dict] | None = None, meta: dict | None = None):
        self.rows: list[dict] = list(rows or [])
        self.meta: dict = dict(meta or {})

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of the rows that have ``key``."""
        pairs = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def last(self, key: str, default=None):
        """The most recent value of ``key`` (e.g. ``history.last("val_nll")``)."""
        for r in reversed(self.rows):
            if r.get(key) is not None:
                return r[key]
        return default

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        """The history as JSON; written to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping) -> "History":
        if isinstance(d, list):
            return cls(d)
        return cls(d.get("rows", []), d.get("meta", {}))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "History":
        s = str(text_or_path)
        if not s.lstrip().startswith(("{", "[")):
            s = Path(s).read_text()
        return cls.from_dict(json.loads(s))

    def __repr__(self) -> str:
        last = self.rows[-1] if self.rows else {}
        return (f"History({len(self.rows)} rows, last step {last.get('step')}, "
                f"train_nll={last.get('train_nll')}, val_nll={self.last('val_nll')})")


# -- argument checks ---------------------------------------------------------------------------------
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
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
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


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"rng_torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng_cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(extra: dict, device: torch.device) -> None:
    if "rng_torch" in extra:
        torch.set_rng_state(extra["rng_torch"])
    if device.type == "cuda" and "rng_cuda" in extra:
        torch.cuda.set_rng_state(extra["rng_cuda"], device)


# -- the loop ------------------------------------------------------------------------------------------
def train(model: nn.Module, train: torch.Tensor, val: torch.Tensor | None = None, steps: int = 1000,
          batch_size: int = 256, lr: float = 1e-3, reg: dict | None = None, eval_every: int = 100,
          seed: int = 0, weight_decay: float = 0.0, bits_per_dim: Callable | None = None,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
          resume: bool = True, progress: bool = True, R_batch: int = 128, R_every: int = 1,
          eval_batch: int = 2048, max_grad_norm: float | None = None,
          callback: Callable[[dict], None] | None = None) -> History:
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
            steps (default: every ``eval_every``) and at the end; with ``resume=True`` an existing one
            is loaded first and training continues from its step.
        progress: show a tqdm progress bar.
        R_batch, R_every: the fixed validation batch (its first ``R_batch`` rows) on which
            ``R = mean ∫‖J‖_F dt`` is measured, every ``R_every`` steps (0 disables).
        eval_batch: chunk size of the validation pass.
        max_grad_norm: clip the gradient norm (off by default).
        callback: called with each logged row.
    """
    from . import checkpoint as ckpt

    if not isinstance(model, nn.Module) or not hasattr(model, "log_prob"):
        raise TypeError(f"model must be a jf.CNF (an nn.Module with log_prob), got {type(model).__name__}")
    steps = _positive_int("steps", steps)
    batch_size = _positive_int("batch_size", batch_size)
    eval_every = _positive_int("eval_every", eval_every)
    R_batch = _positive_int("R_batch", R_batch)
    eval_batch = _positive_int("eval_batch", eval_batch)
    if isinstance(R_every, bool) or not isinstance(R_every, int) or R_every < 0:
        raise ValueError(f"R_every must be an int >= 0, got {R_every!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and not (max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if bits_per_dim is not None and not callable(bits_per_dim):
        raise TypeError("bits_per_dim must be a callable (log_prob, x) -> bits/dim per row, or None")
    if checkpoint_every is not None:
        checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    reg = _check_reg(reg)
    train = _check_data(model, train, "train")
    val = _check_data(model, val, "val", allow_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    ref = params[0]
    for name, x in (("train", train), ("val", val)):
        if x is not None and (x.dtype != ref.dtype or x.device != ref.device):
            raise TypeError(f"{name} is {x.dtype} on {x.device} but the model is {ref.dtype} on {ref.device}")

    device = ref.device
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    r_x = (val if val is not None else train)[:R_batch]
    batches = _Batches(train.shape[0], batch_size, seed)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "reg": reg, "seed": seed, "eval_every": eval_every, "R_batch": R_batch, "R_every": R_every,
                "n_train": int(train.shape[0]), "n_val": None if val is None else int(val.shape[0])}
    history = History(meta={"settings": settings, "model": _model_config(model)})
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    every = checkpoint_every or eval_every

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        start, t_offset = 0, 0.0
        if ckpt_path is not None and resume and ckpt.exists(ckpt_path):
            state = ckpt.load_checkpoint(ckpt_path, model=model)
            old = state.extra.get("settings", {})
            changed = [k for k in ("batch_size", "seed", "n_train", "reg") if k in old and old[k] != settings[k]]
            if changed:
                warnings.warn(f"resuming from {ckpt_path} with different {changed}: the run will not "
                              f"match an uninterrupted one", stacklevel=2)
            if state.optimizer is not None:
                opt.load_state_dict(state.optimizer)
                for g in opt.param_groups:  # the caller's lr / weight decay win
                    g["lr"], g["weight_decay"] = lr, weight_decay
            if state.history is not None:
                history.rows = list(state.history.rows)
            start = int(state.extra.get("step", 0))
            t_offset = float(history.rows[-1].get("time", 0.0)) if history.rows else 0.0
            _set_rng_states(state.extra, device)
        model.apply_masks_()

        t0 = time.perf_counter() - t_offset

        def save(step: int) -> None:
            extra = {"step": step, "settings": settings, **_rng_states(device)}
            ckpt.save(ckpt_path, model, optimizer=opt, history=history, extra=extra)

        def evaluate(row: dict, step: int) -> None:
            was = model.training
            model.eval()
            try:
                if R_every and step % R_every == 0:
                    row["R"], row["R_nfe"] = _measure_R(model, r_x)
                if val is not None and (step % eval_every == 0 or step == steps):
                    row["val_nll"], bpd = _mean_nll(model, val, eval_batch, bits_per_dim)
                    if bpd is not None:
                        row["val_bpd"] = bpd
            finally:
                model.train(was)

        if start == 0 and not history.rows:
            row = {"step": 0}
            evaluate(row, 0)
            row["time"] = time.perf_counter() - t0
            history.append(row)

        bar = None
        if progress and start < steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        try:
            for step in range(start + 1, steps + 1):
                x = train[batches.indices(step - 1).to(train.device)]
                model.train()
                if reg:
                    logp, stats = model.log_prob(x, return_stats=True)
                else:
                    logp, stats = model.log_prob(x), None
                nll = -logp.mean()
                loss = nll
                if stats is not None:
                    for k, w in reg.items():
                        loss = loss + w * stats[k].mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {float(loss)} at step {step}; try a smaller lr, RNODE "
                        f"regularisation or tighter solver tolerances")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                model.apply_masks_()
                nfe = model.nfe
                row = {"step": step, "train_nll": float(nll.detach()),
                       "nfe_forward": nfe["forward"], "nfe_backward": nfe["backward"]}
                if bits_per_dim is not None:
                    with torch.no_grad():
                        row["train_bpd"] = float(torch.as_tensor(bits_per_dim(logp.detach(), x)).double().mean())
                if stats is not None:
                    row["loss"] = float(loss.detach())
                    row["train_R"] = float(stats["R"].detach().mean())
                    for k in REG_KEYS:
                        row[k] = float(stats[k].detach().mean())
                evaluate(row, step)
                row["time"] = time.perf_counter() - t0
                history.append(row)
                if callback is not None:
                    callback(row)
                if bar is not None:
                    post = {"nll": f"{row['train_nll']:.3f}", "nfe": row["nfe_forward"]}
                    if history.last("val_nll") is not None:
                        post["val"] = f"{history.last('val_nll'):.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if ckpt_path is not None and (step % every == 0 or step == steps):
                    save(step)
        finally:
            if bar is not None:
                bar.close()
    return history


def _model_config(model) -> dict[str, Any] | None:
    try:
        return model.config()
    except Exception:  # noqa: BLE001 (a field without a config is still trainable)
        return None
