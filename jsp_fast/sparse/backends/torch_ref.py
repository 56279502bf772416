"""The ``"torch"`` backend: the pure-torch reference of the four primitives (any device, any float dtype).

It densifies the weight (zeros outside kept blocks), so it is O(n·k) per call, not fast; the compiled
backends are tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _act
from ..plan import Plan, blocks_to_dense
from ..registry import register_backend

__all__ = ["TorchBackend", "bwd_epilogue_reference"]


def bwd_epilogue_reference(gy, gyd, y, ud, scale, act, need_bias):
    """The backward's elementwise pass of ``fwd``/``jvp`` in torch (the formulas every backend's
    ``bwd_epilogue`` is tested against; see ``csrc/cpu/bsr_kernels.h``): with ``d = act'`` and
    ``dd = d act'/dy`` read off ``y``,

        gdu[t] = gyd[t] ⊙ d,   gpre = (gy + dd ⊙ scale ⊙ Σ_t gyd[t] ⊙ ud[t]) ⊙ d,
        G = [gpre; gdu] ([(1+T)·B, n]),   gbias = Σ_b gpre.

    ``gy``/``gyd`` may be None (zero); ``ud`` is needed when ``gyd`` is given and ``dd`` is not zero.
    Returns ``(G, gbias or None)``.
    """
    d = _act.dact_from_y(act, y)
    q = gy if gy is not None else torch.zeros_like(y)
    parts = []
    if gyd is not None and gyd.shape[0]:
        parts.append((gyd * d).reshape(-1, y.shape[1]))
        dd = _act.ddact_dy(act, y)
        if dd is not None:
            if ud is None:
                raise ValueError(f"ud (x_dot Wᵀ) is required for the jvp backward of {act}")
            S = (gyd * ud).sum(0)
            q = q + dd * (S if scale is None else S * scale)
    gpre = q * d
    G = torch.cat([gpre, *parts]) if parts else gpre
    return G.contiguous(), (gpre.sum(0) if need_bias else None)


class TorchBackend:
    """The four primitives with dense torch ops."""

    @staticmethod
    def _dense(values, plan: Plan):
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
        return _act.apply(act, pre).contiguous()

    def jvp(self, x, x_dot, values, plan, scale, bias, act):
        w = self._dense(values, plan)
        pre = self._epilogue(F.linear(x, w), scale, bias)
        y = _act.apply(act, pre)
        ud = F.linear(x_dot, w)
        if scale is not None:
            ud = ud * scale
        return y.contiguous(), (_act.dact_from_y(act, y) * ud).contiguous()

    def t_matmul(self, g, values, plan):
        return (g @ self._dense(values, plan)).contiguous()

    def weight_grad(self, g, x, plan):
        bm, bk = plan.bm, plan.bk
        full = (g.t() @ x).reshape(plan.n // bm, bm, plan.k // bk, bk).permute(0, 2, 1, 3)
        return full[plan.block_row, plan.col_idx].contiguous()

    def bwd_epilogue(self, gy, gyd, y, ud, scale, act, need_bias):
        return bwd_epilogue_reference(gy, gyd, y, ud, scale, act, need_bias)


register_backend("torch", TorchBackend(), devices=("cpu", "cuda", "mps", "xpu", "meta"), priority=0)
