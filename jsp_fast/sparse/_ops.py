"""``jf.ops.bsr_linear`` / ``bsr_linear_jvp``: torch.library custom ops with fake kernels and autograd.

Four ops in the ``jsp_fast`` namespace, one per primitive, each taking the weight as its values plus
the six look-up tables (so ``torch.compile``/``opcheck`` see plain tensors) and the backend's name:

    jsp_fast::bsr_fwd(x, values, *tables, scale?, bias?, act, backend)            -> y
    jsp_fast::bsr_jvp(x, x_dot, values, *tables, scale?, bias?, act, backend)     -> (y, y_dot)
    jsp_fast::bsr_t_matmul(g, values, *tables, backend)                           -> g W
    jsp_fast::bsr_weight_grad(g, x, values_like, *tables, backend)                -> gᵀx on kept blocks

and one for the elementwise part of their backward (no weight involved):

    jsp_fast::bsr_bwd_epilogue(gy?, gyd?, y, ud?, scale?, act, need_bias, backend) -> (G, gbias)

``G = [gpre; gdu]`` stacks the gradients w.r.t. ``scale ⊙ u`` and ``scale ⊙ ud[t]`` (u = x Wᵀ, ud[t] =
x_dot[t] Wᵀ), ``gbias = Σ_b gpre`` (formulas: ``backends/torch_ref.py`` ``bwd_epilogue_reference``). On
the CPU it is one native pass instead of ~4-8 torch elementwise passes per layer; stacking lets one
``t_matmul`` and one ``weight_grad`` serve the value and every tangent. ``scale`` is folded into the
kept blocks for ``t_matmul`` (``(G ⊙ scale) W = G (scale ⊙ W)``: O(weights) instead of another [B, n] pass).

Autograd: every backward is written with these same ops plus differentiable torch ops, so it is
itself differentiable (double backward, needed because CNF training differentiates through the
trace). The products are bilinear: d(g W)/dg = fwd, d(g W)/dW = weight_grad, d(gᵀx)/dg = fwd,
d(gᵀx)/dx = t_matmul; the epilogue op's backward is written out in torch ops (``_epi_backward``). The
activation's derivative is taken from the saved output y (see
``dact_from_y``), so nothing but y is kept from the forward. The product ``x Wᵀ`` needed for the
gradient of ``scale`` is not recomputed: that gradient is read off the kept-block product gᵀx that
the weight gradient needs anyway (``_weight_and_scale_grads``).

NaN policy: no check is made (it would cost a pass over the data). NaN/Inf in x, the weights, scale or
bias propagate into the outputs they reach, as in the dense computation; one difference is that a
non-finite x[b, j] may reach fewer outputs of row b than in the dense reference, because pruned
blocks are skipped rather than multiplied by zero (0 · Inf = NaN in the dense product).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import _act
from . import registry
from .plan import BlockSparseWeight, Plan

__all__ = ["bsr_linear", "bsr_linear_jvp", "bsr_fwd", "bsr_jvp", "bsr_t_matmul", "bsr_weight_grad",
           "bsr_bwd_epilogue"]


def _plan(values: Tensor, tables) -> Plan:
    row_ptr, col_idx, block_row, col_ptr, row_idx, perm = tables
    bm, bk = int(values.shape[1]), int(values.shape[2])
    return Plan((row_ptr.shape[0] - 1) * bm, (col_ptr.shape[0] - 1) * bk, bm, bk,
                row_ptr, col_idx, block_row, col_ptr, row_idx, perm)


def _impl(backend: str):
    impl = registry.get(backend).impl
    if impl is None:  # only reachable by calling the raw op with a fused-only backend's name
        raise ValueError(f"block-sparse backend {backend!r} offers no per-layer ops")
    return impl


def _c(t):
    # Backends get contiguous tensors; gradients arriving in backward often are not (expand, sum).
    return None if t is None else t.contiguous()


# ---- the ops --------------------------------------------------------------------------------------
@torch.library.custom_op("jsp_fast::bsr_fwd", mutates_args=())
def bsr_fwd(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor, col_ptr: Tensor,
            row_idx: Tensor, perm: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], act: str,
            backend: str) -> Tensor:
    tables = (row_ptr, col_idx, block_row, col_ptr, row_idx, perm)
    return _impl(backend).fwd(_c(x), _c(values), _plan(values, tables), _c(scale), _c(bias), act)


@bsr_fwd.register_fake
def _(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, perm, scale, bias, act, backend):
    return x.new_empty(x.shape[0], (row_ptr.shape[0] - 1) * values.shape[1])


@torch.library.custom_op("jsp_fast::bsr_jvp", mutates_args=())
def bsr_jvp(x: Tensor, x_dot: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor,
            col_ptr: Tensor, row_idx: Tensor, perm: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
            act: str, backend: str) -> tuple[Tensor, Tensor]:
    tables = (row_ptr, col_idx, block_row, col_ptr, row_idx, perm)
    return _impl(backend).jvp(_c(x), _c(x_dot), _c(values), _plan(values, tables), _c(scale), _c(bias), act)


@bsr_jvp.register_fake
def _(x, x_dot, values, row_ptr, col_idx, block_row, col_ptr, row_idx, perm, scale, bias, act, backend):
    n = (row_ptr.shape[0] - 1) * values.shape[1]
    return x.new_empty(x.shape[0], n), x.new_empty(x_dot.shape[0], x.shape[0], n)


@torch.library.custom_op("jsp_fast::bsr_t_matmul", mutates_args=())
def bsr_t_matmul(g: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor, col_ptr: Tensor,
                 row_idx: Tensor, perm: Tensor, backend: str) -> Tensor:
    tables = (row_ptr, col_idx, block_row, col_ptr, row_idx, perm)
    return _impl(backend).t_matmul(_c(g), _c(values), _plan(values, tables))


@bsr_t_matmul.register_fake
def _(g, values, row_ptr, col_idx, block_row, col_ptr, row_idx, perm, backend):
    return g.new_empty(g.shape[0], (col_ptr.shape[0] - 1) * values.shape[2])


# `values_like` only carries the block shape (and dtype): the gradient does not depend on the values.
@torch.library.custom_op("jsp_fast::bsr_weight_grad", mutates_args=())
def bsr_weight_grad(g: Tensor, x: Tensor, values_like: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor,
                    col_ptr: Tensor, row_idx: Tensor, perm: Tensor, backend: str) -> Tensor:
    tables = (row_ptr, col_idx, block_row, col_ptr, row_idx, perm)
    return _impl(backend).weight_grad(_c(g), _c(x), _plan(values_like, tables))


@bsr_weight_grad.register_fake
def _(g, x, values_like, row_ptr, col_idx, block_row, col_ptr, row_idx, perm, backend):
    return g.new_empty(values_like.shape)


# The elementwise pass of the backward. A backend without it (a user's) gets the torch reference.
def _epilogue_impl(backend: str):
    impl = _impl(backend)
    if hasattr(impl, "bwd_epilogue"):
        return impl.bwd_epilogue
    return registry.get("torch").impl.bwd_epilogue


@torch.library.custom_op("jsp_fast::bsr_bwd_epilogue", mutates_args=())
def bsr_bwd_epilogue(gy: Optional[Tensor], gyd: Optional[Tensor], y: Tensor, ud: Optional[Tensor],
                     scale: Optional[Tensor], act: str, need_bias: bool, backend: str) -> tuple[Tensor, Tensor]:
    G, gb = _epilogue_impl(backend)(_c(gy), _c(gyd), _c(y), _c(ud), _c(scale), act, need_bias)
    # Custom ops return tensors only: an absent gbias is an empty tensor.
    return G, (gb if gb is not None else y.new_empty(0))


@bsr_bwd_epilogue.register_fake
def _(gy, gyd, y, ud, scale, act, need_bias, backend):
    rows = y.shape[0] * (1 + (0 if gyd is None else gyd.shape[0]))
    return y.new_empty(rows, y.shape[1]), (y.new_empty(y.shape[1]) if need_bias else y.new_empty(0))


# ---- autograd -------------------------------------------------------------------------------------
# Activations whose act' depends on y (d act'/dy not identically zero): the jvp backward needs ud.
_HAS_SECOND = ("tanh", "softplus", "elu", "sigmoid")


def _dddact_dy(act: str, y: Tensor) -> Tensor | None:
    """d²act'/dy² with act' as in ``_act.dact_from_y`` (None where zero): the epilogue's backward."""
    if act in ("tanh", "sigmoid"):
        return torch.full_like(y, -2.0)
    if act == "softplus":
        return -torch.exp(-y)
    return None


class _OpPrims:
    """The primitives a backward is written in, as the custom ops: differentiable, so a backward written
    in them can itself be differentiated (double backward, ``create_graph=True``)."""

    def __init__(self, tables, backend: str):
        self.tables, self.backend, self.block_row = tables, backend, tables[2]

    def u(self, x, values):
        """x Wᵀ without epilogue."""
        return bsr_fwd(x, values, *self.tables, None, None, "none", self.backend)

    def epilogue(self, gy, gyd, y, ud, scale, act, need_bias):
        G, gb = bsr_bwd_epilogue(_c(gy), _c(gyd), y, _c(ud), scale, act, need_bias, self.backend)
        return G, (gb if need_bias else None)

    def t_matmul(self, g, values):
        return bsr_t_matmul(g, values, *self.tables, self.backend)

    def weight_grad(self, g, x, values, x2=None):
        """The kept-block product gᵀ[x; x2]."""
        return bsr_weight_grad(g, x if x2 is None else torch.cat([x, x2]), values, *self.tables, self.backend)


class _DirectPrims:
    """The same primitives as the backend's functions called directly: no op dispatch and no autograd
    (~12 us per call less, measured on the CPU), so only for a first-order backward. A backend may
    offer ``weight_grad(..., x2=)`` (``weight_grad_x2 = True``: no copy of [x; x2])."""

    def __init__(self, plan: Plan, backend: str):
        self.plan, self.block_row = plan, plan.block_row
        self.impl, self.epi = _impl(backend), _epilogue_impl(backend)

    def u(self, x, values):
        return self.impl.fwd(_c(x), values, self.plan, None, None, "none")

    def epilogue(self, gy, gyd, y, ud, scale, act, need_bias):
        return self.epi(_c(gy), _c(gyd), y, _c(ud), scale, act, need_bias)

    def t_matmul(self, g, values):
        return self.impl.t_matmul(_c(g), _c(values), self.plan)

    def weight_grad(self, g, x, values, x2=None):
        if x2 is None:
            return self.impl.weight_grad(_c(g), _c(x), self.plan)
        if getattr(self.impl, "weight_grad_x2", False):
            return self.impl.weight_grad(_c(g), _c(x), self.plan, x2=_c(x2))
        return self.impl.weight_grad(_c(g), torch.cat([x, x2]), self.plan)


def _scaled(values, scale, block_row):
    """The kept blocks with their rows scaled, ``scale ⊙ W`` (differentiable): ``t_matmul`` of them is
    ``(g ⊙ scale) W``."""
    if scale is None:
        return values
    return values * scale.reshape(-1, values.shape[1])[block_row].unsqueeze(2)


def _epi_setup(ctx, inputs, output):
    gy, gyd, y, ud, scale, act, need_bias, _backend = inputs
    ctx.act, ctx.need_bias = act, need_bias
    ctx.T = 0 if gyd is None else gyd.shape[0]
    ctx.save_for_backward(gy, gyd, y, ud, scale, output[0])


def _epi_backward(ctx, aG, agb):
    # The chain rule through the formulas of bwd_epilogue_reference, in differentiable torch ops.
    gy, gyd, y, ud, s, G = ctx.saved_tensors
    need = ctx.needs_input_grad
    act, T = ctx.act, ctx.T
    Bn, n = y.shape
    d = _act.dact_from_y(act, y)
    dd = _act.ddact_dy(act, y)
    A = torch.zeros_like(G) if aG is None else aG
    g_s = None
    Ap = A[:Bn]
    if ctx.need_bias and agb is not None and agb.numel():
        Ap = Ap + agb
    second = T > 0 and dd is not None and ud is not None
    q = gy if gy is not None else torch.zeros_like(y)
    if second:
        S = (gyd * ud).sum(0)
        q = q + dd * (S if s is None else S * s)
    g_q = Ap * d  # = the gradient of gy
    g_d = Ap * q
    g_gyd = g_ud = None
    if T > 0:
        Ad = A[Bn:].reshape(T, Bn, n)
        g_d = g_d + (Ad * gyd).sum(0)
        g_gyd = Ad * d
    g_y = None
    if dd is not None:
        g_y = g_d * dd
    if second:
        g_S = g_q * dd if s is None else g_q * dd * s
        g_gyd = g_gyd + g_S * ud
        g_ud = g_S * gyd
        if s is not None and need[4]:
            gs2 = (g_q * dd * S).sum(0)
            g_s = gs2 if g_s is None else g_s + gs2
        ddd = _dddact_dy(act, y)
        if ddd is not None:
            g_dd = g_q * (S if s is None else S * s)
            g_y = g_y + g_dd * ddd
    return (g_q if gy is not None and need[0] else None, g_gyd if need[1] else None,
            g_y if need[2] else None, g_ud if need[3] else None, g_s, None, None, None)


bsr_bwd_epilogue.register_autograd(_epi_backward, setup_context=_epi_setup)


def _fwd_setup(ctx, inputs, output):
    x, values, *rest = inputs
    tables, (scale, bias, act, backend) = tuple(rest[:6]), rest[6:]
    ctx.act, ctx.backend = act, backend
    ctx.has_scale, ctx.has_bias = scale is not None, bias is not None
    ctx.save_for_backward(x, values, scale, output, *tables)


def _weight_and_scale_grads(P, g, x, x2, values, scale, need_v, need_s):
    """Gradients of the weight values and of scale from one kept-block product Q = gᵀ[x; x2].

    ``g`` is the gradient w.r.t. ``scale ⊙ ([x; x2] Wᵀ)``. Then grad(values) = scale[rows] ⊙ Q and
    grad(scale)[n] = Σ_b g[b,n] (xs Wᵀ)[b,n] = Σ_kept-k W[n,k] Q[n,k]: O(weights) work instead of
    recomputing the O(batch · weights) product x Wᵀ. Differentiable (double backward) with ``_OpPrims``.
    """
    if not (need_v or (need_s and scale is not None)):
        return None, None
    Q = P.weight_grad(g, x, values, x2)
    if scale is None:
        return Q, None
    block_row, bm = P.block_row, values.shape[1]
    gv = Q * scale.reshape(-1, bm)[block_row].unsqueeze(2) if need_v else None
    gs = None
    if need_s:
        per = (values * Q).sum(2)  # [nnzb, bm]
        gs = per.new_zeros(scale.shape[0] // bm, bm).index_add(0, block_row, per).reshape(-1)
    return gv, gs


def _fwd_grads(P, x, values, scale, y, act, need, gy):
    """Gradients ``(x, values, scale, bias)`` of ``bsr_fwd`` (``need``: which are wanted)."""
    need_x, need_v, need_s, need_b = need
    if gy is None:
        return (None,) * 4
    if act == "none":
        gpre = gy
        gbias = gy.sum(0) if need_b else None
    else:
        gpre, gbias = P.epilogue(gy, None, y, None, scale, act, need_b)
    gx = P.t_matmul(gpre, _scaled(values, scale, P.block_row)) if need_x else None
    gv, gscale = _weight_and_scale_grads(P, gpre, x, None, values, scale, need_v, need_s)
    return gx, gv, gscale, gbias


def _fwd_backward(ctx, gy):
    x, values, scale, y, *tables = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gv, gs, gb = _fwd_grads(_OpPrims(tables, ctx.backend), x, values, scale, y, ctx.act,
                                (need[0], need[1], ctx.has_scale and need[8], ctx.has_bias and need[9]), gy)
    return (gx, gv) + (None,) * 6 + (gs, gb, None, None)


bsr_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _jvp_grads(P, x, x_dot, values, scale, y, ud, act, need, gy, gyd):
    """Gradients ``(x, x_dot, values, scale, bias)`` of ``bsr_jvp`` (``need``: which are wanted).

    y = act(pre), pre = s ⊙ u + b, u = x Wᵀ;  y_dot[t] = d(y) ⊙ s ⊙ ud[t], ud[t] = x_dot[t] Wᵀ. The epilogue
    stacks the gradients w.r.t. s ⊙ u and every s ⊙ ud[t] into G, so one t_matmul (over the row-scaled
    blocks) gives both input gradients and one weight_grad the weight's. ``ud``: saved by the forward,
    or None (recomputed here when the activation needs it).
    """
    need_x, need_xd, need_v, need_s, need_b = need
    T, Bn, K = x_dot.shape
    if gy is None and gyd is None:
        return (None,) * 5
    if gyd is not None and act in _HAS_SECOND and ud is None:  # y_dot depends on y through d(y)
        ud = P.u(x_dot.reshape(T * Bn, K), values).reshape(T, Bn, y.shape[1])
    G, gbias = P.epilogue(gy, gyd, y, ud, scale, act, need_b)
    tang = gyd is not None  # G has the T tangent blocks below the first Bn rows
    gx = gxd = None
    if need_x or (need_xd and tang):
        vs = _scaled(values, scale, P.block_row)
        if need_x and need_xd and tang:
            GX = P.t_matmul(G, vs)
            gx, gxd = GX[:Bn], GX[Bn:].reshape(T, Bn, K)
        elif need_x:
            gx = P.t_matmul(G[:Bn], vs)
        else:
            gxd = P.t_matmul(G[Bn:], vs).reshape(T, Bn, K)
    gv, gscale = _weight_and_scale_grads(P, G, x, x_dot.reshape(T * Bn, K) if tang else None, values, scale,
                                         need_v, need_s)
    return gx, gxd, gv, gscale, gbias


def _jvp_setup(ctx, inputs, output):
    x, x_dot, values, *rest = inputs
    tables, (scale, bias, act, backend) = tuple(rest[:6]), rest[6:]
    ctx.act, ctx.backend = act, backend
    ctx.has_scale, ctx.has_bias = scale is not None, bias is not None
    ctx.save_for_backward(x, x_dot, values, scale, output[0], *tables)


def _jvp_backward(ctx, gy, gyd):
    x, x_dot, values, scale, y, *tables = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gxd, gv, gs, gb = _jvp_grads(_OpPrims(tables, ctx.backend), x, x_dot, values, scale, y, None, ctx.act,
                                     (need[0], need[1], need[2], ctx.has_scale and need[9],
                                      ctx.has_bias and need[10]), gy, gyd)
    return (gx, gxd, gv) + (None,) * 6 + (gs, gb, None, None)


bsr_jvp.register_autograd(_jvp_backward, setup_context=_jvp_setup)


class _FwdTrain(torch.autograd.Function):
    """``bsr_fwd`` for training in eager mode, as ``_JvpTrain`` is for ``bsr_jvp``: the backend called
    directly, the backward over ``_DirectPrims`` (or the ops under ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, x, values, scale, bias, plan, tables, act, backend):
        y = _impl(backend).fwd(x, values, plan, scale, bias, act)
        ctx.save_for_backward(x, values, scale, y)
        ctx.plan, ctx.tables, ctx.act, ctx.backend = plan, tables, act, backend
        ctx.has_scale, ctx.has_bias = scale is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, values, scale, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        P = _OpPrims(ctx.tables, ctx.backend) if torch.is_grad_enabled() else _DirectPrims(ctx.plan, ctx.backend)
        grads = _fwd_grads(P, x, values, scale, y, ctx.act,
                           (need[0], need[1], ctx.has_scale and need[2], ctx.has_bias and need[3]), gy)
        return grads + (None,) * 4


class _JvpTrain(torch.autograd.Function):
    """``bsr_jvp`` for training in eager mode: the same math and the same backward formulas
    (``_jvp_grads``), without the op layer. The forward calls the backend directly and, where the
    backend can (``jvp_ud``), keeps ud = x_dot Wᵀ from the same pass (the backward of tanh/softplus/
    elu/sigmoid needs it: otherwise one more product); the backward calls the backend directly
    (``_DirectPrims``), or, when it must itself be differentiable (``create_graph=True``), the ops.
    Measured on the CPU training step (digits 512x3, 90%): see bench/RESULTS.md, "Training step".
    """

    @staticmethod
    def forward(ctx, x, x_dot, values, scale, bias, plan, tables, act, backend):
        impl = _impl(backend)
        ud = None
        if act in _HAS_SECOND and hasattr(impl, "jvp_ud"):
            y, yd, ud = impl.jvp_ud(x, x_dot, values, plan, scale, bias, act)
        else:
            y, yd = impl.jvp(x, x_dot, values, plan, scale, bias, act)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x_dot, values, scale, y, ud)
        ctx.plan, ctx.tables, ctx.act, ctx.backend = plan, tables, act, backend
        ctx.has_scale, ctx.has_bias = scale is not None, bias is not None
        return y, yd

    @staticmethod
    def backward(ctx, gy, gyd):
        x, x_dot, values, scale, y, ud = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: ud is recomputed so its dependence is differentiated
            P, ud = _OpPrims(ctx.tables, ctx.backend), None
        else:
            P = _DirectPrims(ctx.plan, ctx.backend)
        grads = _jvp_grads(P, x, x_dot, values, scale, y, ud, ctx.act,
                           (need[0], need[1], need[2], ctx.has_scale and need[3], ctx.has_bias and need[4]), gy, gyd)
        return grads + (None,) * 4


def _tm_setup(ctx, inputs, output):
    g, values, *rest = inputs
    ctx.backend = rest[6]
    ctx.save_for_backward(g, values, *rest[:6])


def _tm_backward(ctx, gout):
    g, values, *tables = ctx.saved_tensors
    need = ctx.needs_input_grad
    gg = _OpPrims(tables, ctx.backend).u(gout, values) if need[0] else None
    gv = bsr_weight_grad(g, gout, values, *tables, ctx.backend) if need[1] else None
    return (gg, gv) + (None,) * 7


bsr_t_matmul.register_autograd(_tm_backward, setup_context=_tm_setup)


def _wg_setup(ctx, inputs, output):
    g, x, values_like, *rest = inputs
    ctx.backend = rest[6]
    ctx.save_for_backward(g, x, *rest[:6])


def _wg_backward(ctx, gout):
    g, x, *tables = ctx.saved_tensors
    need = ctx.needs_input_grad
    gout = gout.contiguous()
    gg = _OpPrims(tables, ctx.backend).u(x, gout) if need[0] else None
    gx = bsr_t_matmul(g, gout, *tables, ctx.backend) if need[1] else None
    return (gg, gx) + (None,) * 8


bsr_weight_grad.register_autograd(_wg_backward, setup_context=_wg_setup)


def _eager_training(*tensors) -> bool:
    """A gradient will be taken, outside torch.compile and fake tensors: ``_JvpTrain`` instead of the op
    (the op stays what compile, export and opcheck see)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return False
    return not torch.compiler.is_compiling() and not is_fake(tensors[0])


# ---- public entry points --------------------------------------------------------------------------
def _check_vec(v, name, w: BlockSparseWeight):
    if v is None:
        return None
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != w.shape[0]:
        raise ValueError(f"{name} must be a vector of the {w.shape[0]} outputs, got shape {tuple(v.shape)}")
    if v.dtype != w.dtype:
        raise TypeError(f"{name} has dtype {v.dtype} but the weight is {w.dtype}")
    if v.device != w.device:
        raise ValueError(f"{name} is on {v.device} but the weight is on {w.device}")
    return v.contiguous()


def _check(x, w, scale, bias, what="x"):
    if not isinstance(w, BlockSparseWeight):
        raise TypeError(f"w must be a jsp_fast.sparse.BlockSparseWeight, got {type(w).__name__} "
                        "(build one with BlockSparseWeight.from_dense(W, mask, block))")
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{what} must be [..., {w.shape[1]}] for a weight of shape {list(w.shape)}, "
                         f"got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"{what} has dtype {x.dtype} but the weight is {w.dtype}; convert one of them "
                        "(x.to(w.dtype) or w.to(x.dtype))")
    if x.device != w.device:
        raise ValueError(f"{what} is on {x.device} but the weight is on {w.device}")
    return _check_vec(scale, "scale", w), _check_vec(bias, "bias", w)


def bsr_linear(x: Tensor, w: BlockSparseWeight, scale: Tensor | None = None, bias: Tensor | None = None,
               activation: str | None = None, backend: str = "auto") -> Tensor:
    """``act(scale ⊙ (x Wᵀ) + bias)`` for a block-sparse ``W``; x ``[..., k]`` -> ``[..., n]``.

    ``scale``/``bias``: ``[n]`` or None; activation: None/"none", "tanh", "softplus", "elu", "relu",
    "sigmoid". Differentiable (twice) in x, the weight's values, scale and bias.
    """
    scale, bias = _check(x, w, scale, bias)
    act = _act.check(activation)
    plan = w.plan()
    name = registry.resolve(backend, x.device, x.dtype, plan)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.shape[1]).contiguous()
    values = w.values.contiguous()
    if _eager_training(x2, values, scale, bias):
        y = _FwdTrain.apply(x2, values, scale, bias, plan, w.tables(), act, name)
    else:
        y = bsr_fwd(x2, values, *w.tables(), scale, bias, act, name)
    return y.reshape(*lead, w.shape[0])


def bsr_linear_jvp(x: Tensor, x_dot: Tensor, w: BlockSparseWeight, scale: Tensor | None = None,
                   bias: Tensor | None = None, activation: str | None = None,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Value and tangent(s) in one pass over the weights.

    ``x`` ``[..., k]``; ``x_dot`` the same shape (one tangent) or ``[T, ..., k]`` (T tangents, e.g. the
    ``dim`` basis vectors of an exact trace). Returns ``y`` ``[..., n]`` and ``y_dot`` shaped like
    ``x_dot`` with n outputs: ``y_dot = act'(pre) ⊙ scale ⊙ (x_dot Wᵀ)``.
    """
    scale, bias = _check(x, w, scale, bias)
    _check(x_dot, w, None, None, what="x_dot")
    act = _act.check(activation)
    lead = x.shape[:-1]
    if x_dot.shape == x.shape:
        single, T = True, 1
    elif x_dot.dim() == x.dim() + 1 and x_dot.shape[1:] == x.shape:
        single, T = False, x_dot.shape[0]
    else:
        raise ValueError(f"x_dot must have x's shape {tuple(x.shape)} or [T, *{tuple(x.shape)}], "
                         f"got {tuple(x_dot.shape)}")
    plan = w.plan()
    name = registry.resolve(backend, x.device, x.dtype, plan)
    k, n = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    xd = x_dot.reshape(T, x2.shape[0], k).contiguous()
    values = w.values.contiguous()
    if _eager_training(x2, xd, values, scale, bias):
        y, yd = _JvpTrain.apply(x2, xd, values, scale, bias, plan, w.tables(), act, name)
    else:
        y, yd = bsr_jvp(x2, xd, values, *w.tables(), scale, bias, act, name)
    y = y.reshape(*lead, n)
    yd = yd.reshape(*lead, n) if single else yd.reshape(T, *lead, n)
    return y, yd
