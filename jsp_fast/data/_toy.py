"""FFJORD's ten 2-D toy distributions, sampled from a local ``numpy.random.Generator``.

The distributions and scales follow FFJORD's ``toy_data.py`` (Grathwohl et al. 2019). Where FFJORD
lays points on evenly spaced angles (circles, rings, moons) we draw the angle uniformly instead, which
is the same distribution in the limit and makes every sample an exact draw; component counts that
FFJORD fixes (n//2 per moon, n//4 per ring, ...) are kept and the result is shuffled, so any prefix
is a representative sample. Nothing touches numpy's or torch's global random state.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

TOY_NAMES = ("swissroll", "circles", "rings", "moons", "8gaussians", "pinwheel", "2spirals",
             "checkerboard", "line", "cos")

# 8gaussians: unit directions at multiples of 45 degrees, scaled by 4, unit-variance noise * 0.5,
# then everything divided by 1.414 (FFJORD's literal constant, not sqrt(2)).
_G8_SCALE = 4.0
_G8_NOISE = 0.5
_G8_DIVISOR = 1.414
_G8_DIRECTIONS = np.array([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0),
                           (1 / math.sqrt(2), 1 / math.sqrt(2)), (1 / math.sqrt(2), -1 / math.sqrt(2)),
                           (-1 / math.sqrt(2), 1 / math.sqrt(2)), (-1 / math.sqrt(2), -1 / math.sqrt(2))])

# Ring mixtures (radius, weight) and the isotropic noise std, in the final (returned) coordinates.
_CIRCLES = ((3.0, 0.5), (1.5, 0.5))  # sklearn make_circles(factor=.5, noise=.08) * 3
_CIRCLES_STD = 0.08 * 3.0
_RINGS = ((3.0, 0.25), (2.25, 0.25), (1.5, 0.25), (0.75, 0.25))  # radii (1, .75, .5, .25) * 3
_RINGS_STD = 0.08  # noise added after the * 3

_NO_CLOSED_FORM = {
    "swissroll": "its density is an integral over the roll parameter with no closed form",
    "moons": "its density is a Gaussian blurred half-circle arc with no closed form",
    "pinwheel": "its density needs the inverse of an angle-dependent rotation with no closed form",
    "2spirals": "its density mixes uniform and Gaussian noise along a spiral with no closed form",
    "line": "it lies on the line y = x, so it has no density in 2-D",
    "cos": "it lies on the curve y = 2.5 sin(x), so it has no density in 2-D",
}


def _check_name(name) -> str:
    if not isinstance(name, str) or name.lower() not in TOY_NAMES:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {', '.join(TOY_NAMES)}")
    return name.lower()


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(n)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _stratified(rng: np.random.Generator, counts) -> np.ndarray:
    """Component labels with the given counts, in random order."""
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def _sample(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples [n, 2] float64 of toy set ``name`` (already validated)."""
    if name == "swissroll":  # sklearn make_swiss_roll(noise=1)[:, [0, 2]] / 5
        t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
        return x / 5.0
    if name in ("circles", "rings"):
        comps, std = (_CIRCLES, _CIRCLES_STD) if name == "circles" else (_RINGS, _RINGS_STD)
        if name == "circles":  # make_circles: n//2 outer, the rest inner
            counts = [n // 2, n - n // 2]
        else:  # FFJORD: n//4 on each of the three outer rings, the rest on the inner one
            counts = [n // 4, n // 4, n // 4, n - 3 * (n // 4)]
        radius = np.array([r for r, _ in comps])[_stratified(rng, counts)]
        theta = 2.0 * np.pi * rng.random(n)
        x = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
        return x + std * rng.standard_normal((n, 2))
    if name == "moons":  # make_moons(noise=.1) * 2 + (-1, -0.2)
        inner = _stratified(rng, [n // 2, n - n // 2]) == 1
        theta = np.pi * rng.random(n)
        c, s = np.cos(theta), np.sin(theta)
        x = np.where(inner[:, None], np.stack([1.0 - c, 0.5 - s], 1), np.stack([c, s], 1))
        x = x + 0.1 * rng.standard_normal((n, 2))
        return 2.0 * x + np.array([-1.0, -0.2])
    if name == "8gaussians":
        idx = rng.integers(0, 8, size=n)
        x = _G8_SCALE * _G8_DIRECTIONS[idx] + _G8_NOISE * rng.standard_normal((n, 2))
        return x / _G8_DIVISOR
    if name == "pinwheel":  # 5 arms, radial std .3, tangential std .1, rate .25, * 2
        labels = _stratified(rng, [n // 5 + (1 if k < n % 5 else 0) for k in range(5)])
        f = rng.standard_normal((n, 2)) * np.array([0.3, 0.1])
        f[:, 0] += 1.0
        a = 2.0 * np.pi * labels / 5.0 + 0.25 * np.exp(f[:, 0])
        ca, sa = np.cos(a), np.sin(a)
        x = np.stack([f[:, 0] * ca + f[:, 1] * sa, -f[:, 0] * sa + f[:, 1] * ca], 1)
        return 2.0 * x
    if name == "2spirals":
        sign = np.where(_stratified(rng, [n - n // 2, n // 2]) == 0, 1.0, -1.0)
        t = np.sqrt(rng.random(n)) * 3.0 * np.pi  # 540 degrees
        d = np.stack([-np.cos(t) * t + 0.5 * rng.random(n), np.sin(t) * t + 0.5 * rng.random(n)], 1)
        return sign[:, None] * d / 3.0 + 0.1 * rng.standard_normal((n, 2))
    if name == "checkerboard":
        x1 = 4.0 * rng.random(n) - 2.0
        x2 = rng.random(n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
        return 2.0 * np.stack([x1, x2], 1)
    if name == "line":
        x = 5.0 * rng.random(n) - 2.5
        return np.stack([x, x], 1)
    if name == "cos":  # FFJORD's "cos" is y = 2.5 sin(x)
        x = 5.0 * rng.random(n) - 2.5
        return np.stack([x, 2.5 * np.sin(x)], 1)
    raise AssertionError(name)  # pragma: no cover (names are validated first)


def toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """Draw ``n`` points from FFJORD's 2-D toy distribution ``name``.

    Args:
        name: one of :data:`TOY_NAMES` (case-insensitive).
        n: number of points, a positive int.
        seed: non-negative int; the same (name, n, seed) always gives the same points. Only a local
            ``numpy.random.Generator`` is used, never global random state.

    Returns:
        ``torch.float32`` tensor of shape ``[n, 2]``.
    """
    name = _check_name(name)
    n = _check_n(n)
    rng = np.random.default_rng(_check_seed(seed))
    return torch.from_numpy(_sample(name, n, rng).astype(np.float32))


def _log_ring_mixture(x: torch.Tensor, comps, std: float) -> torch.Tensor:
    """log density of sum_k w_k * (uniform-angle circle of radius R_k convolved with N(0, std^2 I))."""
    # One ring: p(x) = exp(-(r^2 + R^2) / (2 s^2)) I0(r R / s^2) / (2 pi s^2), with
    # log I0(z) = log(i0e(z)) + z for numerical stability at large z.
    r = x.norm(dim=1)
    var = std * std
    terms = []
    for radius, weight in comps:
        z = r * radius / var
        terms.append(math.log(weight) - math.log(2 * math.pi * var) - (r * r + radius * radius) / (2 * var)
                     + torch.log(torch.special.i0e(z)) + z)
    return torch.logsumexp(torch.stack(terms, 0), 0)


def _log_8gaussians(x: torch.Tensor) -> torch.Tensor:
    centers = torch.tensor(_G8_SCALE * _G8_DIRECTIONS / _G8_DIVISOR, dtype=x.dtype, device=x.device)
    std = _G8_NOISE / _G8_DIVISOR
    sq = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    return torch.logsumexp(-sq / (2 * std * std), 1) - math.log(8.0) - math.log(2 * math.pi * std * std)


def _log_checkerboard(x: torch.Tensor) -> torch.Tensor:
    # Before the final * 2: x1 ~ U[-2, 2); x2 in a unit interval whose floor has the parity of
    # floor(x1), within [-2, 2). Eight unit squares, density 1/8; after * 2, density 1/32.
    u = x / 2.0
    inside = ((u >= -2) & (u < 2)).all(1)
    fl = torch.floor(u)
    same_parity = torch.remainder(fl[:, 0] - fl[:, 1], 2) == 0
    out = torch.full_like(x[:, 0], -math.inf)
    out[inside & same_parity] = -math.log(32.0)
    return out


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of toy set ``name`` at points ``x``, where a closed form exists.

    Closed forms: ``8gaussians`` (equal-weight mixture of 8 isotropic Gaussians, centers
    ``4 * u_k / 1.414`` on the unit directions ``u_k`` at multiples of 45°, std ``0.5 / 1.414``),
    ``checkerboard`` (uniform on eight 2×2 squares, ``log(1/32)`` inside and ``-inf`` outside),
    ``circles`` and ``rings`` (equal-weight mixtures of uniform circles blurred by isotropic
    Gaussian noise, via the modified Bessel function I0). The other sets raise ``ValueError``.

    Args:
        name: a toy set name (case-insensitive).
        x: tensor ``[n, 2]``; computed in float64 internally.

    Returns:
        tensor ``[n]`` in ``x``'s floating dtype (float32 for integer input).
    """
    name = _check_name(name)
    if name in _NO_CLOSED_FORM:
        raise ValueError(f"toy set {name!r} has no closed-form log-density: {_NO_CLOSED_FORM[name]}; "
                         f"closed forms exist for 8gaussians, checkerboard, circles, rings")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape [n, 2], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape [n, 2], got {list(x.shape)}")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    xd = x.to(torch.float64)  # differentiable; stays on x's device
    if name == "8gaussians":
        lp = _log_8gaussians(xd)
    elif name == "checkerboard":
        lp = _log_checkerboard(xd)
    elif name == "circles":
        lp = _log_ring_mixture(xd, _CIRCLES, _CIRCLES_STD)
    else:
        lp = _log_ring_mixture(xd, _RINGS, _RINGS_STD)
    return lp.to(out_dtype)


def _closed_form(name: str) -> bool:
    return name not in _NO_CLOSED_FORM
