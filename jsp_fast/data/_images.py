"""The dataset container shared by every loader, the image-set machinery (dequantization, logit
transform, bits/dim) and scikit-learn's 8×8 digits."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ._toy import _check_seed

DIGITS_LEVELS = 17  # pixel values 0..16
DIGITS_SHAPE = (8, 8)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/validation/test splits of one dataset, as float32 tensors ``[n, dim]``.

    Attributes:
        name: dataset name (lower case, as in :data:`jsp_fast.data.NAMES`).
        train, val, test: float32 tensors ``[n, dim]``; for images, in logit space.
        dim: number of features.
        shape: image shape (e.g. ``(8, 8)``) for image sets, else ``None``.
        bits_per_dim: image sets only, ``bits_per_dim(log_prob_y, y) -> Tensor [n]``; else ``None``.
        log_prob: the exact log-density ``log_prob(x) -> Tensor [n]`` when a closed form is known,
            else ``None``.
        to_pixels: image sets only, ``to_pixels(y) -> Tensor`` (inverse transform, clamped); else ``None``.
        fresh_train: image sets only, ``fresh_train(seed) -> Tensor`` — the train split dequantized
            with new noise (for per-epoch dequantization); else ``None``.
        info: extra details (split indices, preprocessing constants, ...).
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    dim: int
    shape: Optional[tuple] = None
    bits_per_dim: Optional[Callable[..., torch.Tensor]] = None
    log_prob: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    to_pixels: Optional[Callable[..., torch.Tensor]] = None
    fresh_train: Optional[Callable[..., torch.Tensor]] = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={tuple(getattr(self, k).shape)}" for k in ("train", "val", "test"))
        extra = f", shape={self.shape}" if self.shape is not None else ""
        return f"Dataset(name={self.name!r}, dim={self.dim}{extra}, {sizes})"


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{what} must be a number in (0, 1), got {value!r}")
    return float(value)


def _logit_transform(x01: np.ndarray, alpha: float) -> np.ndarray:
    """y = logit(alpha + (1 - 2 alpha) x) for x in [0, 1], float64."""
    s = alpha + (1.0 - 2.0 * alpha) * x01
    return np.log(s) - np.log1p(-s)


def _dequantize(pixels: np.ndarray, rng: np.random.Generator, alpha: float,
                levels: int = DIGITS_LEVELS) -> torch.Tensor:
    """Integer levels -> (x + u) / levels, u ~ U[0, 1) -> logit space, float32."""
    x01 = (pixels + rng.random(pixels.shape)) / levels
    return torch.from_numpy(_logit_transform(x01, alpha).astype(np.float32))


def _image_bits_per_dim(log_prob_y: torch.Tensor, y: torch.Tensor, *, alpha: float, levels: int,
                        dim: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or not isinstance(log_prob_y, torch.Tensor):
        raise ValueError(f"bits_per_dim expects tensors: log_prob_y [n] and y [n, {dim}]")
    if y.dim() != 2 or y.shape[1] != dim:
        raise ValueError(f"y must have shape [n, {dim}] (logit space), got {list(y.shape)}")
    if log_prob_y.shape != (y.shape[0],):
        raise ValueError(f"log_prob_y must have shape [{y.shape[0]}] (one value per row of y), "
                         f"got {list(log_prob_y.shape)}")
    yd = y.detach().to(torch.float64)
    # v = levels·x in [0, levels) (dequantized pixels), s = alpha + (1 - 2 alpha) v / levels = sigmoid(y):
    # log|dy/dv| = log(1 - 2 alpha) - log levels - log s - log(1 - s), summed over the dimensions.
    log_jac = (math.log1p(-2.0 * alpha) - math.log(levels)) * dim \
        - (torch.nn.functional.logsigmoid(yd) + torch.nn.functional.logsigmoid(-yd)).sum(1)
    log_p_pixels = log_prob_y.to(torch.float64) + log_jac.to(log_prob_y.device)
    out_dtype = log_prob_y.dtype if log_prob_y.is_floating_point() else torch.float32
    return (-log_p_pixels / (dim * math.log(2.0))).to(out_dtype)


def _image_to_pixels(y: torch.Tensor, *, alpha: float, levels: int, clamp: bool = True) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"to_pixels expects a tensor in logit space, got {type(y).__name__}")
    v = (torch.sigmoid(y.to(torch.float64)) - alpha) / (1.0 - 2.0 * alpha) * levels
    if clamp:
        v = v.clamp(0.0, levels - 1)
    return v.to(y.dtype if y.is_floating_point() else torch.float32)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 0.5:
        raise ValueError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    return float(alpha)


def _image_dataset(name: str, pixels: np.ndarray, index: dict, seeds: dict, alpha: float, levels: int,
                   shape: tuple, info: dict | None = None) -> Dataset:
    """The :class:`Dataset` of integer pixels ``[n, dim]`` (levels ``0..levels-1``) cut by ``index``.

    ``index`` and ``seeds`` map "train"/"val"/"test" to row indices and to the ``SeedSequence`` of that
    split's dequantization noise; ``info`` is merged into the dataset's ``info``.
    """
    dim = int(np.prod(shape))
    px = {k: pixels[v] for k, v in index.items()}
    splits = {k: _dequantize(px[k], np.random.default_rng(seeds[k]), alpha, levels)
              for k in ("train", "val", "test")}

    def fresh_train(seed: int) -> torch.Tensor:
        """The train split dequantized with new noise drawn from ``seed``."""
        s = _check_seed(seed)
        rng = np.random.default_rng(np.random.SeedSequence([s, 0xF5E5]))
        return _dequantize(px["train"], rng, alpha, levels)

    def bits_per_dim(log_prob_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bits/dim (per row, ``[n]``) of the dequantized pixels in ``[0, levels)^dim``, from the model's
        log-density ``log_prob_y`` ``[n]`` at logit-space points ``y`` ``[n, dim]``."""
        return _image_bits_per_dim(log_prob_y, y, alpha=alpha, levels=levels, dim=dim)

    def to_pixels(y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Logit space -> pixel values (same shape as ``y``), clamped to ``[0, levels - 1]`` unless
        ``clamp=False``."""
        return _image_to_pixels(y, alpha=alpha, levels=levels, clamp=clamp)

    return Dataset(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                   dim=dim, shape=tuple(shape), bits_per_dim=bits_per_dim, log_prob=None,
                   to_pixels=to_pixels, fresh_train=fresh_train,
                   info={"index": {k: torch.from_numpy(v) for k, v in index.items()},
                         "pixels": {k: torch.from_numpy(v.astype(np.uint8)) for k, v in px.items()},
                         "alpha": alpha, "levels": levels, **(info or {})})


def digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
           alpha: float = 1e-6) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1797 images), dequantized and logit-transformed.

    Pixels take the 17 levels 0..16. Each split is dequantized as ``x = (pixel + u) / 17`` with
    ``u ~ U[0, 1)`` and mapped to ``y = logit(alpha + (1 - 2 alpha) x)`` (MAF's transform, alpha = 1e-6).
    The split is a shuffle by ``seed``; the noise of each split comes from its own stream derived
    from ``seed``, so everything is deterministic by seed. ``fresh_train(seed)`` re-dequantizes the
    train split with new noise (use a new seed per epoch).

    Args:
        seed: non-negative int.
        val_fraction, test_fraction: fractions of the 1797 images in (0, 1), summing to < 1.
        alpha: the logit transform's boundary margin, in (0, 0.5).

    Returns:
        :class:`Dataset` with ``dim=64``, ``shape=(8, 8)``, ``bits_per_dim(log_prob_y, y)`` (bits/dim of
        the dequantized pixels in [0, 17)^64 from the model's log-density in logit space, per row:
        ``-(log p_y(y) + log|det dy/dv|) / (64 ln 2)``), and ``to_pixels(y, clamp=True)`` (inverse
        transform to pixel values, clamped to [0, 16]). ``info`` holds the split indices into
        ``load_digits().data``, the integer pixels of each split, ``alpha`` and ``levels``.
    """
    seed = _check_seed(seed)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    alpha = _check_alpha(alpha)

    from sklearn.datasets import load_digits

    pixels = np.rint(load_digits().data).astype(np.int64)  # [1797, 64], values 0..16
    n = pixels.shape[0]
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave an empty split "
                         f"of the {n} digits")
    split_ss, train_ss, val_ss, test_ss = np.random.SeedSequence([seed, 0x5D161]).spawn(4)
    perm = np.random.default_rng(split_ss).permutation(n)
    index = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    seeds = {"train": train_ss, "val": val_ss, "test": test_ss}
    return _image_dataset("digits", pixels, index, seeds, alpha, DIGITS_LEVELS, DIGITS_SHAPE)
