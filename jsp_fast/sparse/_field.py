"""SparseODEnet: a concatsquash vector field whose pruned layers run block-sparse.

Same interface as ``jsp_fast.cnf.ODEnet`` (``forward(t, z)``, ``jvp(t, z, v[T, B, D])``), so it drops
into ``CNF(net=...)`` or any torchdiffeq right-hand side. Two execution paths:

- **per layer** (always available, differentiable): each block-sparse layer is one ``bsr_linear`` /
  ``bsr_linear_jvp`` op with the concatsquash time gate and shift fused as the per-output
  ``scale``/``bias`` epilogue (``act(g ⊙ (x Wᵀ) + (g ⊙ b + W_b t))``); layers left dense run
  ``F.linear`` with the same math. Gradients reach the kept blocks' values, the biases and the
  gate/shift hyper-layers.
- **fused** (inference): the whole field — every layer, value and all T tangents, the time gate — is
  ONE call of a backend's fused field ("cpu": ``csrc/cpu/field.cpp``; "cuda": ``csrc/cuda``; "triton":
  ``kernels/fused_field.py``). Taken when no gradient is needed (``torch.no_grad()``, or nothing
  requires grad), e.g. ``sample``, and ``log_prob``/``transform`` under ``no_grad``. Which engine runs
  is decided by ``registry.resolve`` (``fused_engine(z, v)`` asks it): under ``fused=True`` the
  backend's (``"auto"``: the best for the device, dtype and widths); ``fused="cuda"`` etc. forces an
  engine (an error when it cannot run the inputs); ``fused=False`` turns the fused path off.

  On the GPU the time ``t`` stays a device tensor (no host synchronisation per evaluation, so a
  solve can be captured in a CUDA graph).

Each engine's packing of the weights is cached on the module (one cache, ``fused_plan``) and rebuilt
when a parameter or buffer changes (``state_key``).

Layers that have no ``weight_mask``, keep every weight, or whose mask is not constant on the block
grid stay dense; ``SparseODEnet.dense_layers`` says which and why (also in ``repr``).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _act
from ..cnf._layers import ConcatSquashLinear, ODEnet
from . import registry
from ._modules import _BlockStorage, under_func_transform
from ._ops import bsr_linear, bsr_linear_jvp
from .plan import BlockSparseWeight, as_block, infer_block, is_block_aligned
from .registry import FieldShape, LayerSpec

__all__ = ["SparseODEnet", "BlockSparseConcatSquash", "DenseConcatSquash", "state_key"]


# ---- layers --------------------------------------------------------------------------------------
class BlockSparseConcatSquash(_BlockStorage):
    """A concatsquash layer whose main weight keeps only whole ``bm × bk`` blocks.

    ``values`` [nnzb, bm, bk] (the trainable kept blocks, row-major over the block grid),
    ``block_rows``/``block_cols`` their grid coordinates; ``bias``, ``hyper_gate``, ``hyper_bias`` as in
    ``ConcatSquashLinear``. ``weight`` is the ``BlockSparseWeight`` over the live values.
    """

    def __init__(self, layer: ConcatSquashLinear, block):
        super().__init__()
        self._init_blocks(BlockSparseWeight.from_dense(layer.effective_weight().detach(), layer.mask, block))
        b = layer.linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().clone())
        self.hyper_gate = copy.deepcopy(layer.hyper_gate)
        self.hyper_bias = copy.deepcopy(layer.hyper_bias)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}")

    def gate_and_shift(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tt = t.reshape(1, 1).to(self.values.dtype)
        gate = torch.sigmoid(self.hyper_gate(tt)).reshape(-1)
        shift = self.hyper_bias(tt).reshape(-1)
        if self.bias is not None:
            shift = shift + self.bias * gate
        return gate, shift

    def forward(self, t, x, act: str, backend: str = "auto"):
        gate, shift = self.gate_and_shift(t)
        return bsr_linear(x, self.weight, gate, shift, act, backend=backend)

    def jvp(self, t, x, xv, act: str, backend: str = "auto"):
        gate, shift = self.gate_and_shift(t)
        return bsr_linear_jvp(x, xv, self.weight, gate, shift, act, backend=backend)

    def layer_spec(self) -> LayerSpec:
        return LayerSpec(self.dense_weight().detach(), self.mask(), self.block, self.hyper_gate.weight,
                         self.hyper_gate.bias, self.hyper_bias.weight, self.bias)


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
        return _act.apply(act, self.layer(t, x))

    def jvp(self, t, x, xv, act: str, backend: str = "auto"):
        pre, pre_v = self.layer.jvp(t, x, xv)
        y = _act.apply(act, pre)
        return y, _act.derivative(act, pre, y) * pre_v

    def layer_spec(self) -> LayerSpec:
        lay = self.layer
        return LayerSpec(lay.effective_weight().detach(), lay.mask, None, lay.hyper_gate.weight, lay.hyper_gate.bias,
                         lay.hyper_bias.weight, lay.linear.bias)


def state_key(module: nn.Module, *extra) -> tuple:
    """``extra`` + the storage and in-place version of every parameter and buffer of ``module``: equal
    keys mean a packing of the module's weights is still valid (the fused fields' plan cache)."""
    return extra + tuple((p.data_ptr(), p._version) for p in module.parameters()) + tuple(
        (b.data_ptr(), b._version) for b in module.buffers())


def _check_fused(fused) -> bool | str:
    if isinstance(fused, bool):
        return fused
    if isinstance(fused, str):
        return registry.check_name(fused, fused=True)
    raise TypeError(f"fused must be True, False or the name of a fused field, got {fused!r}")


# ---- the field -----------------------------------------------------------------------------------
class SparseODEnet(nn.Module):
    """Concatsquash field with block-sparse layers; ``forward(t, z)`` and ``jvp(t, z, v)`` like ``ODEnet``.

    Build it with ``SparseODEnet.from_odenet(net)`` (or ``jf.sparsify(cnf)`` for a whole CNF).
    ``dense_layers`` maps the index of every layer left dense to the reason. ``backend`` chooses the
    per-layer ops ("auto" or a name of ``jf.backends.available()``); ``fused``: True (the backend's
    fused field when one can run), False (never), or a fused field's name ("cpu", "cuda", "triton":
    always that one for inference, an error where it cannot run).
    """

    def __init__(self, layers: Sequence[nn.Module], activation: str = "tanh", backend: str = "auto",
                 dense_layers: dict[int, str] | None = None, fused: bool | str = True, native: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for a, b in zip(self.layers[:-1], self.layers[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"layer widths do not chain: {a.out_features} -> {b.in_features}")
        self.activation = _act.check(activation)
        self.backend = registry.check_name(backend)
        self.dense_layers = dict(dense_layers or {})
        self.fused = _check_fused(fused)
        if not isinstance(native, bool):
            raise TypeError(f"native must be True or False, got {native!r}")
        # Inference solves in one native call where the fused engine offers one (see native_solve).
        self.native = native
        # None: one step size for the whole batch (torchdiffeq's behaviour); n: the native solve steps
        # each chunk of n rows on its own (fewer NFE where samples differ in stiffness).
        self.native_chunk: int | None = None
        self._plan = None
        self._plan_key = None

    def __getstate__(self):
        # The packed plan is a cache of the parameters (and not picklable): deepcopy/torch.save drop it.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_plan"] = None
        state["_plan_key"] = None
        return state

    @classmethod
    def from_odenet(cls, net: ODEnet, backend: str = "auto", block=None, fused: bool | str = True) -> "SparseODEnet":
        """Convert a (masked) ``ODEnet``: block-aligned masked layers become block-sparse.

        ``block`` (an int or a pair): the block the masks were built with; by default recovered from
        each mask (``plan.infer_block``). ``backend``/``fused``: see the class docstring.
        """
        if not isinstance(net, ODEnet):
            raise TypeError(f"expected a jsp_fast.cnf.ODEnet, got {type(net).__name__}")
        backend = registry.check_name(backend)
        fused = _check_fused(fused)
        block = None if block is None else as_block(block)
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
        layers = self.layers  # indexed, not sliced: a ModuleList slice builds a new module (per solve)
        return tuple(layers[i].out_features for i in range(len(layers) - 1))

    @property
    def field_shape(self) -> FieldShape:
        return FieldShape((self.dim, *self.hidden, self.layers[-1].out_features))

    @property
    def sparse_layers(self) -> dict[int, tuple[int, int]]:
        return {i: l.block for i, l in enumerate(self.layers) if isinstance(l, BlockSparseConcatSquash)}

    def extra_repr(self) -> str:
        dense = ", ".join(f"{i}: {r}" for i, r in self.dense_layers.items()) or "none"
        return (f"activation={self.activation!r}, backend={self.backend!r}, fused={self.fused!r}, "
                f"dense_layers={{{dense}}}")

    # -- execution -----------------------------------------------------------------------------------
    def fused_engine(self, z: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
        """The fused field that ``forward(t, z)`` / ``jvp(t, z, v)`` would run on these inputs now, or
        None when the per-layer ops run (a gradient is needed, ``fused=False``, or no fused field takes
        this device/dtype/width). The choice is ``registry.resolve``'s."""
        if self.fused is False:
            return None
        grad = torch.is_grad_enabled() and (z.requires_grad or (v is not None and v.requires_grad)
                                            or any(p.requires_grad for p in self.parameters()))
        forced = isinstance(self.fused, str)
        return registry.resolve(self.fused if forced else self.backend, z.device, z.dtype, field=self.field_shape,
                                grad=grad, strict=forced)

    def fused_plan(self, dtype: torch.dtype, engine: str = "cpu", device: torch.device | None = None):
        """The packing of ``engine``'s fused field for ``dtype`` (and ``device``), rebuilt when any
        parameter or buffer changed: a ``_C.FieldPlanF32/F64`` ("cpu"), a ``FusedFieldPlan`` ("triton") or
        a list of ``FusedLayer`` ("cuda")."""
        key = state_key(self, engine, dtype, device)
        if self._plan is None or self._plan_key != key:
            fused = registry.fused_field(engine)
            self._plan = None  # free the old packing before building the new one
            self._plan = fused.pack([layer.layer_spec() for layer in self.layers], self.activation, dtype, device)
            self._plan_key = key
        return self._plan

    def _fused(self, engine: str, t, z, v):
        return registry.fused_field(engine).run(self.fused_plan(z.dtype, engine, z.device), t, z, v)

    def native_solve(self, z0, logp0, t0, t1, *, trace, noise, solver, rtol, atol, options):
        """The whole solve in one native call, or None when it cannot run here (then the caller, CNF,
        integrates with torchdiffeq). It runs when the fused engine ``fused_engine(z0)`` chooses offers a
        native solver (the C++ field: ``backends/_cpu_solve``; the GPU fields: the device-resident loop of
        ``backends/_device_solve``) that takes ``solver`` and ``options``, and ``native`` is on;
        ``native_chunk`` (rows) makes it step each batch chunk independently.
        ``trace``: "exact", "hutchinson" (with the fixed ``noise``) or None (z only). Returns
        ``(z1, logp1 or None, nfe)``; a failed solve (a non-finite ``z0`` or ``noise`` included: the
        caller is expected to have checked them, as CNF does) raises ``SolverError``."""
        if not self.native:
            return None
        if self.native_chunk is not None:
            options = {**options, "chunk": self.native_chunk}
        engine = self.fused_engine(z0)
        if engine is None:
            return None
        fused = registry.fused_field(engine)
        if not hasattr(fused, "solve") or fused.solve_refusal(solver, options) is not None:
            return None
        return fused.solve(self.fused_plan(z0.dtype, engine, z0.device), z0, logp0, t0, t1,
                           trace=trace or "none", noise=noise, solver=solver, rtol=rtol, atol=atol, options=options)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if under_func_transform(z):  # inside a user field traced by torch.func (see under_func_transform)
            return self._dense_forward(t, z)
        engine = self.fused_engine(z)
        if engine is not None:
            return self._fused(engine, t, z, None)[0]
        h = z
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(t, h, self.activation if i < last else "none", self.backend)
        return h

    def _dense_forward(self, t, z):
        h = z
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            gate, shift = layer.gate_and_shift(t)
            h = _act.apply(self.activation if i < last else "none", F.linear(h, layer.dense_weight()) * gate + shift)
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
