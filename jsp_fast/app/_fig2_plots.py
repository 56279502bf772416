"""The figures of ``jsp-fast figure2``, built from run records as matplotlib Figures (tests inspect
their axes, labels and legends) and written by ``write_pngs``.

- ``figure2_fig``: the poster's two panels — samples of the JSP-pruned model above validation images;
  R during training for random vs JSP (mean ± std band over seeds).
- ``curves_fig``: one panel per cell, one curve per row (mean ± std band over seeds), dense dashed.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["CURVES", "color", "curves_fig", "figure2_fig", "write_pngs"]

# (file, history key, its step key, y label, log scale, smoothing window)
CURVES = (
    ("R_training.png", "R", "R_step", "R = ∫₀ᵀ ‖J‖_F dt (fixed val batch)", True, 1),
    ("nll_training.png", "val_bpd", "val_bpd_step", "validation NLL (bits/dim)", False, 1),
    ("nfe_training.png", "nfe_forward", "step", "NFE per training solve (forward)", False, 5),
)
# Without bits/dim (non-image data) the NLL panel shows the validation NLL in nats.
NLL_NATS = ("nll_training.png", "val_nll", "val_step", "validation NLL (nats)", False, 1)


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def color(method: str) -> str:
    if method == "random":
        return "C1"
    if method == "jsp":
        return "C0"
    if method == "dense":
        return "0.3"
    return "C2" if method == "jsp-abs" else "C3"


def _order(method: str) -> tuple:
    return (method != "random", method != "jsp", method == "dense", method)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or y.shape[0] < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    k = np.minimum(np.arange(1, y.shape[0] + 1), w)
    return (c[1:] - c[np.arange(y.shape[0]) + 1 - k]) / k


def band(recs: list[dict], key: str, step_key: str, w: int = 1):
    """(steps, mean, std) over seeds on the steps every record logged, or None."""
    curves = [(r.get("history", {}).get(step_key) or [], r.get("history", {}).get(key) or []) for r in recs]
    curves = [(s, v) for s, v in curves if s and len(s) == len(v)]
    if not curves:
        return None
    common = sorted(set.intersection(*(set(s) for s, _ in curves)))
    if not common:
        return None
    ys = np.array([_smooth(np.array([dict(zip(s, v))[t] for t in common], dtype=float), w) for s, v in curves])
    sd = ys.std(axis=0, ddof=1) if ys.shape[0] > 1 else np.zeros(ys.shape[1])
    return np.array(common), ys.mean(axis=0), sd


def _curve_panel(ax, by_method: dict[str, list[dict]], key: str, step_key: str, w: int, log: bool,
                 methods=None) -> None:
    for m in sorted(methods or by_method, key=_order):
        b = band(by_method.get(m, []), key, step_key, w)
        if b is None:
            continue
        steps, mean, sd = b
        n = len(by_method[m])
        ax.plot(steps, mean, "--" if m == "dense" else "-", color=color(m), lw=1.5, label=f"{m} (n={n})")
        lo = np.maximum(mean - sd, mean * 1e-3) if log else mean - sd
        ax.fill_between(steps, lo, mean + sd, color=color(m), alpha=0.18, lw=0)
    ax.set_xlabel("training step")
    if log:
        ax.set_yscale("log")


def _grid(x: list, shape: list, cols: int = 8) -> np.ndarray:
    """Flattened images [n, h·w] in [0, 1] -> one mosaic [rows·h, cols·w]."""
    h, w = shape
    imgs = np.asarray(x, dtype=float).reshape(-1, h, w)
    rows = math.ceil(imgs.shape[0] / cols)
    canvas = np.ones((rows * (h + 1), cols * (w + 1)))
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = im
    return canvas


def _points_panel(ax, pts: list, title: str, ylabel: str) -> None:
    p = np.asarray(pts, dtype=float)
    p = p[np.isfinite(p).all(1)] if p.ndim == 2 else p
    if p.ndim == 2 and p.shape[1] >= 2 and p.shape[0]:
        lim = float(np.quantile(np.abs(p[:, :2]), 0.99)) * 1.1 or 1.0
        ax.hist2d(p[:, 0], p[:, 1], bins=50, range=[[-lim, lim], [-lim, lim]], cmap="magma")
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x₁")
    ax.set_ylabel(ylabel)


def figure2_fig(by_method: dict[str, list[dict]], cell: str, val: dict | None):
    """Left: samples of the JSP-pruned model (lowest seed) above validation images. Right: R during
    training, random vs JSP (mean ± std band over seeds) in ``cell``."""
    plt = _plt()
    fig = plt.figure(figsize=(11, 5.8))
    gs = fig.add_gridspec(2, 2, width_ratios=(1, 1.35))
    ax_s, ax_v, ax_r = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[:, 1])
    jsp = sorted((r for r in by_method.get("jsp", []) if r.get("samples")), key=lambda r: r["seed"])
    shape = (jsp[0].get("samples_shape") if jsp else None) or (val or {}).get("shape")
    for ax, data, title in ((ax_s, jsp[0]["samples"] if jsp else None,
                             f"samples, JSP-pruned ({cell}, seed {jsp[0]['seed']})" if jsp else "no JSP samples"),
                            (ax_v, (val or {}).get("x"), "validation data")):
        if data is None:
            ax.axis("off")
            ax.set_title(title, fontsize=9)
            continue
        if shape:
            ax.imshow(_grid(data[:32], shape), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title + " (pixels 0-1)", fontsize=9)
        else:
            _points_panel(ax, data, title, "x₂")
    _curve_panel(ax_r, by_method, "R", "R_step", 1, True, methods=[m for m in ("random", "jsp") if m in by_method])
    ax_r.set_ylabel("R = ∫₀ᵀ ‖J‖_F dt (fixed val batch)")
    ax_r.set_title(f"R during training, {cell}: mean ± std over seeds", fontsize=10)
    if ax_r.lines:
        ax_r.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_fig(by_cell: dict[str, dict[str, list[dict]]], dense: list[dict], spec: tuple):
    """One panel per cell of the ``spec`` curve (an entry of CURVES), every row, dense dashed."""
    plt = _plt()
    _, key, step_key, ylabel, log, w = spec
    cells = list(by_cell) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], cells):
        rows = dict(by_cell.get(cell, {}))
        if dense:
            rows["dense"] = dense
        _curve_panel(ax, rows, key, step_key, w, log)
        ax.set_title(cell, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel + (f", running mean of {w}" if w > 1 else ""))
    fig.tight_layout()
    return fig


def write_pngs(out: Path, by_cell: dict, dense: list[dict], headline: str, val: dict | None,
               bpd: bool) -> list[str]:
    """figure2.png (the ``headline`` cell), ``figure2-<cell>.png`` for every other cell (the JSP samples
    of a cell whose JSP runs collapsed say little; another cell's may), and the curve figures in ``out``;
    their file names."""
    plt = _plt()
    files = []
    figs = [("figure2.png", figure2_fig(by_cell.get(headline, {}), headline, val))]
    figs += [(f"figure2-{cell}.png", figure2_fig(rows, cell, val)) for cell, rows in by_cell.items() if cell != headline]
    for spec in CURVES:
        spec = spec if bpd or spec[1] != "val_bpd" else NLL_NATS
        figs.append((spec[0], curves_fig(by_cell, dense, spec)))
    for name, fig in figs:
        fig.savefig(Path(out) / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files
