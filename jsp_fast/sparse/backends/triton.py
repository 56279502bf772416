"""The ``"triton"`` backend: ``jsp_fast.kernels`` behind the registry (per-layer ops and a fused field).

Registered when triton is importable:

- on CUDA tensors (priority 20, so ``"auto"`` takes it on a GPU for the per-layer ops);
- on the CPU only under ``TRITON_INTERPRET=1`` (the test suite's setting without a GPU), with priority
  -10 so ``"auto"`` never picks the ~1000x slower interpreter; ask for ``backend="triton"`` by name.

The per-layer adapter passes the plan's int64 tables straight to the launchers (Triton loads them as
int64). The fused field (``FusedFieldPlan``: the field packed by ``plan.stack_field``, launched by
``kernels.fused_field``) is the GPU counterpart of the C++ fused CPU field; ``field_plan(net)`` builds
one for an ``ODEnet`` or ``SparseODEnet``.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from ..plan import as_block, stack_field
from ..registry import FieldShape, LayerSpec, layer_specs, register_backend
from .torch_ref import bwd_epilogue_reference
from ._device_solve import DeviceSolve

__all__ = ["IMPORT_ERROR", "INTERPRET", "FUSED_MAX_WIDTH", "available", "TritonBackend", "TritonField",
           "FusedFieldPlan", "fused_field", "field_plan"]

# triton is an optional dependency ([triton] extra); it is imported on the first kernel call, so
# importing this module (and registering the backend) stays cheap.
IMPORT_ERROR: Exception | None = (None if importlib.util.find_spec("triton") is not None
                                  else ImportError("triton is not installed (pip install jsp-fast[triton])"))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The fused field keeps a batch tile's activations in a per-program scratch: the point for narrow
# fields, a waste of occupancy (and of scratch memory) for wide ones, which run the per-layer kernels.
FUSED_MAX_WIDTH = 512


def available() -> bool:
    return IMPORT_ERROR is None and (INTERPRET or torch.cuda.is_available())


def _supports(plan, dtype, device) -> bool:
    if device.type == "cpu":
        # the interpreter mishandles bfloat16 (NumPy has none)
        return INTERPRET and dtype != torch.bfloat16
    return device.type == "cuda"


def _kernels():
    from ... import kernels  # noqa: PLC0415  (jsp_fast.kernels; imports triton)

    return kernels


class TritonBackend:
    """The four primitives on ``jsp_fast.kernels`` launchers (plain tensors in, new tensors out)."""

    def fwd(self, x, values, plan, scale, bias, act):
        return _kernels().bsr_linear.bsr_linear_fwd(x, values, plan.row_ptr, plan.col_idx, (plan.n, plan.k),
                                                    scale, bias, act)

    def jvp(self, x, x_dot, values, plan, scale, bias, act):
        return _kernels().bsr_linear.bsr_linear_jvp(x, x_dot, values, plan.row_ptr, plan.col_idx,
                                                    (plan.n, plan.k), scale, bias, act)

    def t_matmul(self, g, values, plan):
        return _kernels().bsr_grad.bsr_t_matmul(g, values, plan.col_ptr, plan.row_idx, plan.perm, (plan.n, plan.k))

    def weight_grad(self, g, x, plan):
        return _kernels().bsr_grad.bsr_weight_grad(g, x, plan.block_row, plan.col_idx, (plan.bm, plan.bk))

    def bwd_epilogue(self, gy, gyd, y, ud, scale, act, need_bias):
        # The torch formulas on the device's tensors (a handful of fused-by-torch elementwise kernels on
        # the GPU); a Triton kernel for it is not written yet.
        return bwd_epilogue_reference(gy, gyd, y, ud, scale, act, need_bias)


# ---- the fused field ------------------------------------------------------------------------------
class FusedFieldPlan:
    """A whole field packed once for the fused Triton kernel (the weights are fixed for a solve).

    ``weights``: per layer a dense ``[N_l, K_l]`` tensor (zeros outside kept blocks: all-zero blocks are
    skipped), chaining ``D -> ... -> D``. ``masks`` (optional, like each weight) marks the kept entries
    explicitly. ``block``: the kernel's block (int or pair of powers of two; each side >= 16 uses
    tensor-core dots; 32 suits 32x32-pruned layers). ``hyper`` (optional): per layer
    ``(gate_weight [N], gate_bias [N], shift_weight [N], bias [N] or None)`` of the concatsquash
    hyper-layers, enabling ``plan(z, eps, t=t_tensor)`` with the time gate computed in the kernel.
    """

    def __init__(self, weights: Sequence[torch.Tensor], block=32, masks=None, hyper=None,
                 activation: str = "tanh", max_tangents: int = 4):
        from ... import _act  # noqa: PLC0415

        if not weights:
            raise ValueError("need at least one layer")
        self.block = as_block(block)
        if self.block[0] & (self.block[0] - 1) or self.block[1] & (self.block[1] - 1):
            raise ValueError(f"block sides must be powers of two, got {self.block}")
        self.activation = _act.check(activation)
        self.max_tangents = int(max_tangents)
        self.dim = int(weights[0].shape[1])
        self.widths = [int(w.shape[0]) for w in weights]
        if self.widths[-1] != self.dim:
            raise ValueError(f"the last layer must map back to dim {self.dim}, got {self.widths[-1]}")
        for i, (a, b) in enumerate(zip(weights[:-1], weights[1:])):
            if a.shape[0] != b.shape[1]:
                raise ValueError(f"layer {i} output {a.shape[0]} does not feed layer {i + 1} input {b.shape[1]}")
        self.layout = stack_field(weights, masks, self.block)
        self.device = weights[0].device
        self.values = self.layout.values
        self.num_layers = len(weights)
        self.nnzb = list(self.layout.nnzb)
        self._meta = None
        self.hyper = None
        if hyper is not None:
            gw, gb, sw, b = zip(*hyper)
            b = [bi if bi is not None else torch.zeros(n, dtype=self.values.dtype, device=self.device)
                 for bi, n in zip(b, self.widths)]
            self.hyper = tuple(self.pack(v) for v in (gw, gb, sw, b))
        self._scratch: dict = {}

    @classmethod
    def from_specs(cls, specs: Sequence[LayerSpec], activation: str = "tanh", block=32, **kw) -> "FusedFieldPlan":
        """From one :class:`~jsp_fast.sparse.registry.LayerSpec` per layer, or one
        ``(weight, mask, gate_w, gate_b, shift_w, bias)`` tuple."""
        specs = [s if isinstance(s, LayerSpec) else LayerSpec(s[0], s[1], None, *s[2:]) for s in specs]
        hyper = [tuple(None if v is None else v.detach().reshape(-1) for v in (s.gate_w, s.gate_b, s.shift_w, s.bias))
                 for s in specs]
        return cls([s.weight.detach() for s in specs], block=block, masks=[s.mask for s in specs], hyper=hyper,
                   activation=activation, **kw)

    def pack(self, vectors) -> torch.Tensor:
        """Per-layer ``[N_l]`` vectors -> the kernel's packed ``[sum_l padded N_l]`` vector."""
        if len(vectors) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} per-layer vectors, got {len(vectors)}")
        out = torch.zeros(self.layout.vector_len, dtype=self.values.dtype, device=self.device)
        for off, n, v in zip(self.layout.vector_offsets, self.widths, vectors):
            if v is not None:
                out[off: off + n] = v.reshape(-1).to(out.dtype)
        return out

    def __call__(self, z, eps=None, scales=None, biases=None, t=None, tf32: bool | None = None,
                 max_programs: int | None = None):
        """``(f, J eps)``; ``eps`` ``[B, D]`` or ``[T, B, D]`` (or None: ``(f, None)``).

        ``scales``/``biases``: per-layer lists of ``[N_l]`` (or None) or pre-packed vectors
        (``plan.pack``); or ``t`` (a tensor) with the plan's ``hyper`` to gate in the kernel."""
        K = _kernels().fused_field
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be [B, {self.dim}], got {tuple(z.shape)}")
        z = z if z.stride(-1) == 1 else z.contiguous()
        squeeze = eps is not None and eps.dim() == 2
        e = None
        if eps is not None:
            e = eps[None] if squeeze else eps
            if e.dim() != 3 or e.shape[1:] != z.shape:
                raise ValueError(f"eps must be [B, D] or [T, B, D] matching z {tuple(z.shape)}, got {tuple(eps.shape)}")
            e = e.to(z.dtype)
            e = e if e.stride(-1) == 1 else e.contiguous()
        if t is not None and self.hyper is None:
            raise ValueError("t given but the plan has no hyper-layers (build it with hyper= or from_specs)")
        if t is not None and (scales is not None or biases is not None):
            raise ValueError("give either t (in-kernel time gate) or scales/biases, not both")
        pk = lambda v: None if v is None else (v if torch.is_tensor(v) and v.dim() == 1  # noqa: E731
                                               and v.numel() == self.layout.vector_len else self.pack(v))
        if self._meta is None:
            L = self.layout
            self._meta = K.encode_meta(L.shapes, L.block_rows, L.row_ptr_offsets, L.vector_offsets, self.device)
        f, je = K.fused_field(z, e, self._meta, self.layout.row_ptr, self.layout.col_idx, self.values, self.block,
                              self.layout.max_width, self.activation, pk(scales), pk(biases),
                              self.hyper if t is not None else None, t, self._scratch, tf32, max_programs,
                              self.max_tangents)
        return f, (None if je is None else (je[0] if squeeze else je))


def fused_field(z, eps, layers, activation: str = "tanh", block=32, **kw):
    """One-shot ``(f, J eps)`` for ``layers`` = per-layer ``(weight [N, K], scale [N] | None,
    bias [N] | None)``; builds a ``FusedFieldPlan`` (reuse one across solver steps instead)."""
    plan = FusedFieldPlan([w for w, _, _ in layers], block=block, activation=activation)
    scales = [s for _, s, _ in layers]
    biases = [b for _, _, b in layers]
    return plan(z, eps, None if all(s is None for s in scales) else scales,
                None if all(b is None for b in biases) else biases, **kw)


def _default_block(specs: Sequence[LayerSpec]):
    # The largest sparse block (its masks are constant on it); sides below 16 would lose tl.dot.
    blocks = [s.block for s in specs if s.block is not None]
    if blocks:
        block = max(blocks, key=lambda b: b[0] * b[1])
        return block if min(block) >= 16 else 16
    return 16 if max(s.weight.shape[0] for s in specs) < 32 else 32


def field_plan(net, block=None, **kw) -> FusedFieldPlan:
    """A ``FusedFieldPlan`` for ``net`` (an ``ODEnet`` or ``SparseODEnet``; weights packed once, rebuild
    after they change). Call it as ``plan(z, eps, t=t_tensor)`` -> ``(f, J eps)``: one launch per
    evaluation. ``block`` defaults to the largest sparse layer block of a ``SparseODEnet``, else 32
    (16 when every width is below 32)."""
    specs = layer_specs(net)
    return FusedFieldPlan.from_specs(specs, net.activation, block=_default_block(specs) if block is None else block,
                                     **kw)


class TritonField(DeviceSolve):
    """The fused field of the "triton" backend (any float dtype the kernels take, widths <= 512)."""

    def check(self, field: FieldShape, dtype, device) -> str | None:
        if not _supports(None, dtype, device):
            return f"the Triton kernels do not run {dtype} on {device.type} here"
        if field.max_width > FUSED_MAX_WIDTH:
            return f"a layer is {field.max_width} wide (the fused field takes widths <= {FUSED_MAX_WIDTH})"
        return None

    def pack(self, layers: list[LayerSpec], activation: str, dtype, device):
        return FusedFieldPlan.from_specs(layers, activation, block=_default_block(layers))

    def run(self, plan: FusedFieldPlan, t, z, v):
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).detach()
        with torch.no_grad():
            return plan(z.detach(), None if v is None else v.detach(), t=tt)


if IMPORT_ERROR is None:
    register_backend("triton", TritonBackend(), devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                     priority=-10 if INTERPRET else 20, dtypes=_DTYPES, available=available,
                     supports=_supports, replace=True, fused=TritonField())
