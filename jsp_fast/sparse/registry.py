"""Block-sparse backends: a name -> implementation registry and ``resolve``, the one chooser.

A backend offers the four primitives of ``docs/architecture.md`` on plain tensors, and optionally a
*fused field* (a whole concatsquash field, value and tangents, in one call). ``resolve`` picks, from
the device, the dtype, the field's widths, whether a gradient is needed and the ``JSP_FAST_BACKEND``
override, both the backend of a per-layer op and the fused engine of a field; nothing else chooses.

The ``jsp_fast::bsr_*`` custom ops (``_ops.py``) own autograd, fake tensors and argument checks, then
call the chosen backend with tensors that are already validated: contiguous, one floating dtype, one
device, the batch possibly empty (``B == 0``), no autograd recording (the ops run below autograd).

Registering a backend (``jsp_fast/sparse/backends/*.py`` do this for the built-in ones)::

    from jsp_fast.sparse.registry import register_backend

    class MyImpl:
        # plan: jsp_fast.sparse.plan.Plan(n, k, bm, bk, row_ptr, col_idx, block_row,
        #                                   col_ptr, row_idx, perm)   -- int64 tables
        # act:  one of "none", "tanh", "softplus", "elu", "relu", "sigmoid"
        def fwd(self, x, values, plan, scale, bias, act): ...            # [B,k] -> y [B,n]
        def jvp(self, x, x_dot, values, plan, scale, bias, act): ...     # x_dot [T,B,k] -> (y, y_dot [T,B,n])
        def t_matmul(self, g, values, plan): ...                         # g [B,n] -> g W  [B,k]
        def weight_grad(self, g, x, plan): ...                           # -> gᵀx on kept blocks [nnzb,bm,bk]

    register_backend("mine", MyImpl(), devices=("cuda",), priority=20,
                     dtypes=(torch.float16, torch.float32), available=lambda: True,
                     supports=lambda plan, dtype, device: plan.bm >= 16)

``values`` is ``[nnzb, bm, bk]`` (blocks row-major, CSR order); ``scale``/``bias`` are ``[n]`` or
None. Outputs must be new tensors (never views of inputs) with the inputs' dtype and device; the ops
check their shapes. ``supports`` (optional) may refuse a particular plan/dtype/device; ``available``
(optional) is asked at selection time (e.g. "a GPU is present").

A fused field (``fused=``) is an object with three methods (see ``backends/cpu.py`` for one)::

    def check(self, field: FieldShape, dtype, device) -> str | None   # None, or why it cannot run
    def pack(self, layers: list[LayerSpec], activation, dtype, device) # -> a packing, cached by the field
    def run(self, packed, t, z, v) -> (f, jv or None)                  # inference only, no autograd

A fused field may also solve a whole ODE natively (the C++ one does): two optional methods,

    def solve_refusal(self, solver, options) -> str | None            # None, or what it cannot do
    def solve(self, packed, z0, logp0, t0, t1, *, trace, noise, solver, rtol, atol, options)
        # -> (z1, logp1 or None, nfe); CNF inference takes it when the field's engine offers it

A backend may offer only a fused field (``impl=None``, as "cuda" does): it then serves no per-layer op.

Selection: ``"auto"`` takes, among the backends whose ``devices`` contain the tensor's device type,
whose ``dtypes`` (None = any) contain its dtype, which are available and support the plan (or, for a
field, whose fused field accepts it), the one with the highest ``priority`` ("torch" 0 < "cpu" 10 <
"triton" 20 < "cuda" 30). A negative priority (the Triton interpreter on the CPU) is never chosen by
``"auto"``, only by name. ``JSP_FAST_BACKEND`` replaces ``"auto"`` by a fixed name. An unknown or
unavailable name is a ``ValueError`` listing the available ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from .plan import Plan

__all__ = ["ENV_VAR", "PRIMITIVES", "Backend", "FieldShape", "LayerSpec", "register_backend",
           "unregister_backend", "available", "get", "resolve", "check_name", "fused_field", "layer_specs"]

ENV_VAR = "JSP_FAST_BACKEND"
PRIMITIVES = ("fwd", "jvp", "t_matmul", "weight_grad")
_FUSED_METHODS = ("check", "pack", "run")


class FieldShape(NamedTuple):
    """What a fused field needs to know to accept a field: its layer widths ``(dim, *hidden, dim)``."""

    widths: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    @property
    def max_width(self) -> int:
        return max(self.widths)


class LayerSpec(NamedTuple):
    """One concatsquash layer as the fused fields read it (all detached, on the field's device).

    ``weight`` the dense ``[n, k]`` weight with zeros outside kept entries; ``mask`` bool or None (no
    mask: every entry kept); ``block`` the layer's block when it is block-sparse, else None; the
    per-output ``gate_w``, ``gate_b``, ``shift_w`` (``[n]``) and ``bias`` (``[n]`` or None):
    ``scale = sigmoid(gate_w t + gate_b)``, ``shift = bias * scale + shift_w t``.
    """

    weight: torch.Tensor
    mask: torch.Tensor | None
    block: tuple[int, int] | None
    gate_w: torch.Tensor
    gate_b: torch.Tensor
    shift_w: torch.Tensor
    bias: torch.Tensor | None


def layer_specs(net) -> list[LayerSpec]:
    """The :class:`LayerSpec` of every layer of a concatsquash field: a ``SparseODEnet`` (its layers'
    ``layer_spec()``) or a masked dense ``jsp_fast.cnf.ODEnet``."""
    out = []
    for layer in net.layers:
        if hasattr(layer, "layer_spec"):
            out.append(layer.layer_spec())
        else:  # jsp_fast.cnf.ConcatSquashLinear
            out.append(LayerSpec(layer.effective_weight().detach(), layer.mask, None, layer.hyper_gate.weight,
                                 layer.hyper_gate.bias, layer.hyper_bias.weight, layer.linear.bias))
    return out


@dataclass(frozen=True)
class Backend:
    name: str
    impl: Any
    devices: tuple[str, ...]
    priority: int = 0
    dtypes: tuple[torch.dtype, ...] | None = None
    available: Callable[[], bool] | None = None
    supports: Callable[[Plan, torch.dtype, torch.device], bool] | None = None
    fused: Any = None

    def is_available(self) -> bool:
        try:
            return True if self.available is None else bool(self.available())
        except Exception:  # a probe that raises (missing driver...) means "not available"
            return False

    def _why_not(self, dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type not in self.devices:
            return f"it runs on {self.devices}, not {device.type}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"it takes dtypes {self.dtypes}, not {dtype}"
        if not self.is_available():
            return "it is not available here"
        return None

    def op_refusal(self, plan: Plan | None, dtype: torch.dtype, device: torch.device) -> str | None:
        """None when this backend's per-layer ops take these tensors, else the reason."""
        if self.impl is None:
            return "it offers only a fused field, no per-layer ops"
        why = self._why_not(dtype, device)
        if why is None and self.supports is not None and plan is not None and not self.supports(plan, dtype, device):
            why = f"it does not support blocks {plan.bm}x{plan.bk} with {dtype} on {device.type}"
        return why

    def field_refusal(self, field: FieldShape, dtype: torch.dtype, device: torch.device) -> str | None:
        """None when this backend's fused field takes this field and these tensors, else the reason."""
        if self.fused is None:
            return "it has no fused field"
        return self._why_not(dtype, device) or self.fused.check(field, dtype, device)


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, impl: Any, devices=("cpu",), priority: int = 0, dtypes=None,
                     available: Callable[[], bool] | None = None, supports=None, replace: bool = False,
                     fused: Any = None) -> None:
    """Add a backend (see the module docstring for ``impl``'s four methods and ``fused``)."""
    name = str(name).lower()
    if name == "auto":
        raise ValueError("'auto' is reserved")
    if impl is None and fused is None:
        raise TypeError(f"backend {name!r} needs the primitives {PRIMITIVES} (impl) or a fused field (fused)")
    if impl is not None:
        missing = [p for p in PRIMITIVES if not callable(getattr(impl, p, None))]
        if missing:
            raise TypeError(f"backend {name!r} lacks the primitives {missing}; it needs {PRIMITIVES}")
    if fused is not None:
        missing = [p for p in _FUSED_METHODS if not callable(getattr(fused, p, None))]
        if missing:
            raise TypeError(f"backend {name!r}: the fused field lacks {missing}; it needs {_FUSED_METHODS}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to override)")
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    _REGISTRY[name] = Backend(name, impl, devices, int(priority), None if dtypes is None else tuple(dtypes),
                              available, supports, fused)


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(str(name).lower(), None)


def available(device: str | torch.device | None = None, *, fused: bool = False) -> tuple[str, ...]:
    """Names of the registered, available backends with per-layer ops (with ``fused=True``: with a fused
    field), for ``device``'s type when given, highest priority first."""
    dev = None if device is None else torch.device(device).type
    out = [b for b in _REGISTRY.values()
           if (b.fused if fused else b.impl) is not None and b.is_available() and (dev is None or dev in b.devices)]
    return tuple(b.name for b in sorted(out, key=lambda b: -b.priority))


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown block-sparse backend {name!r}; available: {available()}"
                         + (f", fused fields: {available(fused=True)}" if available(fused=True) else "")) from None


def fused_field(name: str):
    """The fused field of backend ``name`` (the object with ``check``/``pack``/``run``), or a ValueError."""
    b = _REGISTRY.get(str(name).lower())
    if b is None or b.fused is None:
        raise ValueError(f"unknown fused engine {name!r}; expected one of {available(fused=True)}")
    return b.fused


def _requested(backend: str | None) -> str:
    name = "auto" if backend is None else str(backend).lower()
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            name = env
    return name


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype, plan: Plan | None = None, *,
            field: FieldShape | None = None, grad: bool = False, strict: bool = False) -> str | None:
    """The concrete backend for one call: ``"auto"`` and ``JSP_FAST_BACKEND`` resolved.

    Without ``field``: the backend whose per-layer ops run ``plan`` on ``device``/``dtype`` (a name;
    a ValueError when the named one cannot).

    With ``field``: the fused engine that evaluates the whole field, or None when the per-layer ops
    must run: always None when a gradient is needed (``grad``; fused fields have no autograd); under
    ``"auto"`` the best fused field that accepts the field; for a name, that backend's fused field, or
    None when it has none or refuses these inputs -- unless ``strict`` (an engine the caller forced),
    where that is a ValueError saying why.
    """
    device = torch.device(device)
    name = _requested(backend)
    if field is None:
        return _resolve_ops(name, device, dtype, plan)
    if grad:
        return None
    if name == "auto":
        best = None
        for b in _REGISTRY.values():
            if b.priority >= 0 and b.field_refusal(field, dtype, device) is None and (
                    best is None or b.priority > best.priority):
                best = b
        return None if best is None else best.name
    why = get(name).field_refusal(field, dtype, device)
    if why is None:
        return name
    if strict:
        raise ValueError(f"the fused field {name!r} cannot run this field (widths {field.widths}, {dtype} on "
                         f"{device.type}): {why}; fused fields available: {available(device, fused=True)}")
    return None


def _resolve_ops(name: str, device: torch.device, dtype: torch.dtype, plan: Plan | None) -> str:
    if name == "auto":
        best = None  # (a plain loop rather than max(key=...): torch.compile traces this function)
        for b in _REGISTRY.values():
            if b.priority >= 0 and b.op_refusal(plan, dtype, device) is None and (
                    best is None or b.priority > best.priority):
                best = b
        if best is None:
            raise ValueError(f"no block-sparse backend for {device.type} / {dtype}; registered: {tuple(_REGISTRY)}")
        return best.name
    b = get(name)
    if not b.is_available():
        raise ValueError(f"block-sparse backend {name!r} is not available here; available: {available()}")
    why = b.op_refusal(plan, dtype, device)
    if why is not None:
        raise ValueError(f"block-sparse backend {name!r} does not handle {device.type} tensors of dtype {dtype}"
                         + (f" with blocks {plan.bm}x{plan.bk}" if plan is not None else "")
                         + f": {why}; available for {device.type}: {available(device)}")
    return name


def check_name(backend: str | None, *, fused: bool = False) -> str:
    """``backend`` lower-cased if it is "auto" or a registered, available backend (with a fused field when
    ``fused``), else a ValueError listing the choices. Used where a name is stored for later calls."""
    name = "auto" if backend is None else str(backend).lower()
    if name == "auto" and not fused:
        return name
    names = available(fused=fused)
    if name not in names:
        if fused:
            raise ValueError(f"unknown or unavailable fused field {backend!r}; expected one of {names}")
        raise ValueError(f"unknown or unavailable block-sparse backend {backend!r}; expected 'auto' or one of {names}")
    return name
