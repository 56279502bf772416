"""The ``"cpu"`` backend: the compiled C++/OpenMP kernels of ``jsp_fast._C`` (float32/float64).

Per-layer ops: ``csrc/cpu/bsr.cpp``; tensors reach C++ as zero-copy NumPy views. Fused field:
``csrc/cpu/field.cpp`` evaluates every layer, the time gate, the value and T tangents in one call
(``_C.FieldPlanF32/F64``, packed from the layers' dense weights and masks; the C++ side builds its
own tables). Thread count follows ``torch.get_num_threads()`` so the kernels and torch agree.
"""
from __future__ import annotations

import torch

from ... import _act
from ..._ext import _C
from ...cnf import SolverError
from ..plan import Plan
from ..registry import FieldShape, LayerSpec, register_backend
from .torch_ref import bwd_epilogue_reference

__all__ = ["CpuBackend", "CpuField"]

_DTYPES = (torch.float32, torch.float64)


def _np(t):
    return None if t is None else t.detach().numpy()


class CpuBackend:
    """The four primitives on ``_C.bsr_*``, and the backward's elementwise pass (``bwd_epilogue``)."""

    @staticmethod
    def _tables(plan: Plan):
        return (plan.row_ptr.numpy(), plan.col_idx.numpy(), plan.block_row.numpy(), plan.col_ptr.numpy(),
                plan.row_idx.numpy(), plan.perm.numpy(), plan.n, plan.k)

    def fwd(self, x, values, plan, scale, bias, act):
        y = torch.empty(x.shape[0], plan.n, dtype=x.dtype)
        _C.bsr_fwd(_np(values), *self._tables(plan), _np(x), _np(scale), _np(bias), _act.code(act), y.numpy(),
                   torch.get_num_threads())
        return y

    def jvp(self, x, x_dot, values, plan, scale, bias, act):
        return self._jvp(x, x_dot, values, plan, scale, bias, act, False)

    def jvp_ud(self, x, x_dot, values, plan, scale, bias, act):
        """``jvp`` that also returns ud = x_dot Wᵀ (the tangents before act' ⊙ scale) from the same pass."""
        return self._jvp(x, x_dot, values, plan, scale, bias, act, True)

    def _jvp(self, x, x_dot, values, plan, scale, bias, act, with_ud: bool):
        y = torch.empty(x.shape[0], plan.n, dtype=x.dtype)
        y_dot = torch.empty(x_dot.shape[0], x.shape[0], plan.n, dtype=x.dtype)
        ud = torch.empty_like(y_dot) if with_ud else None
        _C.bsr_jvp(_np(values), *self._tables(plan), _np(x), _np(x_dot), _np(scale), _np(bias), _act.code(act),
                   y.numpy(), y_dot.numpy(), torch.get_num_threads(), _np(ud))
        return (y, y_dot, ud) if with_ud else (y, y_dot)

    def t_matmul(self, g, values, plan):
        gx = torch.empty(g.shape[0], plan.k, dtype=g.dtype)
        _C.bsr_t_matmul(_np(values), *self._tables(plan), _np(g), gx.numpy(), torch.get_num_threads())
        return gx

    weight_grad_x2 = True  # weight_grad reads [x; x2] in place (see _ops._DirectPrims)

    def weight_grad(self, g, x, plan, x2=None):
        nnzb = plan.col_idx.shape[0]
        gv = torch.empty(nnzb, plan.bm, plan.bk, dtype=g.dtype)
        if nnzb:
            # values only tell the kernel the dtype and the block shape: gv has both.
            _C.bsr_weight_grad(gv.numpy(), *self._tables(plan), _np(g), _np(x), gv.numpy(), torch.get_num_threads(),
                               _np(x2))
        return gv

    def bwd_epilogue(self, gy, gyd, y, ud, scale, act, need_bias):
        if not hasattr(_C, "bsr_bwd_epilogue"):  # a _C built before the primitive existed
            return bwd_epilogue_reference(gy, gyd, y, ud, scale, act, need_bias)
        B, n = y.shape
        T = 0 if gyd is None else gyd.shape[0]
        G = torch.empty((1 + T) * B, n, dtype=y.dtype)
        gb = torch.empty(n, dtype=y.dtype) if need_bias else None
        # GU (G ⊙ scale) is not asked for: the ops fold scale into the blocks for t_matmul instead.
        _C.bsr_bwd_epilogue(_np(gy), _np(gyd), _np(y), _np(ud), _np(scale), _act.code(act), G.numpy(), None,
                            _np(gb), torch.get_num_threads())
        return G, gb


def _host(x: torch.Tensor, dtype: torch.dtype):
    return x.detach().to("cpu", dtype).reshape(x.shape).contiguous().numpy()


class CpuField:
    """The fused C++ field (``csrc/cpu/field.cpp``): any width, float32/float64, CPU tensors."""

    def check(self, field: FieldShape, dtype, device) -> str | None:
        if _C is None or not hasattr(_C, "FieldPlanF32"):
            return "jsp_fast._C has no fused field (FieldPlanF32)"
        return None

    def pack(self, layers: list[LayerSpec], activation: str, dtype, device):
        plan = (_C.FieldPlanF32 if dtype == torch.float32 else _C.FieldPlanF64)()
        last = len(layers) - 1
        for i, L in enumerate(layers):
            m = None if L.mask is None else L.mask.detach().to("cpu", torch.uint8).contiguous().numpy()
            plan.add_layer(_host(L.weight, dtype), m, _host(L.gate_w.reshape(-1), dtype),
                           _host(L.gate_b.reshape(-1), dtype), _host(L.shift_w.reshape(-1), dtype),
                           None if L.bias is None else _host(L.bias, dtype),
                           _act.code(activation if i < last else "none"))
        return plan

    def run(self, plan, t, z, v):
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

    # The whole solve in one native call (csrc/cpu/solve.cpp): torchdiffeq's dopri5 and fixed-grid
    # solvers step for step, around the packed field.
    def solve_refusal(self, solver: str, options: dict) -> str | None:
        from . import _cpu_solve  # noqa: PLC0415  (small; kept out of the import of every backend)

        if solver not in _cpu_solve.SOLVERS:
            return f"solver {solver!r} (native: {_cpu_solve.SOLVERS})"
        allowed = _cpu_solve._ADAPTIVE_OPTIONS if solver == "dopri5" else _cpu_solve._FIXED_OPTIONS
        extra = sorted(set(options) - set(allowed))
        return f"options {extra}" if extra else None

    def solve(self, plan, z0, logp0, t0, t1, *, trace, noise, solver, rtol, atol, options):
        from . import _cpu_solve  # noqa: PLC0415

        try:
            # The caller (CNF) checked z0 and drew the noise; a non-finite state stops the solver itself.
            return _cpu_solve.odeint_native(plan, z0, logp0, t0, t1, trace=trace, noise=noise, solver=solver,
                                            rtol=rtol, atol=atol, options=options, check_finite=False)
        except _C.SolveError as exc:  # one public type for a failed solve, native or torchdiffeq
            raise SolverError(str(exc)) from exc


register_backend("cpu", CpuBackend(), devices=("cpu",), priority=10, dtypes=_DTYPES,
                 available=lambda: _C is not None and hasattr(_C, "bsr_fwd"), fused=CpuField())
