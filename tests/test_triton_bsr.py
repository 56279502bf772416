"""Triton block-sparse primitives against a float64 torch reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), ~1000x slower than native,
so shapes are small; with a GPU the same bodies run at larger shapes. The look-up tables are built
here from the dense mask with plain loops (independent of ``jsp_fast.sparse.plan``). Autograd runs
through the public ops (``jf.ops.bsr_linear(..., backend="triton")``), whose backward calls these
launchers.

Tolerances: float64 results must match to ~1e-10; float32/bf16 results must be within ~2x the error
of torch's own same-precision dense computation against float64 (plus a small floor, since torch's
error can be zero on tiny sums), as flash-attention's tests judge accuracy.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from _triton_util import ACTS, act_grad_ref, act_ref, skip_unless_triton_runs  # noqa: E402

import jsp_fast as jf  # noqa: E402
from jsp_fast.kernels import bsr_grad, bsr_linear  # noqa: E402
from jsp_fast.sparse import BlockSparseWeight  # noqa: E402


# ---- a tiny independent plan: LUTs from a dense block grid ---------------------------------------
class Plan:
    def __init__(self, grid, block, device, dtype, gen):
        self.grid = grid
        self.bm, self.bk = block
        nbr, nbc = grid.shape
        self.shape = (nbr * self.bm, nbc * self.bk)
        blocks = [(r, c) for r in range(nbr) for c in range(nbc) if grid[r, c]]
        row_ptr, col_idx = [0], []
        for r in range(nbr):
            col_idx += [c for (rr, c) in blocks if rr == r]
            row_ptr.append(len(col_idx))
        col_ptr, t_row, t_perm = [0], [], []
        for c in range(nbc):
            for p, (r, cc) in enumerate(blocks):
                if cc == c:
                    t_row.append(r)
                    t_perm.append(p)
            col_ptr.append(len(t_row))
        i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
        self.row_ptr, self.col_idx = i32(row_ptr), i32(col_idx)
        self.col_ptr, self.t_row, self.t_perm = i32(col_ptr), i32(t_row), i32(t_perm)
        self.row_idx = i32([r for r, _ in blocks])
        self.values = torch.randn(len(blocks), self.bm, self.bk, generator=gen, dtype=torch.float64)
        self.values = (self.values / self.shape[1] ** 0.5).to(device=device, dtype=dtype)
        self.luts = (self.row_ptr, self.col_idx, self.col_ptr, self.t_row, self.t_perm, self.shape)

    def dense(self, values=None):
        values = self.values if values is None else values
        n, k = self.shape
        w = values.new_zeros(n // self.bm, k // self.bk, self.bm, self.bk)
        if values.shape[0]:
            w = w.index_put((self.row_idx.long(), self.col_idx.long()), values)
        return w.permute(0, 2, 1, 3).reshape(n, k)

    def block_view(self, dense):
        n, k = self.shape
        g = dense.reshape(n // self.bm, self.bm, k // self.bk, self.bk).permute(0, 2, 1, 3)
        return g[self.row_idx.long(), self.col_idx.long()]


def make_grid(kind, nbr, nbc, gen):
    if kind == "dense":
        return torch.ones(nbr, nbc, dtype=torch.bool)
    if kind == "single":
        g = torch.zeros(nbr, nbc, dtype=torch.bool)
        g[nbr // 2, nbc - 1] = True
        return g
    if kind == "empty":
        return torch.zeros(nbr, nbc, dtype=torch.bool)
    g = torch.rand(nbr, nbc, generator=gen) < 0.45
    g[0] = False                                  # an empty block row
    if nbc > 1:
        g[:, 0] = False                           # an empty block column (zero input gradient)
    g[-1, -1] = True
    return g


# (batch, block rows, block cols, block) per device; the CPU shapes keep the interpreter fast.
CASES = {
    "cpu": [
        (37, 4, 3, (16, 16), "random"),   # odd batch, empty row and column
        (21, 3, 2, (16, 16), "dense"),
        (19, 3, 4, (16, 16), "single"),
        (13, 3, 3, (8, 8), "random"),     # blocks below 16: the broadcast-sum path (no tl.dot)
        (17, 3, 2, (12, 8), "random"),    # non-power-of-two block (padded tiles)
        (9, 2, 2, (16, 16), "empty"),
    ],
    "cuda": [
        (1037, 32, 24, (32, 32), "random"),
        (4099, 16, 16, (64, 64), "random"),
        (515, 16, 16, (32, 32), "dense"),
        (333, 8, 8, (16, 16), "single"),
        (257, 8, 8, (8, 8), "random"),
        (129, 4, 4, (32, 32), "empty"),
    ],
}
CASE_IDS = ["odd-batch-empty-rows", "all-dense", "single-block", "small-blocks", "npot-block", "no-blocks"]


def _close(ours, ref64, torch_same_precision, dtype):
    if ours.numel() == 0:
        assert ours.shape == ref64.shape
        return
    err = (ours.double() - ref64).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-10 * max(1.0, ref64.abs().max().item()), err
        return
    base = (torch_same_precision.double() - ref64).abs().max().item()
    floor = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert err <= 2 * base + floor * max(1.0, ref64.abs().max().item()), (err, base)


def _setup(device, case, dtype, seed):
    B, nbr, nbc, block, kind = case
    gen = torch.Generator().manual_seed(seed)
    plan = Plan(make_grid(kind, nbr, nbc, gen), block, device, dtype, gen)
    n, k = plan.shape
    x = torch.randn(B, k, generator=gen, dtype=torch.float64).to(device, dtype)
    scale = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(device, dtype)
    bias = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype)
    return plan, x, scale, bias, gen


def _epilogue_ref(prod, scale, bias, act):
    pre = prod
    if scale is not None:
        pre = pre * scale.double()
    if bias is not None:
        pre = pre + bias.double()
    return pre, act_ref(act, pre)


def _torch_same(x, w, scale, bias, act):
    pre = F.linear(x, w)
    if scale is not None:
        pre = pre * scale
    if bias is not None:
        pre = pre + bias
    return act_ref(act, pre)


# ---- forward ---------------------------------------------------------------------------------------
def _test_forward(device, case, act, with_scale, with_bias, dtype=torch.float32, seed=0):
    skip_unless_triton_runs(device)
    plan, x, scale, bias, _ = _setup(device, case, dtype, seed)
    scale = scale if with_scale else None
    bias = bias if with_bias else None
    y = bsr_linear.bsr_linear_fwd(x, plan.values, plan.row_ptr, plan.col_idx, plan.shape, scale, bias, act)
    assert y.shape == (x.shape[0], plan.shape[0]) and y.dtype == dtype
    w = plan.dense()
    _, ref = _epilogue_ref(x.double() @ w.double().T, scale, bias, act)
    _close(y, ref, _torch_same(x, w, scale, bias, act), dtype)


@pytest.mark.parametrize("case", range(6), ids=CASE_IDS)
def test_forward_cases(device, case):
    _test_forward(device, CASES[device][case], "tanh", True, True, seed=case)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_scale,with_bias", [(True, True), (False, False), (True, False), (False, True)])
def test_forward_activations(device, act, with_scale, with_bias):
    _test_forward(device, CASES[device][0], act, with_scale, with_bias, seed=ACTS.index(act))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["f64", "f16", "bf16"])
def test_forward_dtypes(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bfloat16 loads (NumPy has no bfloat16)")
    _test_forward(device, CASES[device][0], "softplus", True, True, dtype=dtype, seed=7)


def test_forward_leading_dims_and_prod(device):
    skip_unless_triton_runs(device)
    plan, x, scale, bias, gen = _setup(device, CASES[device][0], torch.float32, 3)
    x3 = x.reshape(1, *x.shape).expand(2, *x.shape).contiguous()
    y, prod = bsr_linear.bsr_linear_fwd(x3, plan.values, plan.row_ptr, plan.col_idx, plan.shape, scale, bias,
                                        "elu", store_prod=True)
    w = plan.dense()
    p64 = x3.double() @ w.double().T
    _close(prod, p64, F.linear(x3, w), torch.float32)
    _close(y, _epilogue_ref(p64, scale, bias, "elu")[1], _torch_same(x3, w, scale, bias, "elu"), torch.float32)


def test_forward_rejects_bad_inputs():
    skip_unless_triton_runs("cpu")
    plan, x, scale, bias, _ = _setup("cpu", CASES["cpu"][0], torch.float32, 0)
    with pytest.raises(ValueError, match="features"):
        bsr_linear.bsr_linear_fwd(x[:, :-1], plan.values, plan.row_ptr, plan.col_idx, plan.shape)
    with pytest.raises(ValueError, match="activation"):
        bsr_linear.bsr_linear_fwd(x, plan.values, plan.row_ptr, plan.col_idx, plan.shape, activation="gelu")
    with pytest.raises(ValueError, match="scale"):
        bsr_linear.bsr_linear_fwd(x, plan.values, plan.row_ptr, plan.col_idx, plan.shape, scale=scale[:-1])
    with pytest.raises(TypeError):
        bsr_linear.bsr_linear_fwd(x.int(), plan.values, plan.row_ptr, plan.col_idx, plan.shape)


# ---- forward + JVP -----------------------------------------------------------------------------------
def _test_jvp(device, case, act, T, with_scale=True, with_bias=True, dtype=torch.float32, seed=0, max_chunk=8):
    skip_unless_triton_runs(device)
    plan, x, scale, bias, gen = _setup(device, case, dtype, seed)
    scale = scale if with_scale else None
    bias = bias if with_bias else None
    xd = torch.randn(T, *x.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    y, yd = bsr_linear.bsr_linear_jvp(x, xd, plan.values, plan.row_ptr, plan.col_idx, plan.shape, scale, bias,
                                      act, max_chunk=max_chunk)
    assert y.shape == (x.shape[0], plan.shape[0]) and yd.shape == (T, x.shape[0], plan.shape[0])
    w = plan.dense()
    w64 = w.double()
    pre, ref = _epilogue_ref(x.double() @ w64.T, scale, bias, act)
    gain = act_grad_ref(act, pre) * (scale.double() if scale is not None else 1.0)
    ref_d = gain * (xd.double() @ w64.T)
    _close(y, ref, _torch_same(x, w, scale, bias, act), dtype)
    # torch's fp32 tangent: the same chain in fp32 (act' from fp32 pre)
    pre32 = F.linear(x, w) * (scale if scale is not None else 1) + (bias if bias is not None else 0)
    gain32 = act_grad_ref(act, pre32) * (scale if scale is not None else 1)
    _close(yd, ref_d, gain32 * F.linear(xd, w), dtype)


@pytest.mark.parametrize("case", range(6), ids=CASE_IDS)
def test_jvp_cases(device, case):
    _test_jvp(device, CASES[device][case], "tanh", 2, seed=10 + case)


@pytest.mark.parametrize("act", ACTS)
def test_jvp_activations(device, act):
    _test_jvp(device, CASES[device][0], act, 1, with_scale=act != "elu", with_bias=act != "relu",
              seed=20 + ACTS.index(act))


def test_jvp_many_tangents_chunked(device):
    # T=5 tangents in chunks of 2: three tangent chunks, the last one partial
    _test_jvp(device, CASES[device][0], "sigmoid", 5, seed=30, max_chunk=2)


def test_jvp_float64(device):
    _test_jvp(device, CASES[device][3], "softplus", 3, dtype=torch.float64, seed=31)


# ---- transposed product and weight gradient ---------------------------------------------------------
@pytest.mark.parametrize("case", range(6), ids=CASE_IDS)
def test_t_matmul(device, case):
    skip_unless_triton_runs(device)
    plan, x, _, _, gen = _setup(device, CASES[device][case], torch.float32, 40 + case)
    g = torch.randn(x.shape[0], plan.shape[0], generator=gen).to(device)
    dx = bsr_grad.bsr_t_matmul(g, plan.values, plan.col_ptr, plan.t_row, plan.t_perm, plan.shape)
    w = plan.dense()
    _close(dx, g.double() @ w.double(), g @ w, torch.float32)


@pytest.mark.parametrize("case", range(6), ids=CASE_IDS)
def test_weight_grad(device, case):
    skip_unless_triton_runs(device)
    plan, x, _, _, gen = _setup(device, CASES[device][case], torch.float32, 50 + case)
    g = torch.randn(x.shape[0], plan.shape[0], generator=gen).to(device)
    dv = bsr_grad.bsr_weight_grad(g, x, plan.row_idx, plan.col_idx, (plan.bm, plan.bk))
    assert dv.shape == plan.values.shape
    _close(dv, plan.block_view(g.double().T @ x.double()), plan.block_view(g.T @ x), torch.float32)


def test_weight_grad_split_batch(device):
    # a batch long enough for several splits (partials summed by the launcher)
    skip_unless_triton_runs(device)
    case = (300, 2, 2, (16, 16), "dense") if device == "cpu" else (70001, 4, 4, (32, 32), "random")
    plan, x, _, _, gen = _setup(device, case, torch.float64, 60)
    g = torch.randn(x.shape[0], plan.shape[0], generator=gen, dtype=torch.float64).to(device)
    dv = bsr_grad.bsr_weight_grad(g, x, plan.row_idx, plan.col_idx, (plan.bm, plan.bk))
    _close(dv, plan.block_view(g.T @ x), None, torch.float64)


# ---- autograd (the jsp_fast::bsr_* ops on the "triton" backend) --------------------------------------
def _test_autograd(device, act, double_backward=False):
    skip_unless_triton_runs(device)
    dtype = torch.float64
    plan, x, scale, bias, gen = _setup(device, CASES[device][0], dtype, 70)
    leaves = [t.clone().requires_grad_(True) for t in (x, plan.values, scale, bias)]
    xs, vs, ss, bs = leaves
    w = BlockSparseWeight.from_blocks(vs, plan.row_idx, plan.col_idx, plan.shape)
    assert w.values is vs  # blocks already in row-major order: no copy, gradients reach vs
    y = jf.ops.bsr_linear(xs, w, ss, bs, act, backend="triton")
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, plan.values, scale, bias)]
    xr, vr, sr, br = ref_leaves
    yr = act_ref(act, F.linear(xr, plan.dense(vr)) * sr + br)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    gy = torch.randn(y.shape, generator=gen, dtype=dtype).to(device)
    if not double_backward:
        grads = torch.autograd.grad(y, leaves, gy)
        grads_r = torch.autograd.grad(yr, ref_leaves, gy)
    else:  # d/dtheta of |dy/dx . gy|^2: differentiates through the backward itself
        (gx,) = torch.autograd.grad(y, xs, gy, create_graph=True)
        (gxr,) = torch.autograd.grad(yr, xr, gy, create_graph=True)
        grads = torch.autograd.grad((gx ** 2).sum(), leaves, allow_unused=True)
        grads_r = torch.autograd.grad((gxr ** 2).sum(), ref_leaves, allow_unused=True)
    for a, b in zip(grads, grads_r):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("act", ["tanh", "softplus", "sigmoid", "none"])
def test_autograd(device, act):
    _test_autograd(device, act)


@pytest.mark.parametrize("act", ["tanh", "elu"])
def test_double_backward(device, act):
    _test_autograd(device, act, double_backward=True)
