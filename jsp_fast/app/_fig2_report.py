"""``report.md`` of ``jsp-fast figure2``: setup and measurement, a table per cell, the paired
JSP-vs-random statistics, a verdict per claim computed from them, and the figures."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .._io import atomic_write_text
from . import _fig2_plots, _paired
from ._evaluate import MEASURE_NOTE
from ._records import mean_std

__all__ = ["by_cell", "verdicts", "write"]


def by_cell(records: list[dict]) -> tuple[dict[str, dict[str, list[dict]]], list[dict]]:
    """``{cell: {row: [records]}}`` (cells in first-seen order) and the dense records."""
    cells: dict = {}
    dense = []
    for r in records:
        if r.get("cell") == "dense" or r["method"] == "dense":
            dense.append(r)
        else:
            cells.setdefault(r.get("cell", "?"), {}).setdefault(r["method"], []).append(r)
    order = {"block-all": 0, "block-hidden": 1, "unstructured-all": 2, "unstructured-hidden": 3}
    return dict(sorted(cells.items(), key=lambda kv: order.get(kv[0], 9))), dense


def _f(vals: list, digits: int = 4) -> str:
    m, sd = mean_std([v for v in vals if v is not None])
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}g} ± {sd:.2g}" if sd else f"{m:.{digits}g}"


def _tail(vals: list, frac: float = 0.1):
    vals = [v for v in vals or [] if v is not None]
    if not vals:
        return None
    k = max(1, int(len(vals) * frac))
    return sum(vals[-k:]) / k


def _row(label: str, recs: list[dict]) -> str:
    cells = [label, str(len(recs)), _f([r.get("test_nll") for r in recs]), _f([r.get("test_bpd") for r in recs]),
             _f([r.get("test_nfe_forward") for r in recs], 3), _f([r.get("test_R") for r in recs], 3),
             _f([(r["history"].get("R") or [None])[-1] for r in recs], 3),
             _f([_tail(r["history"].get("nfe_forward")) for r in recs], 3),
             _f([r["prune"]["kept"] / max(r["prune"]["total"], 1) if r.get("prune") else None for r in recs], 3),
             _f([(r.get("prune") or {}).get("dead_inputs") for r in recs], 3),
             _f([r.get("seconds_per_step") for r in recs], 2)]
    return "| " + " | ".join(cells) + " |"


_TABLE_HEAD = [("| row | runs | test NLL (nats) | test bits/dim | test NFE | test R | R end of training (val batch) "
               "| train NFE-F (last 10%) | kept fraction | inputs cut | s/step |"), "|" + "---|" * 11]


def _setup(records: list[dict], command: str) -> list[str]:
    r0 = records[0]
    cfg, st = r0["config"], r0["settings"]
    pr = next((r["prune"] for r in records if r.get("prune")), {})
    meas = next((r["measure"] for r in records if r.get("measure")), {})
    seeds = sorted({r["seed"] for r in records})
    lines = ["Command:", "", "```", command or "(unknown)", "```", "",
             (f"Setup: {cfg['dim']}-d data, field {cfg['dim']}→{'→'.join(map(str, cfg['hidden']))}→{cfg['dim']} tanh "
             f"concatsquash, {cfg['trace']} trace, {cfg['solver']} at rtol = atol = {cfg['tol']:g} while training, "
             f"T = {cfg['T']:g} (fixed). {cfg['steps']} Adam steps, batch {cfg['batch_size']}, lr {cfg['lr']:g}, "
             f"seeds {', '.join(map(str, seeds))}, device {cfg.get('device', 'cpu')}."),
             "",
             (f"Pruning: every row of a seed prunes the same initialization at sparsity {st.get('sparsity', '–')} with "
             f"global scope, scored on {st.get('prune_batch', '–')} training points; block cells use "
             f"{'×'.join(map(str, pr.get('block', [])))} blocks. `jsp` is the poster's score, signed `dR ⊙ dL` with "
             f"the largest kept; `jsp-abs` ranks by `|dR ⊙ dL|`; `jsp-rounds<k>` is progressive JSP (k rescored "
             f"rounds). Cells: `<granularity>-<layers>`, with `all` every field layer prunable and `hidden` all but "
             f"the first (dim→hidden) and last (hidden→dim). *Kept fraction* is of the prunable weights; *inputs cut* "
             f"counts data coordinates left with no kept weight in the first layer."),
             ""]
    if meas:
        lines += [(f"Measured: {MEASURE_NOTE} (rtol = atol = {meas['tol']:g}, {st.get('n_test')} test points); "
                  f"R on {meas['R_points']} test points: {meas['R']}. R during training: the same estimator "
                  f"on a fixed batch of {st.get('R_batch')} validation points every {st.get('R_every')} steps, at "
                  f"the training tolerance. NLL in nats per data point; bits/dim of the dequantized pixels."), ""]
    sps = [r["seconds_per_step"] for r in records if r.get("seconds_per_step")]
    walls = [r["wall_seconds"] for r in records if r.get("wall_seconds")]
    if sps:
        lines += [(f"Time: median {statistics.median(sps):.2f} s per training step, {sum(walls) / 60:.1f} min "
                  f"over {len(walls)} runs (training, R curve, evaluation, sampling), on this machine."), ""]
    return lines


def _claim(p, what: str, unit: str = "") -> str:
    if p.n == 0:
        return "no pairs"
    lo, hi = p.ci
    ci = f"{p.mean:+.3g}{unit} [{lo:+.3g}, {hi:+.3g}], sign p = {p.sign_p:.2g}, n = {p.n}"
    if p.significant:
        return f"**{'yes' if p.mean < 0 else 'no, ' + what + ' is higher'}** ({ci})"
    if not (math.isfinite(lo) and math.isfinite(hi)):  # one pair, or no spread: no interval to decide with
        return f"not shown (no interval from {p.n} pair{'s' if p.n != 1 else ''}: {ci})"
    return f"not shown (interval contains 0: {ci})"


def verdicts(cells: dict, row: str = "jsp") -> list[str]:
    """Per cell: R lower? NFE lower? NLL cost? for ``row`` against random, from the t-intervals."""
    lines = []
    for cell, rows in cells.items():
        if row not in rows or "random" not in rows:
            continue
        res = _paired.compare_pair(rows[row], rows["random"])
        nll = res["test_nll"]
        decided = all(math.isfinite(c) for c in nll.ci)
        cost = ("no pairs" if nll.n == 0 else
                f"{nll.mean:+.3g} nats [{nll.ci[0]:+.3g}, {nll.ci[1]:+.3g}]"
                + (" (significant)" if nll.significant else " (interval contains 0)" if decided else " (no interval)"))
        lines += [(f"- **{cell}**: R lower than random? {_claim(res['test_R'], 'R')}. "
                  f"NFE lower? {_claim(res['test_nfe_forward'], 'NFE')}. NLL cost: {cost}.")]
    return lines


def write(out: Path, records: list[dict], command: str = "") -> Path:
    """``report.md`` and the figures in ``out`` from the records found so far."""
    out = Path(out)
    cells, dense = by_cell(records)
    title = records[0]["dataset"] if records else "(no runs)"
    lines = [f"# Figure 2: JSP against random pruning, {title}", ""]
    if not records:
        lines += ["No runs yet."]
        path = out / "report.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path
    lines += _setup(records, command)
    lines += ["## Verdict per claim (signed JSP against random, paired by seed)", "",
              ("Computed from the 95% t-intervals of the paired differences below: *yes* when the interval lies "
              "below 0, *not shown* when it contains 0."), "", *verdicts(cells), ""]
    lines += ["## Results per cell (mean ± std over seeds)", ""]
    if dense:
        lines += ["Dense reference:", "", *_TABLE_HEAD, _row("dense", dense), ""]
    for cell, rows in cells.items():
        lines += [f"### {cell}", "", *_TABLE_HEAD]
        lines += [_row(m, rows[m]) for m in sorted(rows, key=lambda m: (m != "random", m != "jsp", m))]
        lines.append("")
    pairs = [((cell, m), _paired.compare_pair(rows[m], rows["random"]))
             for cell, rows in cells.items() if "random" in rows
             for m in sorted(rows, key=lambda m: (m != "jsp", m)) if m != "random"]
    if pairs:
        lines += ["## JSP vs random, paired", "", _paired.EXPLAIN, "", *_paired.table(pairs, ("cell", "row")), "",
                  "Significant at 0.05 (t-interval excludes 0):", "", *_paired.significant_list(pairs), ""]
    fails = [f"{r.get('cell')}/{r['method']} seed {r['seed']}" for r in records if r.get("samples_error")]
    if fails:
        lines += ["Sampling failed for: " + ", ".join(fails), ""]
    val_path = out / "val_images.json"
    val = json.loads(val_path.read_text()) if val_path.exists() else None
    bpd = any("test_bpd" in r for r in records)
    files = _fig2_plots.write_pngs(out, cells, dense, next(iter(cells), ""), val, bpd)
    lines += ["## Figures", "", *[f"![{f}]({f})" for f in files]]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
