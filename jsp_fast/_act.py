"""Activations: the one home of their names, their integer codes and their torch math.

The codes are an ABI shared with the compiled core (``csrc/common/act.h``) and the Triton kernels;
``tests/test_act.py`` checks the C++ enum against ``CODES``. Every derivative is written with
differentiable torch ops, because CNF training backpropagates through the trace (double backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "CODES", "check", "code", "apply", "derivative", "dact_from_y", "ddact_dy"]

# Ordered by code: ACTIVATIONS[CODES[name]] == name.
ACTIVATIONS = ("none", "tanh", "softplus", "elu", "relu", "sigmoid")
CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
_ALIASES = {"identity": "none", "linear": "none"}


def check(name) -> str:
    """The canonical name of activation ``name`` (None and "identity" mean "none"), or a ValueError."""
    key = "none" if name is None else str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in CODES:
        raise ValueError(f"unknown activation {name!r}; expected None or one of {ACTIVATIONS}")
    return key


def code(name) -> int:
    """The integer code of ``name`` shared with the C++/CUDA/Triton kernels."""
    return CODES[check(name)]


def apply(name: str, pre: torch.Tensor) -> torch.Tensor:
    """``act(pre)`` for a canonical name (see :func:`check`)."""
    if name == "tanh":
        return torch.tanh(pre)
    if name == "softplus":
        return F.softplus(pre)
    if name == "elu":
        return F.elu(pre)
    if name == "relu":
        return F.relu(pre)
    if name == "sigmoid":
        return torch.sigmoid(pre)
    return pre


def derivative(name: str, pre: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``act'(pre)`` given both ``pre`` and ``y = act(pre)``, differentiable."""
    if name == "softplus":
        return torch.sigmoid(pre)
    if name == "elu":
        return torch.where(pre > 0, torch.ones_like(y), y + 1.0)
    if name == "relu":
        return (pre > 0).to(y.dtype)
    return dact_from_y(name, y)


def dact_from_y(name: str, y: torch.Tensor) -> torch.Tensor:
    """``act'(pre)`` written in terms of ``y = act(pre)`` only, differentiable.

    Every supported activation allows it (softplus: σ(pre) = 1 - e^{-y}), so a forward saves ``y`` and
    nothing else, and the derivative stays differentiable for double backward.
    """
    if name == "tanh":
        return 1.0 - y * y
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "softplus":
        return -torch.expm1(-y)
    if name == "elu":
        return torch.where(y > 0, torch.ones_like(y), y + 1.0)
    if name == "relu":
        return (y > 0).to(y.dtype)
    return torch.ones_like(y)


def ddact_dy(name: str, y: torch.Tensor) -> torch.Tensor | None:
    """``d act'(pre) / dy`` with ``act'`` as in :func:`dact_from_y` (None where it is zero)."""
    if name == "tanh":
        return -2.0 * y
    if name == "sigmoid":
        return 1.0 - 2.0 * y
    if name == "softplus":
        return torch.exp(-y)
    if name == "elu":
        return (y <= 0).to(y.dtype)
    return None
