"""Datasets: FFJORD's 2-D toy sets, scikit-learn's 8×8 digits, a 5k MNIST subset, and the MAF tabular
benchmarks.

``get(name, ...)`` is the one entry point used by training and the CLI; it returns a
:class:`Dataset` with ``train``/``val``/``test`` float32 tensors ``[n, dim]``.
"""
from __future__ import annotations

import functools

import numpy as np

from ._images import Dataset, digits
from ._mnist import mnist
from ._tabular import TABULAR_NAMES, tabular
from ._toy import TOY_NAMES, _check_n, _check_seed, _closed_form, _sample, toy, toy_log_prob

IMAGE_NAMES = ("digits", "mnist", "mnist14")
NAMES = TOY_NAMES + IMAGE_NAMES + TABULAR_NAMES

__all__ = ["IMAGE_NAMES", "NAMES", "TABULAR_NAMES", "TOY_NAMES", "Dataset", "digits", "get", "mnist", "tabular", "toy",
           "toy_log_prob"]


def _toy_split(name: str, n: int, seed: int, split: int):
    import torch

    rng = np.random.default_rng(np.random.SeedSequence([seed, split]))
    return torch.from_numpy(_sample(name, n, rng).astype(np.float32))


def get(name: str, n: int = 10_000, seed: int = 0, root=None, **kwargs) -> Dataset:
    """Load any dataset by name: a toy set, an image set or a tabular benchmark.

    Args:
        name: one of :data:`NAMES` (case-insensitive).
        n: toy sets only: train size (a positive int, at least 5); val and test get ``n // 5`` points
            each. Ignored by the image and tabular sets, whose sizes are fixed.
        seed: non-negative int. Toy sets: the three splits come from independent streams derived from
            ``seed``. Image sets: the split and dequantization seed (MNIST's test split is fixed).
            Tabular: ignored (the published splits are fixed; pass ``seed=`` through :func:`tabular`
            for POWER's noise).
        root: tabular sets only: the directory with the MAF data files.
        **kwargs: passed to :func:`digits` (``val_fraction``, ``test_fraction``, ``alpha``),
            :func:`mnist` (``val_fraction``, ``alpha``; ``"mnist"`` is 28×28, ``"mnist14"`` the 2×2-pooled
            14×14) or :func:`tabular` (``allow_pickle`` for GAS).

    Returns:
        :class:`Dataset`. ``log_prob`` is the closed-form density for toy sets that have one
        (8gaussians, checkerboard, circles, rings), else ``None``; ``bits_per_dim`` is set for the image
        sets only.
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
    if key in ("mnist", "mnist14"):
        if "size" in kwargs:
            raise ValueError(f"get({key!r}) takes no size= (the name fixes it): use 'mnist' for 28×28 "
                             f"or 'mnist14' for 14×14")
        return mnist(size=28 if key == "mnist" else 14, seed=seed, **kwargs)
    return tabular(key, root, **kwargs)
