"""The ``"cuda"`` backend: the fused CUDA MLP (``csrc/cuda/fused_mlp.cu``), a whole block-sparse
concatsquash field, value and tangents, in one kernel launch per evaluation. It offers a fused field
only (no per-layer ops; those run on "triton" on a GPU), at priority 30, so ``"auto"`` prefers it to
the Triton fused field where both can run.

Per layer ``y = act(scale ⊙ (x Wᵀ) + shift)`` and ``y_v = act'(pre) ⊙ scale ⊙ (x_v Wᵀ)`` for every
tangent ``v``, with ``W`` block-sparse (BSR: ``values [nnzb, bm, bk]``, ``row_ptr [n/bm + 1]``,
``col_idx [nnzb]``, int32: ``BlockSparseWeight.int32()``) and, for concatsquash layers, ``scale = sigmoid(gate_w t + gate_b)``,
``shift = bias ⊙ scale + shift_w t`` computed in the kernel from ``t`` (a float, or a CUDA scalar tensor:
no host synchronisation). Widths up to 512, float32, inference only (no autograd: training uses the
per-layer ops).

    layers = field_layers(sparse_odenet, device)          # or [FusedLayer(...), ...]
    f, jv = fused_mlp(z, layers, v, t=t)                  # z [B, D], v [T, B, D]
    SparseODEnet.from_odenet(net, fused="cuda")           # the same inside a field (packing cached there)

Everything here raises a clear error when ``jsp_fast._C`` was built without CUDA
(``jsp_fast._C.build_info()["cuda"]`` is False): rebuild with ``JSP_FAST_CUDA=ON``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import _act
from ..._ext import IMPORT_ERROR, _C
from ..plan import BlockSparseWeight, as_block, block_grid, infer_block
from ..registry import FieldShape, LayerSpec, layer_specs, register_backend
from ._device_solve import DeviceSolve

__all__ = ["MAX_WIDTH", "MAX_LAYERS", "built_with_cuda", "available", "require_cuda_build", "FusedLayer",
           "field_layers", "fused_mlp", "CudaField"]

MAX_WIDTH = 512
MAX_LAYERS = 16
_BLOCK_CHOICES = (32, 16, 8, 4)
_VECTORS = ("scale", "bias", "gate_w", "gate_b", "shift_w")


# ---- build checks --------------------------------------------------------------------------------
def built_with_cuda() -> bool:
    """True when jsp_fast._C was compiled with the CUDA kernels."""
    return _C is not None and bool(_C.build_info().get("cuda", False)) and hasattr(_C, "cuda_fused_mlp")


def available() -> bool:
    """True when the fused CUDA MLP can run here (CUDA build and a CUDA device)."""
    return built_with_cuda() and torch.cuda.is_available()


def require_cuda_build():
    """Return jsp_fast._C, or raise RuntimeError saying why the CUDA kernels are missing."""
    if _C is None:
        raise RuntimeError(f"jsp_fast._C (the compiled kernels) is not available: {IMPORT_ERROR}. "
                           "Reinstall from the source tree with `pip install .`.")
    if not _C.build_info().get("cuda", False):
        raise RuntimeError(
            "jsp_fast._C was built without CUDA (jsp_fast._C.build_info()['cuda'] is False), so the fused "
            "CUDA MLP is unavailable. Rebuild on a machine with the CUDA toolkit: "
            "`JSP_FAST_CUDA=ON pip install .` (or -C cmake.define.JSP_FAST_CUDA=ON), or use another backend.")
    if not hasattr(_C, "cuda_fused_mlp"):
        raise RuntimeError("jsp_fast._C was built with CUDA but has no cuda_fused_mlp: the module is out of date; "
                           "rebuild it with `JSP_FAST_CUDA=ON pip install .`.")
    return _C


# ---- layers --------------------------------------------------------------------------------------
def _act_code(act) -> int:
    if act is None or isinstance(act, str):
        return _act.code(act)
    if isinstance(act, bool) or not isinstance(act, int) or not 0 <= act < len(_act.ACTIVATIONS):
        raise ValueError(f"activation code must be an int in [0, {len(_act.ACTIVATIONS) - 1}] or a name, got {act!r}")
    return int(act)


def _pick_block(size: int) -> int:
    for b in _BLOCK_CHOICES:
        if size % b == 0:
            return b
    return size


class FusedLayer:
    """One layer of the fused MLP: a BSR weight, its activation and its per-output scale/shift.

    ``values`` float32 ``[nnzb, bm, bk]``; ``row_ptr`` int32 ``[n/bm + 1]`` (non-decreasing, from 0 to
    nnzb); ``col_idx`` int32 ``[nnzb]`` in ``[0, k/bk)``; ``shape = (n, k)``. Either ``scale``/``bias``
    (plain per-output vectors) or ``gate_w``/``gate_b``/``shift_w``/``bias`` (concatsquash: computed
    from ``t`` in the kernel). All tensors on one device. The index contents are checked once here
    (a host copy), so the kernel never sees a malformed table.
    """

    def __init__(self, values, row_ptr, col_idx, shape, act="none", scale=None, bias=None, gate_w=None,
                 gate_b=None, shift_w=None, check_indices: bool = True):
        n, k = (int(s) for s in shape)
        if not (1 <= n <= MAX_WIDTH and 1 <= k <= MAX_WIDTH):
            raise ValueError(f"the fused CUDA MLP supports widths 1..{MAX_WIDTH}, got a {n}x{k} layer")
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError("values must be a 3-d tensor [nnzb, bm, bk]")
        nnzb, bm, bk = values.shape
        if bm < 1 or bk < 1 or n % bm or k % bk:
            raise ValueError(f"block {bm}x{bk} does not tile the {n}x{k} weight")
        for name, idx, length in (("row_ptr", row_ptr, n // bm + 1), ("col_idx", col_idx, nnzb)):
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int32 or idx.dim() != 1:
                raise ValueError(f"{name} must be a 1-d int32 tensor")
            if idx.numel() != length:
                raise ValueError(f"{name} must have {length} entries, got {idx.numel()}")
            if idx.device != values.device:
                raise ValueError(f"{name} is on {idx.device}, values on {values.device}")
        if check_indices:
            rp, ci = row_ptr.cpu(), col_idx.cpu()
            if rp[0] != 0 or rp[-1] != nnzb or bool((rp[1:] < rp[:-1]).any()):
                raise ValueError("row_ptr must rise from 0 to nnzb")
            if nnzb and (int(ci.min()) < 0 or int(ci.max()) >= k // bk):
                raise ValueError(f"col_idx must lie in [0, {k // bk})")
        vecs = {"scale": scale, "bias": bias, "gate_w": gate_w, "gate_b": gate_b, "shift_w": shift_w}
        if scale is not None and gate_w is not None:
            raise ValueError("give either scale (plain) or gate_w (concatsquash), not both")
        if gate_w is None and (gate_b is not None or shift_w is not None):
            raise ValueError("gate_b and shift_w need gate_w")
        for name, v in vecs.items():
            if v is None:
                continue
            if not isinstance(v, torch.Tensor) or v.numel() != n:
                raise ValueError(f"{name} must be a tensor of {n} elements")
            if v.device != values.device:
                raise ValueError(f"{name} is on {v.device}, values on {values.device}")
            vecs[name] = v.detach().reshape(n).to(torch.float32).contiguous()
        self.values = values.detach().to(torch.float32).contiguous()
        self.row_ptr, self.col_idx = row_ptr.contiguous(), col_idx.contiguous()
        self.shape = (n, k)
        self.act = _act_code(act)
        for name, v in vecs.items():
            setattr(self, name, v)

    @property
    def block(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        n, k = self.shape
        return f"FusedLayer({k} -> {n}, block={self.block}, nnzb={self.nnzb}, act={self.act})"

    def to(self, device) -> "FusedLayer":
        mv = lambda v: None if v is None else v.to(device)  # noqa: E731
        return FusedLayer(self.values.to(device), self.row_ptr.to(device), self.col_idx.to(device), self.shape,
                          self.act, check_indices=False, **{name: mv(getattr(self, name)) for name in _VECTORS})

    @classmethod
    def from_plan(cls, weight: BlockSparseWeight, act="none", **vectors) -> "FusedLayer":
        """The int32 view of a block-sparse plan (``BlockSparseWeight``) with its epilogue vectors."""
        t = weight.int32()
        return cls(weight.values, t.row_ptr, t.col_idx, weight.shape, act, check_indices=False, **vectors)

    @classmethod
    def from_blocks(cls, values, block_rows, block_cols, shape, act="none", **vectors) -> "FusedLayer":
        """From kept blocks in grid coordinates (any order): sorted into BSR row order."""
        return cls.from_plan(BlockSparseWeight.from_blocks(values.detach(), block_rows, block_cols, shape), act,
                             **vectors)

    @classmethod
    def from_dense(cls, weight, mask=None, block=None, act="none", **vectors) -> "FusedLayer":
        """From a dense ``[n, k]`` weight; with ``mask``, only blocks with a kept weight are stored (and
        masked entries inside them are zero); without, every block is stored."""
        n, k = weight.shape
        block = (_pick_block(n), _pick_block(k)) if block is None else as_block(block)
        w = weight.detach().to(torch.float32)
        if mask is None:
            grid = torch.ones(n // block[0], k // block[1], dtype=torch.bool, device=w.device)
        else:
            mask = mask.to(device=w.device, dtype=torch.bool)
            w, grid = w * mask, block_grid(mask, block)
        return cls.from_plan(BlockSparseWeight.from_dense(w, grid, block), act, **vectors)


def field_layers(net, device=None) -> list[FusedLayer]:
    """The FusedLayers of a concatsquash field: a ``SparseODEnet`` (block-sparse layers keep their
    blocks, dense ones become all-kept BSR) or a masked dense ``ODEnet``."""
    return _layers_from_specs(layer_specs(net), getattr(net, "activation", "tanh"), device)


def _layers_from_specs(specs: Sequence[LayerSpec], activation: str, device=None) -> list[FusedLayer]:
    out = []
    last = len(specs) - 1
    for i, s in enumerate(specs):
        block = s.block
        if block is None and s.mask is not None and not bool(s.mask.all()):
            block = infer_block(s.mask)
        vecs = {"gate_w": s.gate_w.reshape(-1), "gate_b": s.gate_b, "shift_w": s.shift_w.reshape(-1), "bias": s.bias}
        with torch.no_grad():
            fl = FusedLayer.from_dense(s.weight, s.mask, block, activation if i < last else "none", **vecs)
        out.append(fl if device is None else fl.to(device))
    return out


# ---- launch --------------------------------------------------------------------------------------
def _ptr(t):
    return None if t is None else t.data_ptr()


def fused_mlp(x: torch.Tensor, layers: Sequence[FusedLayer], x_dot: torch.Tensor | None = None, t=0.0):
    """``(y, y_dot)`` of the fused MLP; ``x`` ``[B, k0]``, ``x_dot`` ``[T, B, k0]`` or None (``y_dot`` None).

    ``t``: a float or a scalar tensor on ``x``'s device (read in the kernel, no synchronisation).
    Runs on the current stream of ``x``'s device; float32 only; no autograd.
    """
    require_cuda_build()
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise ValueError("x must be a CUDA tensor (the fused MLP runs on the GPU)")
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-d float32 tensor, got {x.dtype} with shape {tuple(x.shape)}")
    layers = list(layers)
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"the fused CUDA MLP takes 1..{MAX_LAYERS} layers, got {len(layers)}")
    for i, L in enumerate(layers):
        if not isinstance(L, FusedLayer):
            raise ValueError(f"layer {i} must be a FusedLayer, got {type(L).__name__}")
        if L.device != x.device:
            raise ValueError(f"layer {i} is on {L.device}, x on {x.device}")
        if i and L.shape[1] != layers[i - 1].shape[0]:
            raise ValueError(f"layer {i} takes {L.shape[1]} inputs, layer {i - 1} gives {layers[i - 1].shape[0]}")
    B, k0 = x.shape
    if k0 != layers[0].shape[1]:
        raise ValueError(f"x has {k0} features, the first layer takes {layers[0].shape[1]}")
    if x_dot is not None:
        if not isinstance(x_dot, torch.Tensor) or x_dot.device != x.device or x_dot.dtype != torch.float32:
            raise ValueError("x_dot must be a float32 tensor on x's device")
        if x_dot.dim() != 3 or tuple(x_dot.shape[1:]) != (B, k0):
            raise ValueError(f"x_dot must have shape [T, {B}, {k0}], got {tuple(x_dot.shape)}")
    grads = [x, x_dot] + [getattr(L, n) for L in layers for n in ("values",) + _VECTORS]
    if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
        raise RuntimeError("the fused CUDA MLP is inference only (no autograd): call it under torch.no_grad() "
                           "or use the per-layer ops for training")
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError("t must be a scalar")
        if t.is_cuda and t.device != x.device:
            raise ValueError(f"t is on {t.device}, x on {x.device}")
        t = t.detach().reshape(()).to(torch.float32)
    else:
        t = torch.tensor(float(t), dtype=torch.float32)
    tensors, meta = [], []
    for L in layers:
        tensors += [getattr(L, name) for name in _LAYER_TENSORS]
        meta += [L.shape[0], L.shape[1], L.block[0], L.block[1], L.act]
    y, y_dot = torch.ops.jsp_fast.cuda_fused_mlp(x.contiguous(), None if x_dot is None else x_dot.contiguous(), t,
                                                 tensors, meta)
    return y, (None if x_dot is None else y_dot)


# The torch.library op: the launcher above validates; the op owns the launch (so torch.compile sees one
# opaque call with a fake implementation, and a device-resident t keeps it graph-capturable).
_LAYER_TENSORS = ("values", "row_ptr", "col_idx") + _VECTORS
_META = 5  # n, k, bm, bk, act per layer


@torch.library.custom_op("jsp_fast::cuda_fused_mlp", mutates_args=(), device_types="cuda")
def _cuda_fused_mlp_op(x: torch.Tensor, x_dot: Optional[torch.Tensor], t: torch.Tensor,
                       tensors: List[Optional[torch.Tensor]], meta: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    C = require_cuda_build()
    B = x.shape[0]
    ntan = 0 if x_dot is None else x_dot.shape[0]
    nl = len(meta) // _META
    if len(meta) != nl * _META or len(tensors) != nl * len(_LAYER_TENSORS):
        raise ValueError("jsp_fast::cuda_fused_mlp: tensors/meta do not describe whole layers")
    n_out = meta[(nl - 1) * _META]
    y = torch.empty(B, n_out, device=x.device, dtype=torch.float32)
    y_dot = torch.empty(ntan, B, n_out, device=x.device, dtype=torch.float32)
    specs = []
    for i in range(nl):
        n, k, bm, bk, act = meta[i * _META:(i + 1) * _META]
        ts = tensors[i * len(_LAYER_TENSORS):(i + 1) * len(_LAYER_TENSORS)]
        spec = {"n": n, "k": k, "bm": bm, "bk": bk, "nnzb": ts[0].shape[0], "act": act}
        spec.update({name: _ptr(v) for name, v in zip(_LAYER_TENSORS, ts)})
        specs.append(spec)
    if B == 0:
        return y, y_dot
    t_dev = t if t.is_cuda else None
    t_val = 0.0 if t.is_cuda else float(t)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        C.cuda_fused_mlp(specs, _ptr(x), _ptr(x_dot) if ntan else None, _ptr(y), _ptr(y_dot) if ntan else None,
                         B, ntan, t_val, _ptr(t_dev), stream)
    return y, y_dot


@_cuda_fused_mlp_op.register_fake
def _(x, x_dot, t, tensors, meta):
    n_out = meta[len(meta) - _META]
    ntan = 0 if x_dot is None else x_dot.shape[0]
    return x.new_empty(x.shape[0], n_out), x.new_empty(ntan, x.shape[0], n_out)


class CudaField(DeviceSolve):
    """The fused field of the "cuda" backend: float32 CUDA tensors, widths <= 512, <= 16 layers."""

    def check(self, field: FieldShape, dtype, device) -> str | None:
        if field.num_layers > MAX_LAYERS:
            return f"the field has {field.num_layers} layers (the fused CUDA MLP takes up to {MAX_LAYERS})"
        if field.max_width > MAX_WIDTH:
            return f"a layer is {field.max_width} wide (the fused CUDA MLP takes widths <= {MAX_WIDTH})"
        return None

    def pack(self, layers: list[LayerSpec], activation: str, dtype, device):
        return _layers_from_specs(layers, activation, device)

    def run(self, layers, t, z, v):
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).detach()
        with torch.no_grad():
            return fused_mlp(z.detach(), layers, None if v is None else v.detach(), t=tt)


register_backend("cuda", None, devices=("cuda",), priority=30, dtypes=(torch.float32,), available=available,
                 fused=CudaField())
