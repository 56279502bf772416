"""PNG figures for the CLI: 2-D point clouds, density heatmaps on a grid, training curves, and the
figures of a ``compare`` report (R and NFE during training, test metrics against sparsity, samples).

matplotlib runs on the Agg backend (no display needed); every function writes one file and closes
its figure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..training import History
from ._records import REFERENCES, groups, mean_std

__all__ = ["grid", "grid_log_prob", "scatter_png", "density_png", "overview_png", "history_png", "nll_ylim",
           "images_png", "compare_pngs"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def grid(lim: float, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ``n × n`` grid over ``[-lim, lim]²``: (xs, ys, points [n², 2]), row-major in y."""
    xs = torch.linspace(-lim, lim, n)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    return xs, xs, torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


@torch.no_grad()
def grid_log_prob(log_prob: Callable[[torch.Tensor], torch.Tensor], lim: float, n: int,
                  chunk: int = 4096) -> torch.Tensor:
    """``log_prob`` on the grid, ``[n, n]`` (rows: y, columns: x)."""
    _, _, pts = grid(lim, n)
    out = torch.cat([log_prob(pts[i:i + chunk]).detach().float().cpu() for i in range(0, pts.shape[0], chunk)])
    return out.reshape(n, n)


def _scatter(ax, x: torch.Tensor, lim: float, title: str, color: str) -> None:
    x = x.detach().cpu()
    ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color=color, linewidths=0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _heat(ax, logp: torch.Tensor, lim: float, title: str):
    """The density ``exp(logp)`` on the grid, with axes in data units and a colour bar."""
    im = ax.imshow(logp.exp().numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma",
                   interpolation="bilinear")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("$x_1$", fontsize=8)
    ax.set_ylabel("$x_2$", fontsize=8)
    ax.tick_params(labelsize=7)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("density", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return im


def scatter_png(path: Path, x: torch.Tensor, lim: float, title: str, color: str = "tab:blue") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    _scatter(ax, x, lim, title, color)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def density_png(path: Path, logp: torch.Tensor, lim: float, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    _heat(ax, logp, lim, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def overview_png(path: Path, data: torch.Tensor, samples: torch.Tensor, logp: torch.Tensor,
                 true_logp: torch.Tensor | None, lim: float, suptitle: str = "") -> Path:
    """Data | samples | learned density | true density (when known), side by side."""
    plt = _plt()
    k = 4 if true_logp is not None else 3
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.5))
    _scatter(axes[0], data, lim, "data", "tab:blue")
    _scatter(axes[1], samples, lim, "samples", "tab:orange")
    _heat(axes[2], logp, lim, "learned density")
    if true_logp is not None:
        _heat(axes[3], true_logp, lim, "true density")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def nll_ylim(values, true_nll: float | None = None, pad: float = 0.08) -> tuple[float, float]:
    """Y-limits of an NLL-per-step plot: from the lowest value (the true density's NLL included, so its
    line sits inside the plot, not on the frame) to a high quantile, so the first steps' spike does not
    flatten the rest; ``pad`` of the range on both sides."""
    vals = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if true_nll is not None and math.isfinite(true_nll):
        vals_lo = min(vals + [true_nll]) if vals else true_nll
    else:
        vals_lo = vals[0] if vals else 0.0
    hi = vals[min(len(vals) - 1, int(0.98 * len(vals)))] if vals else vals_lo + 1.0
    hi = max(hi, vals_lo + 1e-3)
    span = hi - vals_lo
    return vals_lo - pad * span, hi + pad * span


def history_png(path: Path, history: History, true_nll: float | None = None) -> Path:
    """NLL (train, val), NFE (forward, backward) and R against the training step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    col = history.column

    ax = axes[0]
    ax.plot(*col("train_nll"), lw=0.8, alpha=0.6, label="train (batch)")
    ax.plot(*col("val_nll"), "o-", ms=3, label="validation")
    if true_nll is not None:
        ax.axhline(true_nll, color="k", ls="--", lw=0.8, label="true density")
    ax.set_ylim(*nll_ylim(col("train_nll")[1] + col("val_nll")[1], true_nll))
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(*col("nfe_forward"), lw=0.8, label="forward")
    ax.plot(*col("nfe_backward"), lw=0.8, label="backward")
    ax.set_xlabel("step")
    ax.set_ylabel("NFE per training step")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(*col("R"), lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("R = ∫‖J‖_F dt (fixed val batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def images_png(path: Path, images: torch.Tensor, title: str = "", cols: int = 8) -> Path:
    """A grid of grey images ``[n, h, w]``."""
    plt = _plt()
    images = images.detach().cpu()
    n = images.shape[0]
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].numpy(), cmap="gray_r", interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# -- compare ---------------------------------------------------------------------------------------
def _smooth(y: list, w: int) -> list:
    """Running mean over the last ``w`` values (the first ones over fewer)."""
    out, acc, q = [], 0.0, []
    for v in y:
        q.append(v)
        acc += v
        if len(q) > w:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _mean_curve(recs: list[dict], key: str, w: int):
    """(steps, mean, min, max) over seeds of a smoothed training curve, or None."""
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


class _Layout:
    """Who goes where in the compare figures: methods, sparsities, references and their colours."""

    def __init__(self, records: list[dict]):
        self.g = groups(records)
        self.methods = sorted({m for m, sp in self.g if sp is not None}, key=lambda m: (m != "jsp", m != "random", m))
        self.sparsities = sorted({sp for m, sp in self.g if sp is not None})
        self.refs = [r for r in REFERENCES if (r, None) in self.g]
        self.colors = {m: f"C{i}" for i, m in enumerate(self.methods + self.refs)}

    def runs(self, method: str, sp) -> list[dict]:
        return self.g.get((method, None if method in REFERENCES else sp), [])


def _training_png(path: Path, lay: _Layout, key: str, ylabel: str) -> None:
    """One panel per sparsity: ``key`` against the training step, mean and range over seeds."""
    plt = _plt()
    ncol = max(1, len(lay.sparsities))
    fig, axes = plt.subplots(1, ncol, figsize=(4.2 * ncol, 3.4), squeeze=False, sharey=True)
    for ax, sp in zip(axes[0], lay.sparsities or [None]):
        for m in lay.methods + lay.refs:
            recs = lay.runs(m, sp)
            c = _mean_curve(recs, key, 3 if key == "R" else 10) if recs else None
            if c is None:
                continue
            steps, mean, lo, hi = c
            ls = "--" if m in REFERENCES else "-"
            ax.plot(steps, mean, ls, color=lay.colors[m], label=m, lw=1.4)
            ax.fill_between(steps, lo, hi, color=lay.colors[m], alpha=0.12, lw=0)
        ax.set_title("references" if sp is None else f"sparsity {sp:g}")
        ax.set_xlabel("training step")
        if key == "R":
            ax.set_yscale("log")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _vs_sparsity_png(path: Path, lay: _Layout) -> None:
    """Test NLL, NFE and R against sparsity; the references as horizontal lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (key, name) in zip(axes, (("test_nll", "test NLL (nats)"), ("test_nfe_forward", "test NFE forward"),
                                       ("test_R", "test R"))):
        for m in lay.methods:
            pts = [(sp, *mean_std([r[key] for r in lay.g[(m, sp)]])) for sp in lay.sparsities if (m, sp) in lay.g]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, color=lay.colors[m], label=m)
        for r in lay.refs:
            mean, _ = mean_std([x[key] for x in lay.g[(r, None)]])
            ax.axhline(mean, ls="--", color=lay.colors[r], label=r)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(name)
        if key == "test_R":
            ax.set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _samples_png(path: Path, lay: _Layout) -> None:
    """Samples of the lowest seed: a row per sparsity, a column per method (references once, on top)."""
    plt = _plt()
    cols = lay.methods + lay.refs
    rows = lay.sparsities or [None]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.1 * len(rows)), squeeze=False)
    for i, sp in enumerate(rows):
        for j, m in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            recs = [r for r in sorted(lay.runs(m, sp), key=lambda r: r["seed"]) if r.get("samples")]
            if i == 0:
                ax.set_title(m, fontsize=9)
            if j == 0 and sp is not None:
                ax.set_ylabel(f"sparsity {sp:g}", fontsize=9)
            if not recs or (m in REFERENCES and i > 0):
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_pngs(out: Path, records: list[dict]) -> list[str]:
    """The figures of a compare report, written into ``out``; their file names."""
    lay = _Layout(records)
    _training_png(out / "R_training.png", lay, "R", "R = ∫‖J‖_F dt (fixed val batch)")
    _training_png(out / "nfe_training.png", lay, "nfe_forward", "NFE forward per step")
    _vs_sparsity_png(out / "nll_vs_sparsity.png", lay)
    _samples_png(out / "samples.png", lay)
    return ["R_training.png", "nfe_training.png", "nll_vs_sparsity.png", "samples.png"]
