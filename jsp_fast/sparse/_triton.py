"""The ``"triton"`` block-sparse backend: ``jsp_fast.kernels`` behind the backend registry.

Importing this module registers the backend when triton is importable:

- on CUDA tensors (priority 20, so ``"auto"`` takes it on a GPU);
- on the CPU only under ``TRITON_INTERPRET=1`` (the test suite's setting without a GPU), with priority
  -10 so ``"auto"`` never picks the ~1000x slower interpreter; ask for ``backend="triton"`` by name.

The adapter passes the plan's int64 tables straight to the launchers (Triton loads them as int64).
``field_plan(net)`` builds the one-launch fused field (``kernels.fused_field``) for an ``ODEnet`` or
``SparseODEnet`` — the GPU counterpart of the C++ fused CPU field.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ._backends import register_backend

# triton is an optional dependency ([triton] extra); it is imported on the first kernel call, so
# importing this module (and registering the backend) stays cheap.
IMPORT_ERROR: Exception | None = (None if importlib.util.find_spec("triton") is not None
                                  else ImportError("triton is not installed (pip install jsp-fast[triton])"))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def available() -> bool:
    return IMPORT_ERROR is None and (INTERPRET or torch.cuda.is_available())


def _supports(plan, dtype, device) -> bool:
    if device.type == "cpu":
        # the interpreter mishandles bfloat16 (NumPy has none)
        return INTERPRET and dtype != torch.bfloat16
    return device.type == "cuda"


class TritonBackend:
    """The four primitives on ``jsp_fast.kernels`` launchers (plain tensors in, new tensors out)."""

    @staticmethod
    def _k():
        from .. import kernels  # noqa: PLC0415  (jsp_fast.kernels; imports triton)

        return kernels

    def fwd(self, x, values, plan, scale, bias, act):
        k = self._k()
        return k.bsr_linear.bsr_linear_fwd(x, values, plan.row_ptr, plan.col_idx, (plan.n, plan.k), scale, bias, act)

    def jvp(self, x, x_dot, values, plan, scale, bias, act):
        k = self._k()
        return k.bsr_linear.bsr_linear_jvp(x, x_dot, values, plan.row_ptr, plan.col_idx, (plan.n, plan.k),
                                           scale, bias, act)

    def t_matmul(self, g, values, plan):
        k = self._k()
        return k.bsr_grad.bsr_t_matmul(g, values, plan.col_ptr, plan.row_idx, plan.perm, (plan.n, plan.k))

    def weight_grad(self, g, x, plan):
        k = self._k()
        return k.bsr_grad.bsr_weight_grad(g, x, plan.block_row, plan.col_idx, (plan.bm, plan.bk))


if IMPORT_ERROR is None:
    register_backend("triton", TritonBackend(), devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                     priority=-10 if INTERPRET else 20, dtypes=_DTYPES, available=available,
                     supports=_supports, replace=True)


# ---- the fused field ------------------------------------------------------------------------------
def _specs(net):
    """``(weight, mask, gate_w, gate_b, shift_w, bias)`` per layer of an ODEnet or SparseODEnet."""
    out = []
    for layer in net.layers:
        if hasattr(layer, "fused_spec"):
            out.append(layer.fused_spec())
        else:  # jsp_fast.cnf.ConcatSquashLinear
            out.append((layer.effective_weight().detach(), layer.mask, layer.hyper_gate.weight,
                        layer.hyper_gate.bias, layer.hyper_bias.weight, layer.linear.bias))
    return out


def field_plan(net, block=None, **kw):
    """A ``kernels.fused_field.FusedFieldPlan`` for ``net`` (weights packed once; rebuild after they
    change). Call it as ``plan(z, eps, t=t_tensor)`` -> ``(f, J eps)``: one launch per evaluation.

    ``block`` defaults to the largest sparse layer block of a ``SparseODEnet`` (its masks are constant
    on it), else 32 (16 when every width is below 32)."""
    from ..kernels.fused_field import FusedFieldPlan  # noqa: PLC0415

    if block is None:
        blocks = [tuple(l.block) for l in net.layers if hasattr(l, "block")]
        block = max(blocks, key=lambda b: b[0] * b[1]) if blocks else 32
        if isinstance(block, tuple):
            block = block if min(block) >= 16 else 16
        if not blocks and max(l.out_features for l in net.layers) < 32:
            block = 16
    return FusedFieldPlan.from_specs(_specs(net), net.activation, block=block, **kw)
