"""Devices: one check, so every entry point refuses an unusable device with the same clear message
(instead of torch's AssertionError for a missing CUDA, its list of every backend for a typo, or a crash
deep inside on the data-less ``meta`` device)."""
from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["check_device"]


def check_device(device, what: str = "device") -> torch.device:
    """``torch.device(device)`` when jsp_fast can compute there, else a ``ConfigError`` saying why.

    ``what`` names the argument or tensor in the message (e.g. "data", "x", "device").
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what}: unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "meta":
        raise ConfigError(f"{what} is on the meta device, which holds no values; jsp_fast computes on "
                          f"'cpu' or 'cuda' tensors")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}: device {str(device)!r} needs CUDA, which is not available here "
                          f"(torch {torch.__version__}, cuda build {torch.version.cuda})")
    return dev
