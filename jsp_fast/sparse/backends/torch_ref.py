"""The ``"torch"`` backend: the pure-torch reference of the four primitives (any device, any float dtype).

It densifies the weight (zeros outside kept blocks), so it is O(n·k) per call, not fast; the compiled
backends are tested against it.
"""
from __future__ import annotations

import torch.nn.functional as F

from ... import _act
from ..plan import Plan, blocks_to_dense
from ..registry import register_backend

__all__ = ["TorchBackend"]


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


register_backend("torch", TorchBackend(), devices=("cpu", "cuda", "mps", "xpu", "meta"), priority=0)
