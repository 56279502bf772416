"""jsp_fast.app._paired on hand-made records: pairing by seed, the areas between R curves, the table."""
import math

import pytest

from jsp_fast.app import _paired


def _rec(method, seed, R, nfe, nll, curve, sparsity=0.9):
    steps = list(range(0, 10 * len(curve), 10))
    return {"method": method, "sparsity": sparsity, "seed": seed, "test_R": R, "test_nfe_forward": nfe,
            "test_nll": nll, "history": {"R_step": steps, "R": curve}}


def test_compare_pair_by_hand():
    jsp = [_rec("jsp", 0, 1.0, 40, 3.0, [0.0, 1.0, 1.0]), _rec("jsp", 1, 2.0, 50, 3.5, [0.0, 2.0, 2.0]),
           _rec("jsp", 2, 3.0, 60, 4.0, [0.0, 3.0, 3.0])]
    rnd = [_rec("random", 2, 2.0, 60, 4.1, [0.0, 0.0, 0.0]), _rec("random", 0, 2.0, 50, 3.2, [0.0, 0.0, 0.0]),
           _rec("random", 1, 2.0, 45, 3.7, [0.0, 0.0, 0.0]), _rec("random", 7, 9.0, 9, 9.0, [0.0, 0.0])]
    res = _paired.compare_pair(jsp, rnd)
    assert res["n"] == 3  # seed 7 has no partner
    assert res["test_R"].diffs == (-1.0, 0.0, 1.0)  # paired by seed, not by order
    assert res["test_nfe_forward"].diffs == (-10.0, 5.0, 0.0)
    assert res["test_nll"].diffs == pytest.approx((-0.2, -0.2, -0.1))
    assert res["test_nll"].significant  # -0.2, -0.2, -0.1: tight and below 0
    # Curves 0, c, c at steps 0, 10, 20 against 0: area 5c + 10c = 15c over 20 steps.
    assert res["R_area"].diffs == (15.0, 30.0, 45.0)
    assert res["R_gap"].diffs == pytest.approx((0.75, 1.5, 2.25))


def test_section_table_and_significance_lines():
    recs = [_rec("jsp", s, 1.0 - 0.1 * s, 40, 3.0 + 0.01 * s, [0.0, 1.0]) for s in range(3)]
    recs += [_rec("random", s, 2.0, 40, 3.0, [0.0, 2.0 + s]) for s in range(3)]
    recs += [_rec("dense", 0, 3.0, 70, 2.5, [0.0, 3.0], sparsity=None)]
    lines = _paired.section(recs)
    text = "\n".join(lines)
    assert "## JSP vs random, paired" in text and "| jsp | 0.9 | 3 |" in text
    assert "ΔR test: jsp 0.9 (lower)" in text  # R differences -1.0, -1.1, -1.2
    assert "ΔNFE test: none significant" in text  # all ties
    assert "s=0.25" in text
    assert _paired.section([r for r in recs if r["method"] != "random"]) == []


def test_missing_metrics_are_dropped_not_zero():
    a = [_rec("jsp", 0, 1.0, 40, 3.0, [0.0]), _rec("jsp", 1, float("nan"), 40, 3.0, [0.0])]
    b = [_rec("random", 0, 2.0, 40, 3.0, [0.0]), _rec("random", 1, 2.0, 40, 3.0, [0.0])]
    res = _paired.compare_pair(a, b)
    assert res["test_R"].n == 1 and math.isnan(res["R_gap"].mean)  # one-step curves: no area
