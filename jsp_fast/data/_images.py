"""The dataset container shared by every loader, and scikit-learn's 8×8 digits as an image set."""
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


def _dequantize(pixels: np.ndarray, rng: np.random.Generator, alpha: float) -> torch.Tensor:
    """Integer levels -> (x + u) / 17, u ~ U[0, 1) -> logit space, float32."""
    x01 = (pixels + rng.random(pixels.shape)) / DIGITS_LEVELS
    return torch.from_numpy(_logit_transform(x01, alpha).astype(np.float32))


def _digits_bits_per_dim(log_prob_y: torch.Tensor, y: torch.Tensor, *, alpha: float) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or not isinstance(log_prob_y, torch.Tensor):
        raise ValueError("bits_per_dim expects tensors: log_prob_y [n] and y [n, 64]")
    dim = DIGITS_SHAPE[0] * DIGITS_SHAPE[1]
    if y.dim() != 2 or y.shape[1] != dim:
        raise ValueError(f"y must have shape [n, {dim}] (logit space), got {list(y.shape)}")
    if log_prob_y.shape != (y.shape[0],):
        raise ValueError(f"log_prob_y must have shape [{y.shape[0]}] (one value per row of y), "
                         f"got {list(log_prob_y.shape)}")
    yd = y.detach().to(torch.float64)
    # v = 17 x in [0, 17) (dequantized pixels), s = alpha + (1 - 2 alpha) v / 17 = sigmoid(y):
    # log|dy/dv| = log(1 - 2 alpha) - log 17 - log s - log(1 - s), summed over the dimensions.
    log_jac = (math.log1p(-2.0 * alpha) - math.log(DIGITS_LEVELS)) * dim \
        - (torch.nn.functional.logsigmoid(yd) + torch.nn.functional.logsigmoid(-yd)).sum(1)
    log_p_pixels = log_prob_y.to(torch.float64) + log_jac.to(log_prob_y.device)
    out_dtype = log_prob_y.dtype if log_prob_y.is_floating_point() else torch.float32
    return (-log_p_pixels / (dim * math.log(2.0))).to(out_dtype)


def _digits_to_pixels(y: torch.Tensor, *, alpha: float, clamp: bool = True) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"to_pixels expects a tensor in logit space, got {type(y).__name__}")
    v = (torch.sigmoid(y.to(torch.float64)) - alpha) / (1.0 - 2.0 * alpha) * DIGITS_LEVELS
    if clamp:
        v = v.clamp(0.0, DIGITS_LEVELS - 1)
    return v.to(y.dtype if y.is_floating_point() else torch.float32)


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
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 0.5:
        raise ValueError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    alpha = float(alpha)

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
    px = {k: pixels[v] for k, v in index.items()}
    splits = {k: _dequantize(px[k], np.random.default_rng(ss), alpha)
              for k, ss in (("train", train_ss), ("val", val_ss), ("test", test_ss))}

    def fresh_train(seed: int) -> torch.Tensor:
        """The train split dequantized with new noise drawn from ``seed``."""
        s = _check_seed(seed)
        return _dequantize(px["train"], np.random.default_rng(np.random.SeedSequence([s, 0xF5E5])), alpha)

    def bits_per_dim(log_prob_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bits/dim (per row, ``[n]``) of the dequantized pixels in [0, 17)^64, from the model's
        log-density ``log_prob_y`` ``[n]`` at logit-space points ``y`` ``[n, 64]``."""
        return _digits_bits_per_dim(log_prob_y, y, alpha=alpha)

    def to_pixels(y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Logit space -> pixel values (same shape as ``y``), clamped to [0, 16] unless ``clamp=False``."""
        return _digits_to_pixels(y, alpha=alpha, clamp=clamp)

    return Dataset(name="digits", train=splits["train"], val=splits["val"], test=splits["test"],
                   dim=64, shape=DIGITS_SHAPE, bits_per_dim=bits_per_dim, log_prob=None,
                   to_pixels=to_pixels, fresh_train=fresh_train,
                   info={"index": {k: torch.from_numpy(v) for k, v in index.items()},
                         "pixels": {k: torch.from_numpy(v.astype(np.uint8)) for k, v in px.items()},
                         "alpha": alpha, "levels": DIGITS_LEVELS})
