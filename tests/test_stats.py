"""jsp_fast.app._stats on hand-computed cases: t quantiles (closed forms for 1 and 2 degrees of
freedom, tabled values otherwise), paired t-intervals, the exact sign test, curve areas."""
import math

import numpy as np
import pytest

from jsp_fast.app import _stats as st


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    # df = 1 is Cauchy: tan(π (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p)).
    assert st.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert st.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert st.t_quantile(1 - p, 2) == pytest.approx(-st.t_quantile(p, 2), rel=1e-12)


@pytest.mark.parametrize("df, q", [(3, 3.1824463052837078), (4, 2.7764451051977934), (5, 2.5705818356363146),
                                   (9, 2.262157162798205), (30, 2.0422724563012378)])
def test_t_quantile_table(df, q):
    """Tabled 97.5% points of Student's t."""
    assert st.t_quantile(0.975, df) == pytest.approx(q, rel=1e-9)
    assert st.t_cdf(q, df) == pytest.approx(0.975, abs=1e-12)
    assert st.t_two_sided_p(q, df) == pytest.approx(0.05, abs=1e-12)


def test_t_agrees_with_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for df in (1, 2, 3, 7, 29, 200):
        for t in rng.normal(0, 3, 5):
            assert st.t_cdf(float(t), df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
        assert st.t_quantile(0.9, df) == pytest.approx(stats.t.ppf(0.9, df), rel=1e-9)


def test_t_rejects_bad_arguments():
    with pytest.raises(ValueError, match="degrees of freedom"):
        st.t_quantile(0.9, 0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        st.t_quantile(1.0, 3)


def test_paired_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t_{.975,2} = 4.302652729911275.
    p = st.paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert p.diffs == (1.0, 2.0, 3.0) and p.n == 3
    assert p.mean == pytest.approx(2.0) and p.sd == pytest.approx(1.0)
    assert p.ci == pytest.approx((2 - half, 2 + half), rel=1e-9)
    assert not p.significant  # the interval [-0.48, 4.48] contains 0
    # t = 2 sqrt(3) with 2 df: P(|T| > t) = 1 - t / sqrt(2 + t²) = 1 - sqrt(12/14).
    assert p.t_p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    assert (p.n_pos, p.n_neg, p.n_zero) == (3, 0, 0) and p.sign_p == pytest.approx(0.25)
    assert not p.sign_significant


def test_paired_significant_and_negative():
    # differences -1.0, -1.2, -0.8, -1.1, -0.9: mean -1, sd sqrt(0.025), t_{.975,4} = 2.7764451051977934.
    a = [0.0, 0.0, 0.0, 0.0, 0.0]
    b = [1.0, 1.2, 0.8, 1.1, 0.9]
    p = st.paired(a, b)
    half = 2.7764451051977934 * math.sqrt(0.025) / math.sqrt(5)
    assert p.ci == pytest.approx((-1 - half, -1 + half), rel=1e-9)
    assert p.significant and p.ci[1] < 0
    assert p.sign_p == pytest.approx(2 / 32)  # 0.0625: five pairs can never reach 0.05
    assert not p.sign_significant


def test_paired_drops_non_finite_pairs_and_handles_degenerate_cases():
    p = st.paired([1.0, float("nan"), 3.0], [0.0, 0.0, float("inf")])
    assert p.diffs == (1.0,) and math.isnan(p.ci[0]) and not p.significant and p.sign_p == 1.0
    same = st.paired([2.0, 3.0], [1.0, 2.0])  # both differences 1: no spread
    assert same.ci == (1.0, 1.0) and same.significant and same.t_p == 0.0
    ties = st.paired([1.0, 1.0], [1.0, 1.0])
    assert ties.n_zero == 2 and ties.sign_p == 1.0 and not ties.significant
    empty = st.paired([], [])
    assert empty.n == 0 and math.isnan(empty.mean)
    with pytest.raises(ValueError, match="equal lengths"):
        st.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        st.paired([1.0], [0.0], level=95)


@pytest.mark.parametrize("pos, neg, p", [
    (3, 0, 0.25), (0, 3, 0.25), (6, 0, 2 / 64), (5, 1, 2 * 7 / 64), (4, 4, 1.0), (0, 0, 1.0),
    (9, 1, 2 * 11 / 1024), (10, 2, 2 * (1 + 12 + 66) / 4096),
])
def test_sign_test_exact(pos, neg, p):
    assert st.sign_test(pos, neg) == pytest.approx(p, rel=1e-12)


def test_sign_test_smallest_p():
    assert [st.min_sign_p(m) for m in (3, 5, 6)] == pytest.approx([0.25, 0.0625, 0.03125])
    with pytest.raises(ValueError, match="n_pos"):
        st.sign_test(-1, 2)


def test_trapezoid_and_curve_gap():
    assert st.trapezoid([0, 1, 3], [0, 2, 2]) == pytest.approx(5.0)
    assert st.trapezoid([5], [1.0]) == 0.0
    with pytest.raises(ValueError, match="increasing"):
        st.trapezoid([0, 2, 1], [1, 1, 1])
    # a - b = 1 on [0, 10], and -1 on [10, 20] reached linearly: 10 + 0 = 10; span 20.
    area, span = st.curve_gap_area([0, 10, 20], [2.0, 3.0, 0.0], [0, 10, 20, 30], [1.0, 2.0, 1.0, 7.0])
    assert (area, span) == (pytest.approx(10.0 + 0.0), 20.0)
    # Only the steps both curves share count; a gap of 1 on steps 10..20 (step 0 missing in a).
    area, span = st.curve_gap_area([10, 20], [3.0, 3.0], [0, 10, 20], [0.0, 2.0, 2.0])
    assert (area, span) == (10.0, 10.0)
    area, span = st.curve_gap_area([0], [1.0], [0], [0.0])
    assert math.isnan(area) and span == 0.0
