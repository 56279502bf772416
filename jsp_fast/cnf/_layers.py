"""FFJORD's concatsquash vector field, with forward-mode tangents.

Every layer computes ``y = (W x + b) * sigmoid(W_g t + b_g) + W_b t``; the network applies an
activation after every layer but the last. Besides ``forward`` the field has ``jvp``, which carries
T tangents through the layers alongside the value (``J v = act'(pre) * gate * (W v)`` per layer), so
the exact trace, Hutchinson's estimator and the Jacobian Frobenius norm are all built on one pass.
A block-sparse field (jsp_fast.sparse.SparseODEnet) only has to provide the same two methods.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _act

# The activations live in jsp_fast._act; these names stay for code that imports them from here.
ACTIVATIONS = _act.ACTIVATIONS
check_activation = _act.check
activate = _act.apply
activation_derivative = _act.derivative


class ConcatSquashLinear(nn.Module):
    """``(W x + b) * sigmoid(W_g t + b_g) + W_b t``; only ``linear.weight`` is prunable.

    A pruned layer holds a bool buffer ``weight_mask`` (absent on dense layers, so dense checkpoints
    carry no extra keys); the forward pass multiplies by it, so pruned weights get zero gradient.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    # -- masks -----------------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Attach (or with None, drop) a bool mask over ``linear.weight`` and zero the pruned entries."""
        if mask is None:
            if "weight_mask" in self._buffers:
                del self._buffers["weight_mask"]
            return
        w = self.linear.weight
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit weight shape {tuple(w.shape)}")
        self.register_buffer("weight_mask", mask.to(device=w.device, dtype=torch.bool).clone())
        self.apply_mask_()

    @property
    def mask(self) -> torch.Tensor | None:
        return self._buffers.get("weight_mask")

    @torch.no_grad()
    def apply_mask_(self) -> None:
        m = self.mask
        if m is not None:
            self.linear.weight.mul_(m)

    def effective_weight(self) -> torch.Tensor:
        m = self.mask
        w = self.linear.weight
        return w if m is None else w * m

    # -- evaluation ------------------------------------------------------------------------------
    def gate_and_shift(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output ``scale = sigmoid(W_g t + b_g)`` and ``shift = b * scale + W_b t``.

        With them the layer is ``scale * (W x) + shift``: one fused kernel in the sparse backends.
        """
        tt = t.reshape(1, 1).to(self.linear.weight.dtype)
        gate = torch.sigmoid(self.hyper_gate(tt)).reshape(-1)
        shift = self.hyper_bias(tt).reshape(-1)
        if self.linear.bias is not None:
            shift = shift + self.linear.bias * gate
        return gate, shift

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, shift = self.gate_and_shift(t)
        return F.linear(x, self.effective_weight()) * gate + shift

    def jvp(self, t, x, v):
        """Value and tangents (v: [T, B, in]) before the activation."""
        gate, shift = self.gate_and_shift(t)
        w = self.effective_weight()
        return F.linear(x, w) * gate + shift, F.linear(v, w) * gate


class ODEnet(nn.Module):
    """Concatsquash MLP ``dim -> hidden... -> dim`` with an activation between layers."""

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh"):
        super().__init__()
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            # a str would iterate as digits ("64" -> widths 6, 4)
            raise TypeError(f"hidden must be a sequence of widths, e.g. (64, 64, 64), got {hidden!r}")
        dims = [int(dim), *[int(h) for h in hidden], int(dim)]
        if any(d <= 0 for d in dims):
            raise ValueError(f"dim and hidden widths must be positive integers, got dim={dim}, hidden={tuple(hidden)}")
        self.activation = check_activation(activation)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @property
    def dim(self) -> int:
        return self.layers[0].in_features

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(layer.out_features for layer in self.layers[:-1])

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < last:
                h = activate(self.activation, h)
        return h

    def jvp(self, t: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(t, z), J v)`` for tangents ``v`` of shape [T, B, dim]."""
        h, hv = z, v
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            pre, pre_v = layer.jvp(t, h, hv)
            if i < last:
                h = activate(self.activation, pre)
                hv = activation_derivative(self.activation, pre, h) * pre_v
            else:
                h, hv = pre, pre_v
        return h, hv
