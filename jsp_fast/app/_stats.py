"""Paired statistics for method-vs-method comparisons over seeds (pure numpy and ``math``).

Two runs with the same seed share the initialization and the data, so the per-seed *difference*
``a_i - b_i`` is the unit of evidence. For ``n`` such differences this module gives

- a Student-t confidence interval for their mean (``mean ± t_{1-α/2, n-1} · sd / √n``) and the
  matching two-sided p-value. It assumes the differences are roughly normal; with 3–5 seeds that
  cannot be checked, which is why the sign test is reported next to it.
- an exact two-sided sign test: ties (zero differences) are dropped, and
  ``p = min(1, 2 · P(Binomial(m, 1/2) <= min(#pos, #neg)))`` over the ``m`` non-tied pairs. Its
  smallest attainable p-value is ``2^(1-m)``: 0.25 for 3 pairs, 0.0625 for 5. It cannot reach 0.05
  with fewer than 6 pairs, whatever the data.
- the area between two curves over training (trapezoid rule on the steps both curves share).

The Student-t distribution comes from the regularized incomplete beta function
(``P(|T| > t) = I_{ν/(ν+t²)}(ν/2, 1/2)``), evaluated by its continued fraction (Lentz's method);
quantiles by bisection on that. No scipy: the app must not need it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Paired",
    "curve_gap_area",
    "min_sign_p",
    "paired",
    "sign_test",
    "t_cdf",
    "t_quantile",
    "t_two_sided_p",
    "trapezoid",
]


# -- the Student-t distribution ----------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, as in Numerical Recipes)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``x`` in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _check_df(df) -> float:
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not (df > 0 and math.isfinite(df)):
        raise ValueError(f"degrees of freedom must be a positive finite number, got {df!r}")
    return float(df)


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    df = _check_df(df)
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``)."""
    df = _check_df(df)
    if not (0.0 < p < 1.0):
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# -- the sign test -----------------------------------------------------------------------------------
def sign_test(n_pos: int, n_neg: int) -> float:
    """Exact two-sided sign-test p-value for ``n_pos`` positive and ``n_neg`` negative differences
    (ties already dropped); 1.0 when there are none."""
    for name, v in (("n_pos", n_pos), ("n_neg", n_neg)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    m = int(n_pos) + int(n_neg)
    if m == 0:
        return 1.0
    k = min(int(n_pos), int(n_neg))
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2.0 * tail / 2.0 ** m)


def min_sign_p(m: int) -> float:
    """The smallest two-sided sign-test p-value ``m`` non-tied pairs can give: ``2^(1-m)``."""
    return sign_test(m, 0)


# -- paired differences -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Paired:
    """Paired differences ``a - b`` and their statistics (see the module docstring).

    ``ci`` is the ``level`` t-interval of the mean difference (NaN bounds with fewer than 2 pairs);
    ``t_p`` its two-sided p-value; ``sign_p`` the exact sign test over ``n_pos + n_neg`` non-tied pairs.
    """

    diffs: tuple[float, ...]
    level: float
    mean: float
    sd: float
    ci: tuple[float, float]
    t_p: float
    n_pos: int
    n_neg: int
    n_zero: int
    sign_p: float

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def significant(self) -> bool:
        """The t-interval excludes 0 (at 1 - ``level``; False with fewer than 2 pairs)."""
        lo, hi = self.ci
        return bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))

    @property
    def sign_significant(self) -> bool:
        return self.sign_p < 1.0 - self.level


def paired(a, b, level: float = 0.95) -> Paired:
    """Statistics of the paired differences ``a[i] - b[i]`` (equal-length sequences of numbers).

    Pairs where either value is not finite are dropped (a failed or collapsed run has no number).
    With zero spread (every difference equal) the interval is that one value and ``t_p`` is 0 when it
    is not zero, 1 when it is.
    """
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.shape[0]} and {b.shape[0]}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.shape[0])
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    nan = float("nan")
    if n == 0:
        return Paired((), level, nan, nan, (nan, nan), nan, 0, 0, 0, 1.0)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else nan
    if n < 2:
        ci, t_p = (nan, nan), nan
    elif sd == 0.0:
        ci, t_p = (mean, mean), (0.0 if mean != 0.0 else 1.0)
    else:
        se = sd / math.sqrt(n)
        half = t_quantile(0.5 + level / 2.0, n - 1) * se
        ci, t_p = (mean - half, mean + half), t_two_sided_p(mean / se, n - 1)
    return Paired(tuple(float(v) for v in d), level, mean, sd, ci, t_p, n_pos, n_neg, n - n_pos - n_neg,
                  sign_test(n_pos, n_neg))


# -- curves -------------------------------------------------------------------------------------------
def trapezoid(x, y) -> float:
    """∫ y dx by the trapezoid rule over increasing ``x``."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y need equal lengths, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        return 0.0
    if np.any(np.diff(x) <= 0):
        raise ValueError("x must be strictly increasing")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def curve_gap_area(steps_a, a, steps_b, b) -> tuple[float, float]:
    """Area between curve ``a`` and curve ``b`` (``∫ (a - b) d step``, trapezoid rule) over the steps
    both were measured at; returns ``(area, span)`` with ``span`` the step range covered (NaN and 0
    when they share fewer than two steps: no area to speak of, and ``paired`` drops a NaN).
    ``area / span`` is the mean gap over training."""
    va = {int(s): float(v) for s, v in zip(steps_a, a)}
    vb = {int(s): float(v) for s, v in zip(steps_b, b)}
    common = sorted(s for s in va.keys() & vb.keys() if math.isfinite(va[s]) and math.isfinite(vb[s]))
    if len(common) < 2:
        return float("nan"), 0.0
    gap = [va[s] - vb[s] for s in common]
    return trapezoid(common, gap), float(common[-1] - common[0])
