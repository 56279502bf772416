"""Block-sparse backends: a name -> implementation registry.

Every backend implements the four primitives of ``docs/architecture.md`` on plain tensors. The
``jsp_fast::bsr_*`` custom ops (``_ops.py``) own autograd, fake tensors and argument checks, then call
the chosen backend with tensors that are already validated: contiguous, one floating dtype, one
device, the batch possibly empty (``B == 0``), no autograd recording (the ops run below autograd).

Registering a backend (the Triton and CUDA backends do this from their own modules)::

    from jsp_fast.sparse._backends import register_backend

    class MyImpl:
        # plan: jsp_fast.sparse._format.Plan(n, k, bm, bk, row_ptr, col_idx, block_row,
        #                                      col_ptr, row_idx, perm)   -- int64 tables
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

Selection: ``backend="auto"`` takes, among backends whose ``devices`` contain the tensor's device type,
whose ``dtypes`` (None = any) contain its dtype and which are available and support the plan, the one
with the highest ``priority`` ("torch" 0 < "cpu" 10; GPU backends should use 20+). The environment
variable ``JSP_FAST_BACKEND`` replaces ``"auto"`` by a fixed name. An unknown or unavailable name is a
``ValueError`` listing the available ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._ext import _C
from ..cnf._layers import activate as act_torch  # the dense field's activations are the reference
from ._format import Plan, blocks_to_dense

ENV_VAR = "JSP_FAST_BACKEND"
ACTIVATIONS = ("none", "tanh", "softplus", "elu", "relu", "sigmoid")
# Codes shared with csrc/cpu/simd.h (Act) and csrc/cpu/field.h.
ACT_CODES = {"none": 0, "tanh": 1, "softplus": 2, "elu": 3, "relu": 4, "sigmoid": 5}
PRIMITIVES = ("fwd", "jvp", "t_matmul", "weight_grad")


@dataclass(frozen=True)
class Backend:
    name: str
    impl: Any
    devices: tuple[str, ...]
    priority: int = 0
    dtypes: tuple[torch.dtype, ...] | None = None
    available: Callable[[], bool] | None = None
    supports: Callable[[Plan, torch.dtype, torch.device], bool] | None = field(default=None)

    def is_available(self) -> bool:
        try:
            return True if self.available is None else bool(self.available())
        except Exception:  # a probe that raises (missing driver...) means "not available"
            return False

    def accepts(self, plan: Plan | None, dtype: torch.dtype, device: torch.device) -> bool:
        if device.type not in self.devices:
            return False
        if self.dtypes is not None and dtype not in self.dtypes:
            return False
        if self.supports is not None and plan is not None and not self.supports(plan, dtype, device):
            return False
        return self.is_available()


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, impl: Any, devices=("cpu",), priority: int = 0, dtypes=None,
                     available: Callable[[], bool] | None = None, supports=None, replace: bool = False) -> None:
    """Add a backend (see the module docstring for ``impl``'s four methods)."""
    name = str(name).lower()
    if name == "auto":
        raise ValueError("'auto' is reserved")
    missing = [p for p in PRIMITIVES if not callable(getattr(impl, p, None))]
    if missing:
        raise TypeError(f"backend {name!r} lacks the primitives {missing}; it needs {PRIMITIVES}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to override)")
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    _REGISTRY[name] = Backend(name, impl, devices, int(priority), None if dtypes is None else tuple(dtypes),
                              available, supports)


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(str(name).lower(), None)


def available(device: str | torch.device | None = None) -> tuple[str, ...]:
    """Names of the registered, available backends (for ``device``'s type when given), fastest first."""
    dev = None if device is None else torch.device(device).type
    out = [b for b in _REGISTRY.values() if b.is_available() and (dev is None or dev in b.devices)]
    return tuple(b.name for b in sorted(out, key=lambda b: -b.priority))


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown block-sparse backend {name!r}; available: {available()}") from None


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype, plan: Plan | None = None) -> str:
    """The concrete backend name for one call (``"auto"`` and ``JSP_FAST_BACKEND`` resolved)."""
    name = "auto" if backend is None else str(backend).lower()
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            name = env
    if name == "auto":
        best = None  # (a plain loop rather than max(key=...): torch.compile traces this function)
        for b in _REGISTRY.values():
            if b.accepts(plan, dtype, device) and (best is None or b.priority > best.priority):
                best = b
        if best is None:
            raise ValueError(f"no block-sparse backend for {device.type} / {dtype}; registered: {tuple(_REGISTRY)}")
        return best.name
    b = get(name)
    if not b.is_available():
        raise ValueError(f"block-sparse backend {name!r} is not available here; available: {available()}")
    if not b.accepts(plan, dtype, device):
        raise ValueError(
            f"block-sparse backend {name!r} does not handle {device.type} tensors of dtype {dtype}"
            + (f" with blocks {plan.bm}x{plan.bk}" if plan is not None else "")
            + f" (it runs on {b.devices}, dtypes {b.dtypes or 'any'}); available for {device.type}: "
            f"{available(device)}"
        )
    return name


# ---- activations on tensors (torch reference) ------------------------------------------------------
def dact_from_y(act: str, y: torch.Tensor) -> torch.Tensor:
    """act'(pre) written in terms of y = act(pre) only, with differentiable ops.

    Every supported activation allows it (softplus: σ(pre) = 1 - e^{-y}), so the forward saves y and
    nothing else, and the derivative stays differentiable for double backward.
    """
    if act == "tanh":
        return 1.0 - y * y
    if act == "sigmoid":
        return y * (1.0 - y)
    if act == "softplus":
        return -torch.expm1(-y)
    if act == "elu":
        return torch.where(y > 0, torch.ones_like(y), y + 1.0)
    if act == "relu":
        return (y > 0).to(y.dtype)
    return torch.ones_like(y)


def ddact_dy(act: str, y: torch.Tensor) -> torch.Tensor | None:
    """d(act'(pre))/dy with act' as in dact_from_y (None when it is zero)."""
    if act == "tanh":
        return -2.0 * y
    if act == "sigmoid":
        return 1.0 - 2.0 * y
    if act == "softplus":
        return torch.exp(-y)
    if act == "elu":
        return (y <= 0).to(y.dtype)
    return None


# ---- the torch reference backend -------------------------------------------------------------------
class TorchBackend:
    """Pure torch, any device and floating dtype: densifies the weight (zeros outside kept blocks).

    The reference the compiled backends are tested against; O(n·k) per call, not fast.
    """

    @staticmethod
    def _dense(values: torch.Tensor, plan: Plan) -> torch.Tensor:
        return blocks_to_dense(values, plan.block_row, plan.col_idx, (plan.n, plan.k))

    @staticmethod
    def _epilogue(u, scale, bias):
        if scale is not None:
            u = u * scale
        if bias is not None:
            u = u + bias
        return u

    def fwd(self, x, values, plan, scale, bias, act):
        pre = self._epilogue(F.linear(x, self._dense(values, plan)), scale, bias)
        return act_torch(act, pre).contiguous()

    def jvp(self, x, x_dot, values, plan, scale, bias, act):
        w = self._dense(values, plan)
        pre = self._epilogue(F.linear(x, w), scale, bias)
        y = act_torch(act, pre)
        ud = F.linear(x_dot, w)
        if scale is not None:
            ud = ud * scale
        return y.contiguous(), (dact_from_y(act, y) * ud).contiguous()

    def t_matmul(self, g, values, plan):
        return (g @ self._dense(values, plan)).contiguous()

    def weight_grad(self, g, x, plan):
        bm, bk = plan.bm, plan.bk
        full = (g.t() @ x).reshape(plan.n // bm, bm, plan.k // bk, bk).permute(0, 2, 1, 3)
        return full[plan.block_row, plan.col_idx].contiguous()


# ---- the compiled CPU backend (csrc/cpu/bsr.cpp) ---------------------------------------------------
class CpuBackend:
    """jsp_fast._C kernels: fp32/fp64 on the CPU; tensors reach C++ as zero-copy NumPy views.

    Thread count follows ``torch.get_num_threads()`` so the kernels and torch agree.
    """

    @staticmethod
    def _tables(plan: Plan):
        return (plan.row_ptr.numpy(), plan.col_idx.numpy(), plan.block_row.numpy(), plan.col_ptr.numpy(),
                plan.row_idx.numpy(), plan.perm.numpy(), plan.n, plan.k)

    @staticmethod
    def _np(t):
        return None if t is None else t.detach().numpy()

    def fwd(self, x, values, plan, scale, bias, act):
        y = torch.empty(x.shape[0], plan.n, dtype=x.dtype)
        _C.bsr_fwd(values.detach().numpy(), *self._tables(plan), x.detach().numpy(), self._np(scale),
                   self._np(bias), ACT_CODES[act], y.numpy(), torch.get_num_threads())
        return y

    def jvp(self, x, x_dot, values, plan, scale, bias, act):
        y = torch.empty(x.shape[0], plan.n, dtype=x.dtype)
        y_dot = torch.empty(x_dot.shape[0], x.shape[0], plan.n, dtype=x.dtype)
        _C.bsr_jvp(values.detach().numpy(), *self._tables(plan), x.detach().numpy(), x_dot.detach().numpy(),
                   self._np(scale), self._np(bias), ACT_CODES[act], y.numpy(), y_dot.numpy(),
                   torch.get_num_threads())
        return y, y_dot

    def t_matmul(self, g, values, plan):
        gx = torch.empty(g.shape[0], plan.k, dtype=g.dtype)
        _C.bsr_t_matmul(values.detach().numpy(), *self._tables(plan), g.detach().numpy(), gx.numpy(),
                        torch.get_num_threads())
        return gx

    def weight_grad(self, g, x, plan):
        nnzb = plan.col_idx.shape[0]
        gv = torch.empty(nnzb, plan.bm, plan.bk, dtype=g.dtype)
        if nnzb:
            # values only tell the kernel the dtype and the block shape: gv has both.
            _C.bsr_weight_grad(gv.numpy(), *self._tables(plan), g.detach().numpy(), x.detach().numpy(),
                               gv.numpy(), torch.get_num_threads())
        return gv


register_backend("torch", TorchBackend(), devices=("cpu", "cuda", "mps", "xpu", "meta"), priority=0)
register_backend("cpu", CpuBackend(), devices=("cpu",), priority=10, dtypes=(torch.float32, torch.float64),
                 available=lambda: _C is not None and hasattr(_C, "bsr_fwd"))
