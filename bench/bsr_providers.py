"""Shared setup and named providers for the block-sparse layer benchmarks (CPU).

One case = (op, width, batch, block, density, dtype); every provider computes the same thing:

- ``dense``: ``F.linear`` with the full dense weight + the same epilogue (what a pruned model costs
  when the zeros are kept);
- ``masked``: the ``torch.nn.utils.prune`` way: ``F.linear(x, W * mask)`` + epilogue, the mask
  applied on every call;
- ``torch_bsr``: torch's own CPU BSR (``W.to_sparse_bsr(block)``, MKL) + epilogue; no backward on
  the CPU (the transpose, BSC, has no CPU matmul), so ``fwd_bwd`` is skipped for it;
- ``ours``: ``jf.ops.bsr_linear`` / ``bsr_linear_jvp`` on the ``cpu`` backend (epilogue fused).

Ops: ``fwd`` (``tanh(scale ⊙ (x Wᵀ) + bias)``), ``jvp`` (value and one tangent),
``fwd_bwd`` (forward, then the gradients w.r.t. x, the weight, scale and bias).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import jsp_fast as jf

PROVIDERS = ("dense", "masked", "torch_bsr", "ours")
OPS = ("fwd", "jvp", "fwd_bwd")
ACT = "tanh"


def set_threads() -> int:
    n = int(os.environ.get("JSP_FAST_BENCH_THREADS", "2"))
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class Case:
    op: str
    width: int
    batch: int
    block: int
    density: float
    dtype: torch.dtype = torch.float32

    @property
    def flops(self) -> float:
        """Dense multiply-add FLOPs of one product (2·B·N·K)."""
        return 2.0 * self.batch * self.width * self.width


class Setup:
    """Inputs and per-provider callables for one case (built once, reused across rounds)."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        gen = torch.Generator().manual_seed(seed)
        n = k = case.width
        b = case.block
        dt = case.dtype
        grid = torch.rand(n // b, k // b, generator=gen) < case.density
        grid[0, 0] = True
        self.mask = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)
        self.W = (torch.randn(n, k, generator=gen, dtype=dt) / k ** 0.5) * self.mask
        self.w = jf.sparse.BlockSparseWeight.from_dense(self.W, grid, (b, b))
        self.density = self.w.density
        self.x = torch.randn(case.batch, k, generator=gen, dtype=dt)
        self.xd = torch.randn(case.batch, k, generator=gen, dtype=dt)
        self.scale = torch.rand(n, generator=gen, dtype=dt) + 0.5
        self.bias = torch.randn(n, generator=gen, dtype=dt)
        self.g = torch.randn(case.batch, n, generator=gen, dtype=dt)
        self._bsr = None

    @property
    def bsr(self):
        if self._bsr is None:
            self._bsr = self.W.to_sparse_bsr((self.case.block, self.case.block))
        return self._bsr

    # -- the dense-style providers share one epilogue written the way a user would --------------------
    def _epi(self, u, s, b):
        return torch.tanh(torch.addcmul(b, u, s))

    def _dense_like(self, provider: str):
        op = self.case.op
        x, xd, s, b = self.x, self.xd, self.scale, self.bias
        if provider == "dense":
            W = self.W.clone()  # (the values: zeros kept, dense cost)
            lin = lambda inp, W=W: F.linear(inp, W)  # noqa: E731
        elif provider == "masked":
            W, mask = self.W.clone(), self.mask.to(self.W.dtype)
            lin = None
        else:
            Wb = self.bsr
            lin = lambda inp: F.linear(inp, Wb)  # noqa: E731
        if op == "fwd":
            if provider == "masked":
                return lambda: self._epi(F.linear(x, W * mask), s, b)
            return lambda: self._epi(lin(x), s, b)
        if op == "jvp":
            def jvp():
                if provider == "masked":
                    Wm = W * mask
                    u, ud = F.linear(x, Wm), F.linear(xd, Wm)
                else:
                    u, ud = lin(x), lin(xd)
                y = self._epi(u, s, b)
                return y, (1 - y * y) * (ud * s)
            return jvp
        # fwd_bwd
        if provider == "torch_bsr":
            return None
        Wp = W.clone().requires_grad_()
        xr, sr, br = x.clone().requires_grad_(), s.clone().requires_grad_(), b.clone().requires_grad_()
        g = self.g

        def fb():
            Wm = Wp * mask if provider == "masked" else Wp
            y = self._epi(F.linear(xr, Wm), sr, br)
            return torch.autograd.grad(y, (xr, Wp, sr, br), g)
        return fb

    def _ours(self):
        op = self.case.op
        x, xd, s, b, w = self.x, self.xd, self.scale, self.bias, self.w
        if op == "fwd":
            return lambda: jf.ops.bsr_linear(x, w, s, b, ACT, backend="cpu")
        if op == "jvp":
            return lambda: jf.ops.bsr_linear_jvp(x, xd, w, s, b, ACT, backend="cpu")
        values = w.values.clone().requires_grad_()
        wv = w.with_values(values)
        xr, sr, br = x.clone().requires_grad_(), s.clone().requires_grad_(), b.clone().requires_grad_()
        g = self.g

        def fb():
            y = jf.ops.bsr_linear(xr, wv, sr, br, ACT, backend="cpu")
            return torch.autograd.grad(y, (xr, values, sr, br), g)
        return fb

    def fn(self, provider: str):
        """The callable for ``provider``, or None when the provider cannot run this case."""
        if provider == "ours":
            return self._ours()
        if provider == "torch_bsr" and self.case.dtype not in (torch.float32, torch.float64):
            return None
        return self._dense_like(provider)

