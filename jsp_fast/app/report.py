"""``report.md`` of ``jsp-fast compare``: tables over seeds, the paired comparison against random
pruning, and the plots, rebuilt from whatever run records exist."""
from __future__ import annotations

import math
from pathlib import Path

from .._io import atomic_write_text
from . import _paired, plots
from ._evaluate import MEASURE_NOTE
from ._records import groups, mean_std, run_name

__all__ = ["write_report"]


def _tail(vals: list, frac: float = 0.1) -> float | None:
    """Mean of the last ``frac`` of a training curve (the end of training, less noisy than one step)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    k = max(1, int(len(vals) * frac))
    return sum(vals[-k:]) / k


def _fmt(m: float, sd: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}g} ± {sd:.2g}" if sd else f"{m:.{digits}g}"


def _header(records: list[dict], command: str) -> list[str]:
    lines = [f"# compare: {records[0]['dataset'] if records else '(no runs)'}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    if records:
        cfg = records[0]["config"]
        lines += ["Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), ""]
        lines += ["Test metrics come from the test set at the evaluation tolerance "
                  f"(rtol = atol = {cfg['eval_tol']:g}). *(end)* columns are means over the last 10% of training at the "
                  f"training tolerance ({cfg['tol']:g}): NFE-F of the training solve, and R measured by `jf.train` on "
                  f"a fixed validation batch. NLL in nats; mean ± std over seeds.",
                  ""]
        lines += _measure_lines(records)
    return lines


def _measure_lines(records: list[dict]) -> list[str]:
    """Issue 16: say how test NFE and R were measured (older records: NFE of the solve with R stats)."""
    new = [r["measure"] for r in records if r.get("measure")]
    old = len(records) - len(new)
    lines = []
    if new:
        m = new[0]
        lines.append(f"Measured (runs recorded since issue 16): {MEASURE_NOTE}; R is {m['R']}, on "
                     f"{m['R_points']} test points.")
    if old:
        lines.append(f"{old} older run record(s) without `measure`: their test NFE-F counts a solve that also "
                     f"integrated R and the RNODE terms (18-62% more steps than a plain solve), and their R used "
                     f"one Hutchinson vector per point for Hutchinson traces.")
    return lines + [""] if lines else []


def _table(records: list[dict]) -> list[str]:
    g = groups(records)
    bpd = any("test_bpd" in r for r in records)
    hdr = ("| method | sparsity | runs | test NLL | test NFE-F | test R | train NFE-F (end) | R (end) "
           "| wall s |" + (" test bits/dim |" if bpd else ""))
    lines = [hdr, "|" + "---|" * (10 if bpd else 9)]
    keys = sorted(g, key=lambda k: (k[1] is not None, k[1] or 0, k[0] != "jsp", k[0] != "random", k[0]))
    for m, sp in keys:
        recs = g[(m, sp)]
        cells = [_fmt(*mean_std([r["test_nll"] for r in recs]), 4),
                 _fmt(*mean_std([r["test_nfe_forward"] for r in recs])),
                 _fmt(*mean_std([r["test_R"] for r in recs])),
                 _fmt(*mean_std([_tail(r["history"]["nfe_forward"]) for r in recs])),
                 _fmt(*mean_std([_tail(r["history"]["R"]) for r in recs])),
                 _fmt(*mean_std([r["wall_seconds"] for r in recs]))]
        if bpd:
            cells.append(_fmt(*mean_std([r.get("test_bpd", float("nan")) for r in recs]), 4))
        lines.append(f"| {m} | {'–' if sp is None else f'{sp:g}'} | {len(recs)} | " + " | ".join(cells) + " |")
    return lines


def _against_random(records: list[dict]) -> list[str]:
    """Each pruning method against random pruning at the same sparsity and seed (same init, same data)."""
    g = groups(records)
    pairs = []
    for (m, sp), recs in sorted(g.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0] != "jsp", kv[0][0])):
        if sp is None or m == "random" or ("random", sp) not in g:
            continue
        rnd = {r["seed"]: r for r in g[("random", sp)]}
        both = [(r, rnd[r["seed"]]) for r in recs if r["seed"] in rnd]
        if not both:
            continue
        dR = mean_std([100 * (a["test_R"] / b["test_R"] - 1) for a, b in both])
        dN = mean_std([100 * (a["test_nfe_forward"] / b["test_nfe_forward"] - 1) for a, b in both])
        dNt = mean_std([100 * (_tail(a["history"]["nfe_forward"]) / _tail(b["history"]["nfe_forward"]) - 1)
                        for a, b in both])
        dL = mean_std([a["test_nll"] - b["test_nll"] for a, b in both])
        wins = sum(a["test_R"] < b["test_R"] for a, b in both)
        pairs.append(f"| {m} | {sp:g} | {len(both)} | {dR[0]:+.1f} ± {dR[1]:.1f} | {wins}/{len(both)} "
                     f"| {dN[0]:+.1f} ± {dN[1]:.1f} | {dNt[0]:+.1f} ± {dNt[1]:.1f} | {dL[0]:+.4f} ± {dL[1]:.4f} |")
    if not pairs:
        return []
    return ["", "## Against random pruning (paired by seed: same init, same data)", "",
            "Relative change of the method's metric against random at the same sparsity; negative R and "
            "NFE changes mean a smoother, cheaper flow; positive ΔNLL means worse likelihood.", "",
            "| method | sparsity | pairs | ΔR test % | R lower in | ΔNFE-F test % | ΔNFE-F train (end) % "
            "| ΔNLL test (nats) |", "|" + "---|" * 8, *pairs]


def write_report(out: Path, records: list[dict], command: str = "", failed: dict[str, str] | None = None) -> Path:
    """``report.md`` (tables) and the plots, from the run records found so far; ``failed``: {run
    name: error} of runs that failed (listed after the tables, which hold every finished run)."""
    out = Path(out)
    lines = _header(records, command) + _table(records) + _against_random(records)
    lines += _paired.section(records)  # issue 16: t-intervals and sign tests
    if failed:
        lines += ["", f"## Failed runs ({len(failed)})", "", "Not in the tables above; rerun the command to retry them.",
                  ""] + [f"- `{name}`: {err}" for name, err in sorted(failed.items())]
    fails = [r for r in records if r.get("samples_error")]
    if fails:
        lines += ["", "Sampling failed for: " + ", ".join(run_name(r["method"], r["sparsity"], r["seed"]) for r in fails)]
    if records:
        files = plots.compare_pngs(out, records)
        lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
