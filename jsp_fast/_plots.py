"""PNG figures for the CLI: 2-D point clouds, density heatmaps on a grid, training curves.

matplotlib runs on the Agg backend (no display needed); every function writes one file and closes
its figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch


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


def _heat(ax, logp: torch.Tensor, lim: float, title: str) -> None:
    ax.imshow(logp.exp().numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma",
              interpolation="bilinear")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


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
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.4))
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


def history_png(path: Path, rows: Sequence[dict], true_nll: float | None = None) -> Path:
    """NLL (train, val), NFE (forward, backward) and R against the training step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))

    def col(key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    ax = axes[0]
    ax.plot(*col("train_nll"), lw=0.8, alpha=0.6, label="train (batch)")
    ax.plot(*col("val_nll"), "o-", ms=3, label="validation")
    if true_nll is not None:
        ax.axhline(true_nll, color="k", ls="--", lw=0.8, label="true density")
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
