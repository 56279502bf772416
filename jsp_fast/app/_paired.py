"""Paired JSP-vs-random statistics over run records (``compare``'s and ``figure2``'s): one table.

For a method ``a`` against ``b`` (random pruning) at the same sparsity, the records are paired by
seed (same initialization, same data). Per pair: the difference ``a - b`` in the final test ``R``,
the test NFE and the test NLL, and the area between the two runs' R curves over training
(``∫ (R_a - R_b) d step``, trapezoid rule over the steps both logged; divided by the steps covered it
is the mean gap). Each column gets the mean difference, its 95% Student-t interval (t on the paired
differences) and the exact two-sided sign-test p-value (``_stats``). A cell is *significant* at 0.05
when the t-interval excludes 0; the sign test is printed next to it, and it needs 6+ pairs to reach 0.05.
"""
from __future__ import annotations

import math

from . import _stats

__all__ = ["LEVEL", "METRICS", "compare_pair", "section", "significant_list", "table"]

LEVEL = 0.95
# (record key, column title, format digits)
METRICS = (("test_R", "ΔR test", 3), ("test_nfe_forward", "ΔNFE test", 3), ("test_nll", "ΔNLL test (nats)", 3))


def _pairs(a_recs: list[dict], b_recs: list[dict]) -> list[tuple[dict, dict]]:
    b = {r["seed"]: r for r in b_recs}
    return [(r, b[r["seed"]]) for r in sorted(a_recs, key=lambda r: r["seed"]) if r["seed"] in b]


def _area(a: dict, b: dict) -> tuple[float, float]:
    ha, hb = a.get("history", {}), b.get("history", {})
    return _stats.curve_gap_area(ha.get("R_step", []), ha.get("R", []), hb.get("R_step", []), hb.get("R", []))


def compare_pair(a_recs: list[dict], b_recs: list[dict], level: float = LEVEL) -> dict:
    """``{key: Paired}`` for the METRICS, ``"R_area"`` (per-seed areas against 0) and ``"R_gap"``
    (area / steps covered), plus ``"n"`` pairs."""
    pairs = _pairs(a_recs, b_recs)
    out: dict = {"n": len(pairs)}
    for key, _, _ in METRICS:
        out[key] = _stats.paired([a.get(key, math.nan) for a, _ in pairs], [b.get(key, math.nan) for _, b in pairs],
                                 level)
    areas = [_area(a, b) for a, b in pairs]
    out["R_area"] = _stats.paired([ar for ar, _ in areas], [0.0] * len(areas), level)
    out["R_gap"] = _stats.paired([ar / sp if sp > 0 else math.nan for ar, sp in areas], [0.0] * len(areas), level)
    return out


def _g(v: float, digits: int) -> str:
    return "–" if not math.isfinite(v) else f"{v:+.{digits}g}"


def _cell(p: _stats.Paired, digits: int = 3) -> str:
    """``mean [lo, hi] p_sign`` with a star when the t-interval excludes 0."""
    if p.n == 0:
        return "–"
    star = " **\\***" if p.significant else ""
    return f"{_g(p.mean, digits)} [{_g(p.ci[0], digits)}, {_g(p.ci[1], digits)}] s={p.sign_p:.2g}{star}"


def table(rows: list[tuple[tuple[str, ...], dict]], label_cols: tuple[str, ...]) -> list[str]:
    """Markdown rows: the label columns, pairs, then one column per metric and the R-curve gap."""
    hdr = list(label_cols) + ["pairs"] + [t for _, t, _ in METRICS] + ["mean R gap over training"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for labels, res in rows:
        cells = [_cell(res[k], d) for k, _, d in METRICS] + [_cell(res["R_gap"])]
        lines.append("| " + " | ".join([*labels, str(res["n"]), *cells]) + " |")
    return lines


EXPLAIN = ("Each entry: mean paired difference (method − random, same seed: same initialization and data) "
           "[95% Student-t interval of the mean difference] s = exact two-sided sign-test p-value (ties "
           "dropped); **\\*** marks a t-interval that excludes 0 (significant at 0.05). Negative ΔR / ΔNFE: "
           "the method's flow is smoother / cheaper; positive ΔNLL: worse likelihood. *Mean R gap*: the area "
           "between the two R curves over training (trapezoid over the logged steps, per seed) divided by "
           "the steps covered. The sign test cannot reach 0.05 with fewer than 6 pairs (its smallest p is "
           "2^(1−pairs): 0.25 for 3, 0.0625 for 5). No correction for multiple comparisons: with m entries, "
           "about 0.05·m stars are expected by chance.")


def significant_list(rows: list[tuple[tuple[str, ...], dict]]) -> list[str]:
    """One line per metric naming the rows whose t-interval excludes 0, and in which direction."""
    out = []
    for key, title, _ in (*METRICS, ("R_gap", "mean R gap", 3)):
        hits = [f"{' '.join(lab)} ({'lower' if res[key].mean < 0 else 'higher'})"
                for lab, res in rows if res[key].significant]
        out.append(f"- {title}: " + (", ".join(hits) if hits else "none significant at 0.05"))
    return out


def section(records: list[dict], against: str = "random") -> list[str]:
    """``compare``'s report section "JSP vs random, paired": every pruning method against ``against``
    at the same sparsity (empty when no pairs exist)."""
    g: dict = {}
    for r in records:
        g.setdefault((r["method"], r["sparsity"]), []).append(r)
    rows = []
    for (m, sp), recs in sorted(g.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0] != "jsp", kv[0][0])):
        if sp is None or m == against or (against, sp) not in g:
            continue
        res = compare_pair(recs, g[(against, sp)])
        if res["n"]:
            rows.append(((m, f"{sp:g}"), res))
    if not rows:
        return []
    return ["", f"## JSP vs {against}, paired", "", EXPLAIN, "",
            *table(rows, ("method", "sparsity")), "", "Significant at 0.05 (t-interval excludes 0):", "",
            *significant_list(rows)]
