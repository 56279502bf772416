"""Datasets: FFJORD's 2-D toy sets, scikit-learn's 8×8 digits, and the MAF tabular benchmarks.

``get(name, ...)`` is the one entry point used by training and the CLI; it returns a
:class:`Dataset` with ``train``/``val``/``test`` float32 tensors ``[n, dim]``.
"""
from __future__ import annotations

import functools

import numpy as np

from ._images import Dataset, digits
from ._tabular import TABULAR_NAMES, tabular
from ._toy import TOY_NAMES, _check_n, _check_seed, _closed_form, _sample, toy, toy_log_prob

NAMES = TOY_NAMES + ("digits",) + TABULAR_NAMES

__all__ = ["Dataset", "NAMES", "TABULAR_NAMES", "TOY_NAMES", "digits", "get", "tabular", "toy", "toy_log_prob"]


def _toy_split(name: str, n: int, seed: int, split: int):
    import torch

    rng = np.random.default_rng(np.random.SeedSequence([seed, split]))
    return torch.from_numpy(_sample(name, n, rng).astype(np.float32))


def get(name: str, n: int = 10_000, seed: int = 0, root=None, **kwargs) -> Dataset:
    """Load any dataset by name: a toy set, ``digits`` or a tabular benchmark.

    Args:
        name: one of :data:`NAMES` (case-insensitive).
        n: toy sets only: train size (a positive int, at least 5); val and test get ``n // 5`` points
            each. Ignored by digits and the tabular sets, whose sizes are fixed.
        seed: non-negative int. Toy sets: the three splits come from independent streams derived from
            ``seed``. Digits: the split and dequantization seed. Tabular: ignored (the published
            splits are fixed; pass ``seed=`` through :func:`tabular` for POWER's noise).
        root: tabular sets only: the directory with the MAF data files.
        **kwargs: passed to :func:`digits` (``val_fraction``, ``test_fraction``, ``alpha``) or
            :func:`tabular` (``allow_pickle`` for GAS).

    Returns:
        :class:`Dataset`. ``log_prob`` is the closed-form density for toy sets that have one
        (8gaussians, checkerboard, circles, rings), else ``None``; ``bits_per_dim`` is set for digits only.
    """
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    key = name.lower()
    seed = _check_seed(seed)
    if key in TOY_NAMES:
        if kwargs:
            raise ValueError(f"toy set {key!r} takes no extra options, got {sorted(kwargs)}")
        n = _check_n(n)
        if n < 5:
            raise ValueError(f"n must be at least 5 for a toy set (val and test get n // 5 points), got {n}")
        splits = [_toy_split(key, size, seed, i) for i, size in enumerate((n, n // 5, n // 5))]
        log_prob = functools.partial(toy_log_prob, key) if _closed_form(key) else None
        return Dataset(name=key, train=splits[0], val=splits[1], test=splits[2], dim=2, log_prob=log_prob,
                       info={"seed": seed})
    if key == "digits":
        return digits(seed=seed, **kwargs)
    return tabular(key, root, **kwargs)
