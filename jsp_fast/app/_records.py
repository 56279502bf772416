"""The run records of ``jsp-fast compare`` (one JSON per run), as the report and the plots read them."""
from __future__ import annotations

import math

__all__ = ["REFERENCES", "run_name", "groups", "mean_std"]

REFERENCES = ("dense", "rnode")  # unpruned runs; their sparsity is None


def run_name(method: str, sparsity: float | None, seed: int) -> str:
    return f"{method}_s{seed}" if sparsity is None else f"{method}_{sparsity:g}_s{seed}"


def groups(records: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    """Records by ``(method, sparsity)``: the seeds of one configuration together."""
    g: dict = {}
    for r in records:
        g.setdefault((r["method"], r["sparsity"]), []).append(r)
    return g


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when there are none)."""
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd
