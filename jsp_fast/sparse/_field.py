"""SparseODEnet: a concatsquash vector field whose pruned layers run block-sparse.

Same interface as ``jsp_fast.cnf.ODEnet`` (``forward(t, z)``, ``jvp(t, z, v[T, B, D])``), so it drops
into ``CNF(net=...)`` or any torchdiffeq right-hand side. Two execution paths:

- **per layer** (always available, differentiable): each block-sparse layer is one
  ``jf.ops.bsr_linear`` / ``bsr_linear_jvp`` call with the concatsquash time gate and shift fused
  as the per-output ``scale``/``bias`` epilogue (``act(g ⊙ (x Wᵀ) + (g ⊙ b + W_b t))``); layers left
  dense run ``F.linear`` with the same math. Gradients reach the kept blocks' values, the biases
  and the gate/shift hyper-layers.
- **fused** (inference): the whole field — every layer, value and all T tangents, the time gate —
  is ONE call. Taken automatically when no gradient is needed (``torch.no_grad()``, or nothing
  requires grad), e.g. ``sample``, and ``log_prob``/``transform`` under ``no_grad``; ``fused=False``
  turns it off. ``fused_engine(z)`` says which runs (see ``FUSED_ENGINES``):

  ========  ====================================  ==========================================
  engine    where                                  chosen when
  ========  ====================================  ==========================================
  cpu       C++ (``csrc/cpu/field.cpp``)           CPU, float32/64, backend auto or "cpu"
  cuda      CUDA C++ (``csrc/cuda/fused_mlp.cu``)  GPU, float32, widths <= 512, <= 16 layers,
                                                   ``_C`` built with CUDA, backend auto
  triton    ``kernels/fused_field.py``             GPU otherwise (backend auto or "triton"),
                                                   widths <= 512; CPU only under
                                                   TRITON_INTERPRET=1 with backend "triton"
  ========  ====================================  ==========================================

  On the GPU the time ``t`` stays a device tensor (no host synchronisation per evaluation, so a
  solve can be captured in a CUDA graph). The CUDA-vs-Triton order under "auto" is provisional:
  it has not been measured on a GPU yet (``bench/gpu.py``).

Layers that have no ``weight_mask``, keep every weight, or whose mask is not constant on the block
grid stay dense; ``SparseODEnet.dense_layers`` says which and why (also in ``repr``).
"""
from __future__ import annotations

import copy
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._ext import _C
from ..cnf._layers import ConcatSquashLinear, ODEnet, activate, activation_derivative, check_activation

# Block shapes tried, largest first, when sparsify() is not told the block (the mask carries no block
# size, so it is recovered from the mask: the largest of these on which the mask is constant).
BLOCK_CANDIDATES = ((64, 64), (64, 32), (32, 64), (32, 32), (32, 16), (16, 32), (16, 16), (8, 8))
_TABLES = ("_t_row_ptr", "_t_col_idx", "_t_block_row", "_t_col_ptr", "_t_row_idx", "_t_perm")
FUSED_ENGINES = ("cpu", "cuda", "triton")
ACT_CODES = {"none": 0, "tanh": 1, "softplus": 2, "elu": 3, "relu": 4, "sigmoid": 5}


# ---- backends ------------------------------------------------------------------------------------
def _ops():
    """``jsp_fast.ops`` when the block-sparse ops are installed, else None (private torch reference)."""
    try:
        from .. import ops  # noqa: PLC0415
    except ImportError:
        return None
    return ops if hasattr(ops, "bsr_linear") and hasattr(ops, "bsr_linear_jvp") else None


def available_backends() -> tuple[str, ...]:
    try:
        from .. import backends  # noqa: PLC0415

        names = tuple(backends.available())
    except (ImportError, AttributeError):
        names = ("torch",) + (("cpu",) if _C is not None else ())
    return names


def check_backend(backend: str | None) -> str:
    backend = "auto" if backend is None else str(backend).lower()
    names = available_backends()
    if backend != "auto" and backend not in names:
        raise ValueError(f"unknown or unavailable backend {backend!r}; expected 'auto' or one of {names}")
    return backend


# ---- block structure -----------------------------------------------------------------------------
def is_block_aligned(mask: torch.Tensor, block: tuple[int, int]) -> bool:
    """True when ``mask`` tiles exactly into ``block`` and is constant on every block."""
    n, k = mask.shape
    bm, bk = block
    if n % bm or k % bk:
        return False
    g = mask.reshape(n // bm, bm, k // bk, bk)
    return bool((g.all(dim=(1, 3)) == g.any(dim=(1, 3))).all())


def infer_block(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest candidate block the mask is built of, or None."""
    best = None
    for b in BLOCK_CANDIDATES:
        if is_block_aligned(mask, b) and (best is None or b[0] * b[1] > best[0] * best[1]):
            best = b
    return best


# ---- layers --------------------------------------------------------------------------------------
class BlockSparseConcatSquash(nn.Module):
    """A concatsquash layer whose main weight keeps only whole ``bm × bk`` blocks.

    ``values`` [nnzb, bm, bk] (the trainable kept blocks, row-major over the block grid),
    ``block_rows``/``block_cols`` their grid coordinates; ``bias``, ``hyper_gate``, ``hyper_bias`` as in
    ``ConcatSquashLinear``.
    """

    def __init__(self, layer: ConcatSquashLinear, block: tuple[int, int]):
        super().__init__()
        w = layer.linear.weight.detach()
        mask = layer.mask
        n, k = w.shape
        bm, bk = block
        self.out_features, self.in_features, self.block = n, k, (bm, bk)
        grid = mask.reshape(n // bm, bm, k // bk, bk).any(dim=(1, 3))
        rows, cols = grid.nonzero(as_tuple=True)
        blocks = (w * mask).reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)[rows, cols]
        self.values = nn.Parameter(blocks.clone().contiguous())
        self.register_buffer("block_rows", rows.clone())
        self.register_buffer("block_cols", cols.clone())
        b = layer.linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone())
        self.hyper_gate = copy.deepcopy(layer.hyper_gate)
        self.hyper_bias = copy.deepcopy(layer.hyper_bias)

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        bm, bk = self.block
        return self.nnzb * bm * bk / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}")

    def block_mask(self) -> torch.Tensor:
        """bool [n/bm, k/bk] grid of kept blocks."""
        bm, bk = self.block
        g = torch.zeros(self.out_features // bm, self.in_features // bk, dtype=torch.bool,
                        device=self.values.device)
        g[self.block_rows, self.block_cols] = True
        return g

    def mask(self) -> torch.Tensor:
        bm, bk = self.block
        return self.block_mask().repeat_interleave(bm, 0).repeat_interleave(bk, 1)

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[n, k]`` weight (zeros outside kept blocks), differentiable in ``values``."""
        bm, bk = self.block
        n, k = self.out_features, self.in_features
        grid = self.values.new_zeros(n // bm, k // bk, bm, bk)
        grid = grid.index_put((self.block_rows, self.block_cols), self.values)
        return grid.permute(0, 2, 1, 3).reshape(n, k)

    def gate_and_shift(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tt = t.reshape(1, 1).to(self.values.dtype)
        gate = torch.sigmoid(self.hyper_gate(tt)).reshape(-1)
        shift = self.hyper_bias(tt).reshape(-1)
        if self.bias is not None:
            shift = shift + self.bias * gate
        return gate, shift

    # per-layer path ---------------------------------------------------------------------------------
    def bsr_weight(self):
        """The ``BlockSparseWeight`` over the live ``values`` (gradients reach them), or None when the
        block-sparse ops are not installed. Its look-up tables are built once and kept as
        non-persistent buffers (they follow ``.to()`` and stay out of the state dict)."""
        try:
            from ._format import BlockSparseWeight, build_tables  # noqa: PLC0415
        except ImportError:
            return None
        bm, bk = self.block
        n, k = self.out_features, self.in_features
        if "_t_row_ptr" not in self._buffers or self._buffers["_t_row_ptr"].device != self.values.device:
            tables = build_tables(self.block_rows, self.block_cols, n // bm, k // bk)
            for name, v in zip(_TABLES, tables):
                self.register_buffer(name, v, persistent=False)
        return BlockSparseWeight(self.values, (n, k), self.block, *(self._buffers[t] for t in _TABLES))

    def forward(self, t, x, act: str, backend: str = "auto"):
        gate, shift = self.gate_and_shift(t)
        ops = _ops()
        w = self.bsr_weight() if ops is not None else None
        if w is not None:
            return ops.bsr_linear(x, w, gate, shift, act, backend=backend)
        return activate(act, F.linear(x, self.dense_weight()) * gate + shift)

    def jvp(self, t, x, xv, act: str, backend: str = "auto"):
        gate, shift = self.gate_and_shift(t)
        ops = _ops()
        w = self.bsr_weight() if ops is not None else None
        if w is not None:
            return ops.bsr_linear_jvp(x, xv, w, gate, shift, act, backend=backend)
        w = self.dense_weight()
        pre = F.linear(x, w) * gate + shift
        y = activate(act, pre)
        return y, activation_derivative(act, pre, y) * (F.linear(xv, w) * gate)

    def fused_spec(self):
        return (self.dense_weight().detach(), self.mask(), self.hyper_gate.weight, self.hyper_gate.bias,
                self.hyper_bias.weight, self.bias)


class DenseConcatSquash(nn.Module):
    """A layer that stays dense (no mask, or a mask that is not block-aligned); masks still apply."""

    def __init__(self, layer: ConcatSquashLinear):
        super().__init__()
        self.layer = copy.deepcopy(layer)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    def dense_weight(self) -> torch.Tensor:
        return self.layer.effective_weight()

    def mask(self) -> torch.Tensor | None:
        return self.layer.mask

    def gate_and_shift(self, t):
        return self.layer.gate_and_shift(t)

    def forward(self, t, x, act: str, backend: str = "auto"):
        return activate(act, self.layer(t, x))

    def jvp(self, t, x, xv, act: str, backend: str = "auto"):
        pre, pre_v = self.layer.jvp(t, x, xv)
        y = activate(act, pre)
        return y, activation_derivative(act, pre, y) * pre_v

    def fused_spec(self):
        l = self.layer
        return (l.effective_weight().detach(), l.mask, l.hyper_gate.weight, l.hyper_gate.bias,
                l.hyper_bias.weight, l.linear.bias)


# ---- the fused one-call path ---------------------------------------------------------------------
def fused_available() -> bool:
    return _C is not None and hasattr(_C, "FieldPlanF32")


def _np(x: torch.Tensor, dtype: torch.dtype):
    return x.detach().to("cpu", dtype).reshape(x.shape).contiguous().numpy()


def build_plan(layers: Sequence[nn.Module], activation: str, dtype: torch.dtype):
    """Pack ``layers`` (each with ``fused_spec()``) into a ``jsp_fast._C.FieldPlanF32/F64``."""
    cls = _C.FieldPlanF32 if dtype == torch.float32 else _C.FieldPlanF64
    plan = cls()
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        w, mask, gate_w, gate_b, shift_w, bias = layer.fused_spec()
        m = None if mask is None else mask.detach().to("cpu", torch.uint8).contiguous().numpy()
        plan.add_layer(_np(w, dtype), m,
                       _np(gate_w.reshape(-1), dtype), _np(gate_b.reshape(-1), dtype),
                       _np(shift_w.reshape(-1), dtype), None if bias is None else _np(bias, dtype),
                       ACT_CODES[activation if i < last else "none"])
    return plan


def state_key(module: nn.Module, *extra) -> tuple:
    """``extra`` + the storage and in-place version of every parameter and buffer of ``module``: equal
    keys mean a packing of the module's weights is still valid (the fused fields' plan caches)."""
    return extra + tuple((p.data_ptr(), p._version) for p in module.parameters()) + tuple(
        (b.data_ptr(), b._version) for b in module.buffers())


def _run_cpu_plan(plan, t, z, v):
    z = z.detach().contiguous()
    B = z.shape[0]
    f = torch.empty(B, plan.dim_out, dtype=z.dtype)
    threads = torch.get_num_threads()
    if v is None:
        plan.eval(float(t), z.numpy(), None, f.numpy(), None, threads)
        return f, None
    v = v.detach().contiguous()
    jv = torch.empty(v.shape[0], B, plan.dim_out, dtype=z.dtype)
    plan.eval(float(t), z.numpy(), v.numpy(), f.numpy(), jv.numpy(), threads)
    return f, jv


# Both GPU fused fields keep a batch tile's activations on chip (or in a per-program scratch), which
# is the point for narrow fields and a waste of occupancy (and of scratch memory) for wide ones: wider
# fields run the per-layer kernels.
FUSED_MAX_WIDTH = 512


def _max_width(net: "SparseODEnet") -> int:
    return max(max(l.in_features, l.out_features) for l in net.layers)


def _triton_fused_ok(net: "SparseODEnet", z: torch.Tensor) -> bool:
    from . import _triton  # noqa: PLC0415

    return (_triton.available() and _triton._supports(None, z.dtype, z.device)
            and _max_width(net) <= FUSED_MAX_WIDTH)


def _cuda_fused_ok(net: "SparseODEnet", z: torch.Tensor) -> bool:
    from . import _cuda  # noqa: PLC0415

    return (z.dtype == torch.float32 and _cuda.available() and len(net.layers) <= _cuda.MAX_LAYERS
            and _max_width(net) <= min(_cuda.MAX_WIDTH, FUSED_MAX_WIDTH))


# ---- the field -----------------------------------------------------------------------------------
class SparseODEnet(nn.Module):
    """Concatsquash field with block-sparse layers; ``forward(t, z)`` and ``jvp(t, z, v)`` like ``ODEnet``.

    Build it with ``SparseODEnet.from_odenet(net)`` (or ``jf.sparsify(cnf)`` for a whole CNF).
    ``dense_layers`` maps the index of every layer left dense to the reason.
    """

    def __init__(self, layers: Sequence[nn.Module], activation: str = "tanh", backend: str = "auto",
                 dense_layers: dict[int, str] | None = None, fused: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for a, b in zip(self.layers[:-1], self.layers[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"layer widths do not chain: {a.out_features} -> {b.in_features}")
        self.activation = check_activation(activation)
        self.backend = check_backend(backend)
        self.dense_layers = dict(dense_layers or {})
        self.fused = bool(fused)
        self._plan = None
        self._plan_key = None

    def __getstate__(self):
        # The packed plan is a cache of the parameters (and not picklable): deepcopy/torch.save drop it.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_plan"] = None
        state["_plan_key"] = None
        return state

    @classmethod
    def from_odenet(cls, net: ODEnet, backend: str = "auto", block: tuple[int, int] | int | None = None,
                    fused: bool = True) -> "SparseODEnet":
        """Convert a (masked) ``ODEnet``: block-aligned masked layers become block-sparse."""
        if not isinstance(net, ODEnet):
            raise TypeError(f"expected a jsp_fast.cnf.ODEnet, got {type(net).__name__}")
        backend = check_backend(backend)
        if block is not None:
            block = (block, block) if isinstance(block, int) else tuple(int(b) for b in block)
            if len(block) != 2 or min(block) <= 0:
                raise ValueError(f"block must be a positive int or a pair of positive ints, got {block!r}")
        layers, dense = [], {}
        for i, layer in enumerate(net.layers):
            mask = layer.mask
            reason, b = None, block
            if mask is None:
                reason = "no weight_mask"
            elif bool(mask.all()):
                reason = "mask keeps every weight"
            elif b is None:
                b = infer_block(mask)
                if b is None:
                    reason = f"mask is not block-aligned (weight {tuple(mask.shape)}, blocks up to 64x64 tried)"
            elif not is_block_aligned(mask, b):
                reason = f"mask is not aligned to {b[0]}x{b[1]} blocks (weight {tuple(mask.shape)})"
            if reason is None:
                layers.append(BlockSparseConcatSquash(layer, b))
            else:
                layers.append(DenseConcatSquash(layer))
                dense[i] = reason
        out = cls(layers, net.activation, backend, dense, fused)
        ref = net.layers[0].linear.weight
        return out.to(device=ref.device, dtype=ref.dtype)

    def to_odenet(self) -> ODEnet:
        """The equivalent masked dense ``ODEnet`` (for checkpoints and comparisons)."""
        ref = self.layers[0].dense_weight()
        net = ODEnet(self.dim, self.hidden, self.activation).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for src, dst in zip(self.layers, net.layers):
                if isinstance(src, DenseConcatSquash):
                    dst.set_mask(src.layer.mask)
                    dst.load_state_dict(src.layer.state_dict())
                    continue
                dst.linear.weight.copy_(src.dense_weight())
                if src.bias is not None:
                    dst.linear.bias.copy_(src.bias)
                dst.hyper_gate.load_state_dict(src.hyper_gate.state_dict())
                dst.hyper_bias.load_state_dict(src.hyper_bias.state_dict())
                dst.set_mask(src.mask())
        return net

    @property
    def dim(self) -> int:
        return self.layers[0].in_features

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(layer.out_features for layer in self.layers[:-1])

    @property
    def sparse_layers(self) -> dict[int, tuple[int, int]]:
        return {i: l.block for i, l in enumerate(self.layers) if isinstance(l, BlockSparseConcatSquash)}

    def extra_repr(self) -> str:
        dense = ", ".join(f"{i}: {r}" for i, r in self.dense_layers.items()) or "none"
        return f"activation={self.activation!r}, backend={self.backend!r}, fused={self.fused}, dense_layers={{{dense}}}"

    # -- execution -----------------------------------------------------------------------------------
    def fused_engine(self, z: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
        """The one-call field that ``forward(t, z)`` / ``jvp(t, z, v)`` would run on these inputs now
        (one of ``FUSED_ENGINES``), or None when the per-layer ops run (gradients needed, ``fused=False``,
        an unsupported device/dtype, or a backend that has no fused field)."""
        if not self.fused:
            return None
        if torch.is_grad_enabled() and (z.requires_grad or (v is not None and v.requires_grad)
                                        or any(p.requires_grad for p in self.parameters())):
            return None
        name = self.backend
        if name == "auto":
            name = os.environ.get("JSP_FAST_BACKEND", "").strip().lower() or "auto"
        if z.device.type == "cpu":
            if name in ("auto", "cpu") and fused_available() and z.dtype in (torch.float32, torch.float64):
                return "cpu"
            if name == "triton" and _triton_fused_ok(self, z):
                return "triton"
            return None
        if z.device.type == "cuda":
            if name == "auto" and _cuda_fused_ok(self, z):
                return "cuda"
            if name in ("auto", "triton") and _triton_fused_ok(self, z):
                return "triton"
        return None

    def fused_plan(self, dtype: torch.dtype, engine: str = "cpu", device: torch.device | None = None):
        """The packed plan of ``engine`` for ``dtype`` (and ``device``), re-packed when any parameter or
        buffer changed: a ``_C.FieldPlanF32/F64`` ("cpu"), a ``kernels.fused_field.FusedFieldPlan``
        ("triton") or the list of ``_cuda.FusedLayer`` ("cuda")."""
        key = state_key(self, engine, dtype, device)
        if self._plan is None or self._plan_key != key:
            self._plan = None  # free the old packing before building the new one
            if engine == "cpu":
                self._plan = build_plan(list(self.layers), self.activation, dtype)
            elif engine == "triton":
                from ._triton import field_plan  # noqa: PLC0415

                self._plan = field_plan(self)
            elif engine == "cuda":
                from ._cuda import field_layers  # noqa: PLC0415

                self._plan = field_layers(self, device)
            else:
                raise ValueError(f"unknown fused engine {engine!r}; expected one of {FUSED_ENGINES}")
            self._plan_key = key
        return self._plan

    def _fused(self, engine: str, t, z, v):
        plan = self.fused_plan(z.dtype, engine, z.device)
        if engine == "cpu":
            return _run_cpu_plan(plan, t, z, v)
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).detach()
        with torch.no_grad():
            if engine == "triton":
                return plan(z.detach(), None if v is None else v.detach(), t=tt)
            from ._cuda import fused_mlp  # noqa: PLC0415

            return fused_mlp(z.detach(), plan, None if v is None else v.detach(), t=tt)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        engine = self.fused_engine(z)
        if engine is not None:
            return self._fused(engine, t, z, None)[0]
        h = z
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(t, h, self.activation if i < last else "none", self.backend)
        return h

    def jvp(self, t: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(t, z), J v)`` for tangents ``v`` of shape [T, B, dim]."""
        if v.dim() != 3 or v.shape[1:] != z.shape:
            raise ValueError(f"v must have shape [T, {z.shape[0]}, {z.shape[1]}], got {tuple(v.shape)}")
        engine = self.fused_engine(z, v)
        if engine is not None:
            return self._fused(engine, t, z, v)
        h, hv = z, v
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, hv = layer.jvp(t, h, hv, self.activation if i < last else "none", self.backend)
        return h, hv
