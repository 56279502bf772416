"""jf.ops.bsr_linear / bsr_linear_jvp on every backend against a float64 dense reference.

Accuracy is judged relatively (as flash-attention does): on fresh random inputs, a backend's error
against the float64 reference may be at most 2x the error of torch's own dense computation in the
same precision, plus a small atol. The atol covers the cases where torch happens to be almost exact
(short reductions, saturated activations) and the vectorised float32 activations (a few ulp).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import jsp_fast as jf
from jsp_fast.sparse import BlockSparseWeight
from jsp_fast.sparse import registry
from jsp_fast.sparse.backends.torch_ref import TorchBackend
from jsp_fast.sparse._ops import bsr_fwd, bsr_jvp, bsr_t_matmul, bsr_weight_grad

BACKENDS = ["torch"] + (["cpu"] if "cpu" in jf.backends.available() else [])
ACTS = ["none", "tanh", "softplus", "elu", "relu", "sigmoid"]
DTYPES = [torch.float32, torch.float64]
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def act_ref(act, pre):
    return {"none": lambda p: p, "tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu, "relu": F.relu,
            "sigmoid": torch.sigmoid}[act](pre)


def make(n, k, block, density, dtype, seed, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    nbr, nbc = n // block[0], k // block[1]
    grid = torch.rand(nbr, nbc, generator=gen) < density
    grid[0, 0] = True
    if empty_row and nbr > 1:
        grid[nbr - 1] = False
    W = torch.randn(n, k, generator=gen, dtype=torch.float64) / k ** 0.5
    return BlockSparseWeight.from_dense(W.to(dtype), grid, block), W * grid.repeat_interleave(
        block[0], 0).repeat_interleave(block[1], 1), gen


def reference(x, W64, scale, bias, act, dtype):
    """(float64 result, torch's same-precision dense result)."""
    out = []
    for dt in (torch.float64, dtype):
        pre = F.linear(x.to(dt), W64.to(dt))
        if scale is not None:
            pre = pre * scale.to(dt)
        if bias is not None:
            pre = pre + bias.to(dt)
        out.append(act_ref(act, pre))
    return out


def assert_close_rel(got, ref64, ref_same, dtype):
    err = (got.double() - ref64).abs().max().item()
    base = (ref_same.double() - ref64).abs().max().item()
    assert err <= 2 * base + ATOL[dtype], f"error {err:.3g} vs torch's {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("epi", ["plain", "scale_bias"])
def test_fwd_matches_reference(backend, dtype, act, epi):
    w, W64, gen = make(96, 128, (16, 32), 0.4, dtype, seed=10 + ACTS.index(act))
    x = torch.randn(37, 128, generator=gen, dtype=dtype) * 2  # 37: not a multiple of any tile
    scale = bias = None
    if epi == "scale_bias":
        scale = torch.rand(96, generator=gen, dtype=dtype) + 0.5
        bias = torch.randn(96, generator=gen, dtype=dtype)
    y = jf.ops.bsr_linear(x, w, scale, bias, act, backend=backend)
    assert y.shape == (37, 96) and y.dtype == dtype
    assert_close_rel(y, *reference(x, W64, scale, bias, act, dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_jvp_matches_reference(backend, dtype, act):
    w, W64, gen = make(64, 96, (32, 16), 0.5, dtype, seed=20 + ACTS.index(act))
    x = torch.randn(29, 96, generator=gen, dtype=dtype) * 2
    xd = torch.randn(3, 29, 96, generator=gen, dtype=dtype)
    scale = torch.rand(64, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(64, generator=gen, dtype=dtype)
    y, yd = jf.ops.bsr_linear_jvp(x, xd, w, scale, bias, act, backend=backend)
    assert yd.shape == (3, 29, 64)

    def f(dt):
        return lambda inp: act_ref(act, F.linear(inp, W64.to(dt)) * scale.to(dt) + bias.to(dt))

    refs = [torch.stack([torch.func.jvp(f(dt), (x.to(dt),), (xd[i].to(dt),))[1] for i in range(3)])
            for dt in (torch.float64, dtype)]
    assert_close_rel(y, *reference(x, W64, scale, bias, act, dtype), dtype)
    assert_close_rel(yd, *refs, dtype)
    # one tangent shaped like x
    y1, yd1 = jf.ops.bsr_linear_jvp(x, xd[1], w, scale, bias, act, backend=backend)
    assert yd1.shape == (29, 64)
    torch.testing.assert_close(yd1, yd[1], rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dense", "single", "odd_block", "big_block", "large_batch"])
def test_layouts_and_batches(backend, case):
    dtype = torch.float32
    if case == "dense":
        w, W64, gen = make(64, 64, (32, 32), 1.1, dtype, seed=30, empty_row=False)
        B = 7
    elif case == "single":
        w, W64, gen = make(64, 64, (32, 32), 0.0, dtype, seed=31)
        B = 13
    elif case == "odd_block":  # block dims no multiple of any vector width
        w, W64, gen = make(21, 35, (3, 5), 0.5, dtype, seed=32)
        B = 11
    elif case == "big_block":
        w, W64, gen = make(128, 128, (64, 64), 0.6, dtype, seed=33)
        B = 5
    else:  # many tiles, both threads, a ragged last tile
        w, W64, gen = make(128, 256, (32, 32), 0.3, dtype, seed=34)
        B = 1001
    x = torch.randn(B, w.shape[1], generator=gen, dtype=dtype)
    xd = torch.randn(2, B, w.shape[1], generator=gen, dtype=dtype)
    y = jf.ops.bsr_linear(x, w, None, None, "tanh", backend=backend)
    assert_close_rel(y, *reference(x, W64, None, None, "tanh", dtype), dtype)
    y2, yd = jf.ops.bsr_linear_jvp(x, xd, w, None, None, "tanh", backend=backend)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-6)
    ref_d = (1 - torch.tanh(F.linear(x.double(), W64)) ** 2) * F.linear(xd.double(), W64)
    assert (yd.double() - ref_d).abs().max() < 1e-4


# The cpu backend either packs the reduction operand (x, or g for the input gradient) into k-major
# panels with an in-register transpose, or reads it in place; JSP_FAST_BSR_PACK forces the choice.
# k = 84 leaves a column tail after whole vectors (16 floats / 8 doubles on AVX-512, 8 / 4 on AVX2);
# the batches cover one row, ragged panels, and (1001) several tiles per thread.
@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled backend not built")
@pytest.mark.parametrize("pack", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 13, 37, 1001])
def test_cpu_packed_and_direct_paths(monkeypatch, pack, dtype, B):
    monkeypatch.setenv("JSP_FAST_BSR_PACK", pack)
    w, W64, gen = make(64, 84, (16, 12), 0.7, dtype, seed=40 + B)
    assert (w.tables()[1] == 6).any()  # the last block column (the tail columns) is kept
    x = torch.randn(B, 84, generator=gen, dtype=dtype)
    xd = torch.randn(2, B, 84, generator=gen, dtype=dtype)
    scale = torch.rand(64, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(64, generator=gen, dtype=dtype)
    y, yd = jf.ops.bsr_linear_jvp(x, xd, w, scale, bias, "tanh", backend="cpu")
    ref64, ref_same = reference(x, W64, scale, bias, "tanh", dtype)
    assert_close_rel(y, ref64, ref_same, dtype)
    yd64 = (1 - ref64 ** 2) * scale.double() * F.linear(xd.double(), W64)
    yd_same = (1 - ref_same ** 2) * scale * F.linear(xd, W64.to(dtype))
    assert_close_rel(yd, yd64, yd_same, dtype)
    xr = x.clone().requires_grad_()
    g = torch.randn(B, 64, generator=gen, dtype=dtype)
    jf.ops.bsr_linear(xr, w, backend="cpu").backward(g)
    assert_close_rel(xr.grad, g.double() @ W64, g @ W64.to(dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_dense_autograd(backend, dtype):
    w, W64, gen = make(64, 96, (16, 32), 0.5, dtype, seed=40)
    x = torch.randn(23, 96, generator=gen, dtype=dtype, requires_grad=True)
    xd = torch.randn(2, 23, 96, generator=gen, dtype=dtype, requires_grad=True)
    values = w.values.clone().requires_grad_()
    scale = (torch.rand(64, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(64, generator=gen, dtype=dtype, requires_grad=True)
    g1 = torch.randn(23, 64, generator=gen, dtype=dtype)
    g2 = torch.randn(2, 23, 64, generator=gen, dtype=dtype)
    y, yd = jf.ops.bsr_linear_jvp(x, xd, w.with_values(values), scale, bias, "softplus", backend=backend)
    got = torch.autograd.grad((y * g1).sum() + (yd * g2).sum(), (x, xd, values, scale, bias))
    # float64 dense reference through torch.func
    x64, xd64, v64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, xd, values, scale, bias))
    W = w.with_values(v64).to_dense()
    pre = F.linear(x64, W) * s64 + b64
    yr = F.softplus(pre)
    ydr = torch.sigmoid(pre) * F.linear(xd64, W) * s64
    ref = torch.autograd.grad((yr * g1.double()).sum() + (ydr * g2.double()).sum(), (x64, xd64, v64, s64, b64))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b, name in zip(got, ref, ("x", "x_dot", "values", "scale", "bias")):
        rel = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert rel < tol, f"{name}: relative error {rel:.3g}"


def _small(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, _, _ = make(8, 12, (4, 3), 0.6, torch.float64, seed=seed, empty_row=False)
    x = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_()
    s = (torch.rand(8, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    return w, x, xd, v, s, b


# gradgradcheck is the slow part (hundreds of op calls each): every activation once on the compiled
# backend, two on the reference.
@pytest.mark.parametrize("backend,act", [("cpu", a) for a in ACTS] + [("torch", "tanh"), ("torch", "elu")])
def test_gradcheck_and_gradgradcheck(backend, act):
    if backend not in BACKENDS:
        pytest.skip("compiled backend not built")
    w, x, xd, v, s, b = _small(ACTS.index(act))

    def f(x, v, s, b):
        return jf.ops.bsr_linear(x, w.with_values(v), s, b, act, backend=backend)

    def g(x, xd, v, s, b):
        return jf.ops.bsr_linear_jvp(x, xd, w.with_values(v), s, b, act, backend=backend)

    assert gradcheck(f, (x, v, s, b))
    assert gradcheck(g, (x, xd, v, s, b))
    assert gradgradcheck(f, (x, v, s, b))
    assert gradgradcheck(g, (x, xd, v, s, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_without_scale_and_bias(backend):
    w, x, xd, v, _, _ = _small(7)
    assert gradgradcheck(lambda x, xd, v: jf.ops.bsr_linear_jvp(x, xd, w.with_values(v), None, None, "sigmoid",
                                                                backend=backend), (x, xd, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    w, x, xd, v, s, b = _small(3)
    t = w.tables()
    g = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.library.opcheck(bsr_fwd, (x, v, *t, s, b, "tanh", backend))
    torch.library.opcheck(bsr_fwd, (x, v, *t, None, None, "none", backend))
    torch.library.opcheck(bsr_jvp, (x, xd, v, *t, s, b, "softplus", backend))
    torch.library.opcheck(bsr_t_matmul, (g, v, *t, backend))
    torch.library.opcheck(bsr_weight_grad, (g, x2, v.detach(), *t, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero_leading_dims_and_noncontiguous(backend):
    w, W64, gen = make(32, 64, (16, 16), 0.5, torch.float32, seed=50)
    x0 = torch.randn(0, 64, requires_grad=True)
    y0 = jf.ops.bsr_linear(x0, w, None, None, "tanh", backend=backend)
    assert y0.shape == (0, 32)
    y0.sum().backward()
    assert x0.grad.shape == (0, 64)
    y0, yd0 = jf.ops.bsr_linear_jvp(x0.detach(), torch.randn(2, 0, 64), w, backend=backend)
    assert yd0.shape == (2, 0, 32)
    x3 = torch.randn(2, 5, 64, generator=gen)
    y3 = jf.ops.bsr_linear(x3, w, backend=backend)
    torch.testing.assert_close(y3, jf.ops.bsr_linear(x3.reshape(10, 64), w, backend=backend).reshape(2, 5, 32))
    xt = torch.randn(64, 9, generator=gen).t()  # non-contiguous view
    torch.testing.assert_close(jf.ops.bsr_linear(xt, w, backend=backend),
                               jf.ops.bsr_linear(xt.contiguous(), w, backend=backend))


def test_bad_inputs_give_clear_errors():
    w, _, gen = make(32, 64, (16, 16), 0.5, torch.float32, seed=60)
    x = torch.randn(4, 64, generator=gen)
    with pytest.raises(ValueError, match=r"x must be \[..., 64\]"):
        jf.ops.bsr_linear(torch.randn(4, 63), w)
    with pytest.raises(TypeError, match="dtype torch.float64 but the weight is torch.float32"):
        jf.ops.bsr_linear(x.double(), w)
    with pytest.raises(ValueError, match="is on meta but the weight is on cpu"):
        jf.ops.bsr_linear(x.to("meta"), w)
    with pytest.raises(ValueError, match="scale must be a vector of the 32 outputs"):
        jf.ops.bsr_linear(x, w, scale=torch.ones(31))
    with pytest.raises(TypeError, match="bias has dtype"):
        jf.ops.bsr_linear(x, w, bias=torch.ones(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        jf.ops.bsr_linear(x, w, activation="gelu")
    with pytest.raises(TypeError, match="BlockSparseWeight"):
        jf.ops.bsr_linear(x, torch.randn(32, 64))
    with pytest.raises(ValueError, match="x_dot must have x's shape"):
        jf.ops.bsr_linear_jvp(x, torch.randn(4, 5, 64), w)
    with pytest.raises(ValueError, match=r"unknown block-sparse backend 'nope'; available: \("):
        jf.ops.bsr_linear(x, w, backend="nope")
    if "cpu" in BACKENDS:
        with pytest.raises(ValueError, match="does not handle cpu tensors of dtype torch.float16"):
            jf.ops.bsr_linear(x.half(), w.to(torch.float16), backend="cpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled backend not built")
def test_cpp_argument_checks():
    from jsp_fast._ext import _C

    w, _, _ = make(32, 64, (16, 16), 0.5, torch.float32, seed=61)
    t = [a.numpy() for a in w.tables()] + [32, 64]
    x = torch.randn(4, 64).numpy()
    y = torch.empty(4, 32).numpy()
    _C.bsr_fwd(w.values.numpy(), *t, x, None, None, 1, y)
    with pytest.raises(ValueError, match="x has dtype float64, expected float32"):
        _C.bsr_fwd(w.values.numpy(), *t, x.astype("float64"), None, None, 1, y)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        _C.bsr_fwd(w.values.numpy(), *t, torch.randn(64, 4).numpy().T, None, None, 1, y)
    with pytest.raises(ValueError, match="y has shape"):
        _C.bsr_fwd(w.values.numpy(), *t, x, None, None, 1, torch.empty(4, 31).numpy())
    with pytest.raises(ValueError, match="act must be in 0..5"):
        _C.bsr_fwd(w.values.numpy(), *t, x, None, None, 9, y)
    bad = list(t)
    bad[1] = bad[1].copy()
    bad[1][0] = 99  # corrupt col_idx
    with pytest.raises(ValueError, match="out of range"):
        _C.bsr_fwd(w.values.numpy(), *bad, x, None, None, 1, y)
    with pytest.raises(ValueError, match="float32 and float64"):
        _C.bsr_fwd(w.values.half().numpy(), *t, x, None, None, 1, y)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled backend not built")
@pytest.mark.parametrize("op", ["fwd", "jvp", "t_matmul", "weight_grad"])
def test_cpp_argument_checks_every_op(op):
    """The dtype, plan and values checks are shared by the four ops; each op also checks its own arrays."""
    from jsp_fast._ext import _C

    w, _, _ = make(32, 64, (16, 16), 0.5, torch.float32, seed=62)
    t = [a.numpy() for a in w.tables()] + [32, 64]
    x, g = torch.randn(4, 64).numpy(), torch.randn(4, 32).numpy()

    def call(v, t, x=x):
        if op == "fwd":
            _C.bsr_fwd(v, *t, x, None, None, 1, torch.empty(4, 32).numpy())
        elif op == "jvp":
            _C.bsr_jvp(v, *t, x, x[None], None, None, 1, torch.empty(4, 32).numpy(), torch.empty(1, 4, 32).numpy())
        elif op == "t_matmul":
            _C.bsr_t_matmul(v, *t, x[:, :32].copy(), torch.empty(4, 64).numpy())
        else:
            _C.bsr_weight_grad(v, *t, g, x, torch.empty(v.shape).numpy())

    v = w.values.numpy()
    call(v, t)
    bad = list(t)
    bad[4] = bad[4].copy()
    bad[4][0] = -1  # corrupt row_idx
    with pytest.raises(ValueError, match="row_idx/perm out of range"):
        call(v, bad)
    with pytest.raises(ValueError, match="values has dtype float16; the CPU kernels support float32 and float64"):
        call(v.astype("float16"), t)
    with pytest.raises(ValueError, match="values must be C-contiguous"):
        call(v.transpose(0, 2, 1), t)
    own = "g" if op == "t_matmul" else "x"
    with pytest.raises(ValueError, match=f"{own} has dtype float64, expected float32"):
        call(v, t, x.astype("float64"))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled backend not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,B1", [(700, 300), (37, 0), (37, 37), (600, 256), (5, 2)])
def test_cpp_weight_grad_two_row_sources(dtype, B, B1):
    """weight_grad(g, x, x2=...) reads g's rows against [x; x2] in place: chunks (256 rows) end at B1
    too, so a split inside a chunk, at its edge, or with an empty x or x2 gives gᵀ[x; x2] on kept blocks."""
    from jsp_fast._ext import _C

    w, W64, gen = make(48, 80, (16, 16), 0.5, dtype, seed=B + B1)
    t = [a.numpy() for a in w.tables()] + [48, 80]
    g = torch.randn(B, 48, generator=gen, dtype=dtype)
    x = torch.randn(B, 80, generator=gen, dtype=dtype)
    gv = torch.empty(w.values.shape, dtype=dtype)
    _C.bsr_weight_grad(w.values.numpy(), *t, g.numpy(), x[:B1].numpy(), gv.numpy(), 2, x[B1:].numpy())
    P = g.double().t() @ x.double()
    ref = torch.stack([P[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] for r, c in zip(w.block_row.tolist(),
                                                                                  w.col_idx.tolist())])
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    assert (gv.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    with pytest.raises(ValueError, match="x2"):
        _C.bsr_weight_grad(w.values.numpy(), *t, g.numpy(), x[:B1].numpy(), gv.numpy(), 2,
                           torch.cat([x[B1:], x[:1]]).numpy())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled backend not built")
@pytest.mark.parametrize("act", ACTS)
def test_cpp_jvp_writes_the_tangent_products(act):
    """jvp(..., ud=) also writes ud = x_dot Wᵀ (before act' ⊙ scale), what the backward reads."""
    from jsp_fast import _act
    from jsp_fast._ext import _C

    w, W64, gen = make(64, 96, (16, 32), 0.4, torch.float32, seed=71)
    t = [a.numpy() for a in w.tables()] + [64, 96]
    x = torch.randn(19, 96, generator=gen)
    xd = torch.randn(3, 19, 96, generator=gen)
    s, b = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen)
    y, yd, ud = torch.empty(19, 64), torch.empty(3, 19, 64), torch.empty(3, 19, 64)
    y0, yd0 = torch.empty(19, 64), torch.empty(3, 19, 64)
    args = (w.values.numpy(), *t, x.numpy(), xd.numpy(), s.numpy(), b.numpy(), _act.code(act))
    _C.bsr_jvp(*args, y.numpy(), yd.numpy(), 2, ud.numpy())
    _C.bsr_jvp(*args, y0.numpy(), yd0.numpy(), 2)
    assert torch.equal(y, y0) and torch.equal(yd, yd0)
    ref = F.linear(xd.double(), W64)
    assert (ud.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("uses", ["both", "value", "tangent"])
def test_eager_training_path_matches_the_ops(backend, uses):
    """Under grad in eager mode bsr_linear_jvp runs _JvpTrain (direct backend calls, ud kept from the
    forward, weight_grad over [x; x_dot] in place); its gradients equal the custom op's, also when only
    the value or only the tangent reaches the loss (the other output's gradient is None, not zeros)."""
    from jsp_fast.sparse import _ops

    w, _, gen = make(64, 96, (16, 32), 0.5, torch.float64, seed=81)
    x = torch.randn(23, 96, generator=gen, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(2, 23, 96, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_()
    s = (torch.rand(64, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(64, generator=gen, dtype=torch.float64, requires_grad=True)
    g1, g2 = torch.randn(23, 64, generator=gen, dtype=torch.float64), torch.randn(2, 23, 64, generator=gen,
                                                                                   dtype=torch.float64)

    def loss(y, yd):
        return (0 if uses == "tangent" else (y * g1).sum()) + (0 if uses == "value" else (yd * g2).sum())

    y, yd = jf.ops.bsr_linear_jvp(x, xd, w.with_values(v), s, b, "tanh", backend=backend)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_JvpTrainBackward"  # under the reshape
    got = torch.autograd.grad(loss(y, yd), (x, xd, v, s, b), allow_unused=True)
    name = registry.resolve(backend, x.device, x.dtype, w.plan())
    y2, yd2 = _ops.bsr_jvp(x, xd, v, *w.tables(), s, b, "tanh", name)
    assert torch.equal(y, y2) and torch.equal(yd, yd2)
    ref = torch.autograd.grad(loss(y2, yd2), (x, xd, v, s, b), allow_unused=True)
    for a, r, what in zip(got, ref, ("x", "x_dot", "values", "scale", "bias")):
        if r is None or not r.abs().sum():
            assert a is None or not a.abs().sum(), what
        else:
            assert torch.allclose(a, r, rtol=1e-10, atol=1e-12), what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "softplus"])
def test_eager_training_path_of_bsr_linear_matches_the_op(backend, act):
    """bsr_linear under grad in eager mode runs _FwdTrain; its gradients equal the custom op's."""
    from jsp_fast.sparse import _ops

    w, _, gen = make(64, 96, (16, 32), 0.5, torch.float64, seed=83)
    x = torch.randn(2, 11, 96, generator=gen, dtype=torch.float64, requires_grad=True)
    v = w.values.clone().requires_grad_()
    s = (torch.rand(64, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(64, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 11, 64, generator=gen, dtype=torch.float64)
    y = jf.ops.bsr_linear(x, w.with_values(v), s, b, act, backend=backend)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_FwdTrainBackward"  # under the reshape
    got = torch.autograd.grad((y * g).sum(), (x, v, s, b))
    name = registry.resolve(backend, x.device, x.dtype, w.plan())
    y2 = _ops.bsr_fwd(x.reshape(-1, 96), v, *w.tables(), s, b, act, name).reshape(2, 11, 64)
    assert torch.equal(y, y2)
    ref = torch.autograd.grad((y2 * g).sum(), (x, v, s, b))
    for a, r, what in zip(got, ref, ("x", "values", "scale", "bias")):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12), what


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    best = "cpu" if "cpu" in BACKENDS else "torch"
    assert jf.backends.resolve("auto", torch.device("cpu"), torch.float32) == best
    assert jf.backends.resolve("auto", torch.device("cpu"), torch.float16) == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert jf.backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown block-sparse backend 'bogus'"):
        jf.backends.resolve("auto", torch.device("cpu"), torch.float32)


def test_register_backend_interface(monkeypatch):
    calls = []

    class Spy(TorchBackend):
        def fwd(self, *a):
            calls.append("fwd")
            return super().fwd(*a)

    jf.backends.register_backend("spy", Spy(), devices=("cpu",), priority=99)
    try:
        monkeypatch.delenv(registry.ENV_VAR, raising=False)
        assert jf.backends.available()[0] == "spy"
        w, _, _ = make(16, 16, (8, 8), 0.5, torch.float32, seed=70)
        jf.ops.bsr_linear(torch.randn(3, 16), w)
        assert calls == ["fwd"]
        with pytest.raises(ValueError, match="already registered"):
            jf.backends.register_backend("spy", Spy())
        with pytest.raises(TypeError, match="lacks the primitives"):
            jf.backends.register_backend("half", object())
    finally:
        jf.backends.unregister_backend("spy")
    assert "spy" not in jf.backends.available()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled backend not built")
def test_nan_propagates_to_its_row():
    w, _, _ = make(32, 64, (16, 16), 1.1, torch.float32, seed=80, empty_row=False)
    x = torch.randn(13, 64)
    x[5, 3] = float("nan")
    for act in ACTS:
        y = jf.ops.bsr_linear(x, w, activation=act, backend="cpu")
        assert torch.isnan(y[5]).all(), act
        assert torch.isfinite(torch.cat([y[:5], y[6:]])).all(), act


# torch.compile takes ~5 s here: a user's first move is to compile the model around our ops.
def test_compile_fullgraph():
    w, _, _ = make(32, 64, (16, 16), 0.5, torch.float32, seed=90)
    s = torch.rand(32) + 0.5
    f = torch.compile(lambda x: jf.ops.bsr_linear(x, w, s, None, "tanh"), fullgraph=True)
    x = torch.randn(6, 64)
    torch.testing.assert_close(f(x), jf.ops.bsr_linear(x, w, s, None, "tanh"))
    g = torch.compile(lambda x, xd: jf.ops.bsr_linear_jvp(x, xd, w, s, None, "softplus"), fullgraph=True)
    xr = x.clone().requires_grad_()
    y, yd = g(xr, torch.randn(2, 6, 64))
    (y.sum() + yd.square().sum()).backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
