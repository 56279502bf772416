"""Shared by the Triton tests: the interpreter switch, the per-device skip and torch activations."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ACTS = ("none", "tanh", "softplus", "elu", "relu", "sigmoid")


def skip_unless_triton_runs(device: str) -> None:
    """Skip on a device where the Triton kernels cannot run: CUDA without a GPU, or the CPU without
    TRITON_INTERPRET=1 (conftest sets it when there is no GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1 (set by conftest without a GPU)")


def act_ref(name, pre):
    return {"none": lambda p: p, "tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu, "relu": F.relu,
            "sigmoid": torch.sigmoid}[name](pre)


def act_grad_ref(name, pre):
    pre = pre.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(act_ref(name, pre).sum(), pre)
    return g
