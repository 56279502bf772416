"""Property-based tests (hypothesis) of the public block-sparse ops on every available backend.

``jf.ops.bsr_linear`` / ``bsr_linear_jvp`` over random problems -- block dims 1..16 (non-square
too), weights made of 1..6 blocks a side, masks that are random, dense, a single block, empty, or have
empty block rows, kept blocks that are all zero, float32/float64, every activation, scale/bias present
or not, contiguous / transposed / strided / 3-d inputs, empty and odd batches, 1..3 tangents -- against
a float64 dense reference ``act(scale * (x @ (W * mask)^T) + bias)``; gradients (and double backward,
which CNF training and JSP scoring need) against float64 autograd of that reference; bad inputs must
raise ValueError/TypeError with a message.

Tolerances are forward-error bounds, not fixed numbers: the result of a length-``r`` reduction in
unit roundoff ``u`` is off by at most ``gamma_r * (sum of |terms|)`` (``gamma_r = r u / (1 - r u)``)
in any summation order, so each check allows ``2 * gamma * M`` elementwise, where ``M`` is the same
expression evaluated on absolute values (|x| @ |W|^T, ...), plus a few ulp for the activations (the
vectorised float32 ones are a few ulp off libm). That bound is as tight for a 1x1 weight as for a
96x96 one, where a fixed atol would be loose for one and flaky for the other; a wrong block or a
dropped epilogue term is off by O(M), orders of magnitude above it. float32 has u = 2^-24,
float64 u = 2^-53.

Derivative kinks: relu' (and elu'' in the JVP's backward) jump at pre = 0, so where a float32 pre is
within its own error bound of 0 the two sides may legitimately disagree; such draws are rejected
(``assume``), which happens for a tiny fraction of them.

Budget: examples are derandomized (the same cases every run, chosen from a hash of each test) so CI is
reproducible, and a failure prints the falsifying example plus a ``@reproduce_failure`` blob. With
``JSP_FAST_HYPOTHESIS=explore`` the tests draw fresh random cases and keep failures in hypothesis's
example database (``.hypothesis/``), replayed first on the next run (hypothesis turns the database
off for derandomized runs). ``JSP_FAST_HYPOTHESIS_SCALE=<float>`` scales every example budget. The
Triton interpreter is ~1000x slower than the compiled kernels, so its cases are tiny and few.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jsp_fast as jf
from jsp_fast.sparse import BlockSparseWeight

# Small problems are overhead-bound: a second thread only oversubscribes a shared CI machine.
pytestmark = pytest.mark.usefixtures("one_thread")

# ---- cases and budgets ----------------------------------------------------------------------------
CASES = [(name, "cpu") for name in jf.backends.available("cpu")]
if torch.cuda.is_available():
    CASES += [(name, "cuda") for name in jf.backends.available("cuda")]
# Triton (interpreted on the CPU, JIT-compiled per shape on a GPU) is slow per new case.
SLOW = [c for c in CASES if c[0] == "triton"]
FAST = [c for c in CASES if c[0] != "triton"]


def _ids(cases):
    return [f"{b}-{d}" for b, d in cases]


_EXPLORE = os.environ.get("JSP_FAST_HYPOTHESIS", "").lower() == "explore"
_SCALE = float(os.environ.get("JSP_FAST_HYPOTHESIS_SCALE", "1"))


def budget(n: int) -> settings:
    common = {"max_examples": max(1, int(n * _SCALE)), "deadline": None, "print_blob": True,
              "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]}
    return settings(**common) if _EXPLORE else settings(derandomize=True, **common)


ACTS = [None, "none", "tanh", "softplus", "elu", "relu", "sigmoid"]
BLOCK_DIMS = [1, 2, 4, 8, 16]
DTYPES = [torch.float32, torch.float64]
U = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def gamma(r: int, dtype) -> float:
    ru = r * U[dtype]
    return ru / (1 - ru)


# ---- problem generation ---------------------------------------------------------------------------
class Problem:
    """One drawn case: tensors in the test dtype on the backend's device, plus float64 copies."""

    def __repr__(self):  # hypothesis prints this for a falsifying example
        return (f"Problem(n={self.n}, k={self.k}, block=({self.bm}, {self.bk}), mask={self.mask_kind!r}, "
                f"mask_form={self.mask_form!r}, zero_block={self.zero_block}, dtype={self.dtype}, "
                f"act={self.act!r}, scale={self.scale is not None}, bias={self.bias is not None}, "
                f"lead={self.lead}, layout={self.layout!r}, T={self.T!r}, seed={self.seed})")


def _grid(kind, nbr, nbc, density, gen):
    if kind == "dense":
        return torch.ones(nbr, nbc, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(nbr, nbc, dtype=torch.bool)
    if kind == "one":
        g = torch.zeros(nbr * nbc, dtype=torch.bool)
        g[int(torch.randint(nbr * nbc, (1,), generator=gen))] = True
        return g.reshape(nbr, nbc)
    g = torch.rand(nbr, nbc, generator=gen) < density
    if kind == "empty_rows":  # every other block row empty, at least one kept block elsewhere
        g[::2] = False
        if nbr > 1:
            g[1, int(torch.randint(nbc, (1,), generator=gen))] = True
    return g


def _make_x(lead, k, layout, gen):
    if layout == "transposed" and len(lead) == 1:
        return torch.randn(k, lead[0], generator=gen, dtype=torch.float64).t()
    if layout == "strided":
        return torch.randn(*lead, 2 * k, generator=gen, dtype=torch.float64)[..., ::2]
    return torch.randn(*lead, k, generator=gen, dtype=torch.float64)


@st.composite
def problems(draw, tiny: bool = False, dtypes=DTYPES, tangents=False):
    p = Problem()
    p.dtype = draw(st.sampled_from(dtypes))
    p.bm, p.bk = draw(st.sampled_from(BLOCK_DIMS)), draw(st.sampled_from(BLOCK_DIMS))
    side = 16 if tiny else 64  # largest n or k
    nbr = draw(st.integers(1, max(1, min(6, side // p.bm))))
    nbc = draw(st.integers(1, max(1, min(6, side // p.bk))))
    p.n, p.k = nbr * p.bm, nbc * p.bk
    p.mask_kind = draw(st.sampled_from(["random", "dense", "one", "none", "empty_rows"]))
    p.mask_form = draw(st.sampled_from(["element", "grid"]))
    density = draw(st.floats(0.1, 0.9))
    p.zero_block = draw(st.booleans())
    p.act = draw(st.sampled_from(ACTS))
    has_scale, has_bias = draw(st.booleans()), draw(st.booleans())
    bmax = 5 if tiny else 33
    if draw(st.booleans()):
        p.lead = (draw(st.integers(0, bmax)),)
    else:
        p.lead = (draw(st.integers(0, 2 if tiny else 3)), draw(st.integers(1, 3 if tiny else 9)))
    p.layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    p.T = draw(st.sampled_from(["single", 1, 2, 3])) if tangents else None
    p.seed = draw(st.integers(0, 2 ** 31 - 1))

    gen = torch.Generator().manual_seed(p.seed)
    grid = _grid(p.mask_kind, nbr, nbc, density, gen)
    emask = grid.repeat_interleave(p.bm, 0).repeat_interleave(p.bk, 1)
    W = torch.randn(p.n, p.k, generator=gen, dtype=torch.float64) / math.sqrt(p.k)
    if p.zero_block and grid.any():  # a kept block whose values are all zero must still be kept
        r, c = grid.nonzero()[0].tolist()
        W[r * p.bm:(r + 1) * p.bm, c * p.bk:(c + 1) * p.bk] = 0
    p.grid, p.emask, p.W = grid, emask, W
    p.mask = emask if p.mask_form == "element" else grid
    p.x = _make_x(p.lead, p.k, p.layout, gen)
    p.scale = (torch.rand(p.n, generator=gen, dtype=torch.float64) * 3 - 1.5) if has_scale else None
    p.bias = torch.randn(p.n, generator=gen, dtype=torch.float64) if has_bias else None
    if tangents:
        shape = p.lead if p.T == "single" else (p.T, *p.lead)
        p.x_dot = torch.randn(*shape, p.k, generator=gen, dtype=torch.float64)
    p.g = torch.randn(*p.lead, p.n, generator=gen, dtype=torch.float64)  # upstream gradients
    if tangents:
        p.g_dot = torch.randn(*p.x_dot.shape[:-1], p.n, generator=gen, dtype=torch.float64)
    return p


def cast(t, dtype, device):
    """Cast keeping the layout (a transposed or strided x stays non-contiguous)."""
    if t is None:
        return None
    if t.is_contiguous():
        return t.to(device=device, dtype=dtype, copy=True)
    base = torch.empty_strided(t.size(), t.stride(), dtype=dtype, device=device)
    return base.copy_(t)


# ---- the float64 dense reference ------------------------------------------------------------------
def act_ref(act, pre):
    return {None: lambda p: p, "none": lambda p: p, "tanh": torch.tanh, "softplus": F.softplus,
            "elu": F.elu, "relu": F.relu, "sigmoid": torch.sigmoid}[act](pre)


def dact_ref(act, pre):
    """act'(pre), differentiable (twice) where it is smooth."""
    if act == "tanh":
        return 1 - torch.tanh(pre) ** 2
    if act == "softplus":
        return torch.sigmoid(pre)
    if act == "elu":
        return torch.where(pre > 0, torch.ones_like(pre), torch.exp(torch.clamp(pre, max=0)))
    if act == "relu":
        return (pre > 0).to(pre.dtype)
    if act == "sigmoid":
        s = torch.sigmoid(pre)
        return s * (1 - s)
    return torch.ones_like(pre)


def ref_forward(x, W, emask, scale, bias, act):
    pre = x @ (W * emask).T
    if scale is not None:
        pre = pre * scale
    if bias is not None:
        pre = pre + bias
    return act_ref(act, pre), pre


def ref_jvp(x, x_dot, W, emask, scale, bias, act):
    y, pre = ref_forward(x, W, emask, scale, bias, act)
    ud = x_dot @ (W * emask).T
    if scale is not None:
        ud = ud * scale
    return y, dact_ref(act, pre) * ud, pre


# ---- tolerances ------------------------------------------------------------------------------------
def _abs(p):
    """Absolute-value magnitudes: |W_masked|, |x|, |s| (ones if absent), |b| (zeros if absent)."""
    Wa = (p.W * p.emask).abs()
    s = p.scale.abs() if p.scale is not None else torch.ones(p.n, dtype=torch.float64)
    b = p.bias.abs() if p.bias is not None else torch.zeros(p.n, dtype=torch.float64)
    return Wa, p.x.abs(), s, b


def forward_tol(p, dtype):
    """Elementwise bound on |y - y_ref| and on |pre - pre_ref| for the test dtype."""
    Wa, xa, s, b = _abs(p)
    M = xa @ Wa.T
    tol_pre = 2 * gamma(p.k + 2, dtype) * (M * s + b)
    # activations are 1-Lipschitz; a few ulp of the output for their own rounding
    return tol_pre + 16 * U[dtype] * (M * s + b + 1), tol_pre, M


def _max(t) -> float:
    return t.max().item() if t.numel() else 0.0


def check(got, ref, tol, what, p):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.detach().double().cpu() - ref.detach()).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} entries off; max error "
                           f"{err.max().item():.3g} where the bound is {tol.flatten()[err.flatten().argmax()].item():.3g}"
                           f" ({p!r})")


def no_kink(pre_ref, tol_pre, act, kinks=("relu",)):
    """Reject draws where a float pre-activation may sit on the other side of a derivative kink.

    An exact 0 comes from a row with no kept block (or only all-zero ones) and no bias, which every
    backend also sums to exactly 0, and relu'(0) = 0 everywhere; so relu keeps it. elu''(0) is a
    convention (the ops take the left limit 1 from y <= 0, torch's F.elu double backward 0): such
    draws are rejected."""
    if act in kinks:
        a = pre_ref.abs()
        near = a <= 4 * tol_pre
        if act == "relu":
            near &= a > 0
        assume(not bool(near.any()))


def _weight(p, dtype, device, requires_grad=False):
    Wd = p.W.to(device=device, dtype=dtype)
    if requires_grad:
        Wd.requires_grad_(True)
    return Wd, BlockSparseWeight.from_dense(Wd, p.mask.to(device), block=(p.bm, p.bk))


# ---- forward ---------------------------------------------------------------------------------------
def _forward(backend, device, p):
    dtype = p.dtype
    Wd, w = _weight(p, dtype, device)
    assert w.nnzb == int(p.grid.sum())
    x, s, b = cast(p.x, dtype, device), cast(p.scale, dtype, device), cast(p.bias, dtype, device)
    y = jf.ops.bsr_linear(x, w, scale=s, bias=b, activation=p.act, backend=backend)
    assert y.dtype == dtype and y.device.type == device and y.shape == (*p.lead, p.n)
    # the reference sees exactly the rounded inputs the op saw
    p.W, p.x = Wd.double().cpu(), x.double().cpu()
    p.scale = None if s is None else s.double().cpu()
    p.bias = None if b is None else b.double().cpu()
    ref, _ = ref_forward(p.x, p.W, p.emask, p.scale, p.bias, p.act)
    tol, _, _ = forward_tol(p, dtype)
    check(y, ref, tol, "y", p)


@pytest.mark.parametrize("backend,device", FAST, ids=_ids(FAST))
@budget(500)
@given(p=problems())
def test_forward(backend, device, p):
    _forward(backend, device, p)


@pytest.mark.parametrize("backend,device", SLOW, ids=_ids(SLOW))
@budget(30)
@given(p=problems(tiny=True))
def test_forward_slow_backends(backend, device, p):
    _forward(backend, device, p)


# ---- jvp -------------------------------------------------------------------------------------------
def _jvp(backend, device, p):
    dtype = p.dtype
    Wd, w = _weight(p, dtype, device)
    x, xd = cast(p.x, dtype, device), cast(p.x_dot, dtype, device)
    s, b = cast(p.scale, dtype, device), cast(p.bias, dtype, device)
    y, yd = jf.ops.bsr_linear_jvp(x, xd, w, s, b, p.act, backend=backend)
    assert y.shape == (*p.lead, p.n) and yd.shape == (*xd.shape[:-1], p.n)
    assert yd.dtype == dtype and yd.device.type == device
    p.W, p.x, p.x_dot = Wd.double().cpu(), x.double().cpu(), xd.double().cpu()
    p.scale = None if s is None else s.double().cpu()
    p.bias = None if b is None else b.double().cpu()
    ref_y, ref_yd, pre = ref_jvp(p.x, p.x_dot, p.W, p.emask, p.scale, p.bias, p.act)
    tol_y, tol_pre, _ = forward_tol(p, dtype)
    no_kink(pre, tol_pre, p.act)
    check(y, ref_y, tol_y, "y", p)
    Wa, _, sa, _ = _abs(p)
    Md = p.x_dot.abs() @ Wa.T * sa
    # y_dot = act'(pre) s (x_dot W^T): its own reduction error plus act' taken from a y that is off
    # by tol_y (|d act'/dy| <= 2 for every activation); act' <= 1.
    tol_yd = 2 * Md * (gamma(p.k + 2, dtype) + 2 * _max(tol_y) + 8 * U[dtype])
    check(yd, ref_yd, tol_yd, "y_dot", p)


@pytest.mark.parametrize("backend,device", FAST, ids=_ids(FAST))
@budget(500)
@given(p=problems(tangents=True))
def test_jvp(backend, device, p):
    _jvp(backend, device, p)


@pytest.mark.parametrize("backend,device", SLOW, ids=_ids(SLOW))
@budget(25)
@given(p=problems(tiny=True, tangents=True))
def test_jvp_slow_backends(backend, device, p):
    _jvp(backend, device, p)


# ---- first-order gradients -------------------------------------------------------------------------
def _leaves(p, dtype, device, tangents):
    Wd, w = _weight(p, dtype, device, requires_grad=True)
    x = cast(p.x, dtype, device).requires_grad_(True)
    xd = cast(p.x_dot, dtype, device).requires_grad_(True) if tangents else None
    s = cast(p.scale, dtype, device)
    b = cast(p.bias, dtype, device)
    for t in (s, b):
        if t is not None:
            t.requires_grad_(True)
    return Wd, w, x, xd, s, b


def _ref_leaves(Wd, x, xd, s, b):
    out = []
    for t in (Wd, x, xd, s, b):
        out.append(None if t is None else t.detach().double().cpu().requires_grad_(True))
    return out


def _grads(loss, tensors, create_graph=False):
    live = [t for t in tensors if t is not None]
    gs = iter(torch.autograd.grad(loss, live, create_graph=create_graph, allow_unused=True))
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            g = next(gs)
            out.append(torch.zeros_like(t) if g is None else g)
    return out


def _gradients(backend, device, p, tangents):
    dtype = p.dtype
    Wd, w, x, xd, s, b = _leaves(p, dtype, device, tangents)
    g = cast(p.g, dtype, device)
    if tangents:
        gd = cast(p.g_dot, dtype, device)
        y, yd = jf.ops.bsr_linear_jvp(x, xd, w, s, b, p.act, backend=backend)
        loss = (y * g).sum() + (yd * gd).sum()
    else:
        y = jf.ops.bsr_linear(x, w, s, b, p.act, backend=backend)
        loss = (y * g).sum()
    got = _grads(loss, [Wd, x, xd, s, b])

    W64, x64, xd64, s64, b64 = _ref_leaves(Wd, x, xd, s, b)
    p.W, p.x, p.x_dot, p.scale, p.bias = (None if t is None else t.detach() for t in (W64, x64, xd64, s64, b64))
    if tangents:
        ry, ryd, pre = ref_jvp(x64, xd64, W64, p.emask, s64, b64, p.act)
        ref_loss = (ry * p.g).sum() + (ryd * p.g_dot).sum()
    else:
        ry, pre = ref_forward(x64, W64, p.emask, s64, b64, p.act)
        ref_loss = (ry * p.g).sum()
    ref = _grads(ref_loss, [W64, x64, xd64, s64, b64])

    tol_y, tol_pre, M = forward_tol(p, dtype)
    # relu' jumps at 0; so does elu'' (the JVP's backward uses it)
    no_kink(pre.detach(), tol_pre, p.act, ("relu", "elu") if tangents else ("relu",))
    Wa, xa, sa, _ = _abs(p)
    # |d y / d pre| <= 1 (A): the upstream magnitude reaching pre, per element
    A = p.g.abs()
    if tangents:
        xda = p.x_dot.abs()
        gda = p.g_dot.abs()
        if p.T == "single":
            xda, gda = xda.unsqueeze(0), gda.unsqueeze(0)
        Md = xda @ Wa.T  # |x_dot| |W|^T, per tangent
        A = A + (gda * Md * sa).sum(0)  # y_dot's dependence on pre through act'' (|act''| <= 1)
        B_ = gda * sa  # upstream reaching x_dot W^T
    mag = {
        "x": (A * sa) @ Wa,
        "W": ((A * sa).reshape(-1, p.n).T @ xa.reshape(-1, p.k)) * p.emask,
        "scale": (A * M).reshape(-1, p.n).sum(0),
        "bias": A.reshape(-1, p.n).sum(0),
    }
    if tangents:
        mag["W"] = mag["W"] + (B_.reshape(-1, p.n).T @ xda.reshape(-1, p.k)) * p.emask
        mag["scale"] = mag["scale"] + (gda * Md).reshape(-1, p.n).sum(0)
        mag["x_dot"] = (B_ @ Wa).reshape(p.x_dot.shape)
    batch = max(1, math.prod(p.lead)) * (1 if p.T in (None, "single") else p.T)
    # reductions over n (input grad), the batch (weight/scale/bias grads) and k (the product itself),
    # plus act'/act'' taken from a y that is off by tol_y (both have |d/dy| <= 2)
    rel = 2 * (gamma(p.n + p.k + 2 * batch + 8, dtype) + 4 * _max(tol_y) + 16 * U[dtype])
    names = ["W", "x", "x_dot", "scale", "bias"]
    for name, gt, rf in zip(names, got, ref):
        if rf is None:
            continue
        check(gt, rf, rel * mag[name] + 1e-300, f"grad {name}", p)
    # weights outside the kept blocks get exactly no gradient
    assert not bool(got[0].detach().cpu()[~p.emask].any()), "gradient leaked into pruned weights"


@pytest.mark.parametrize("backend,device", FAST, ids=_ids(FAST))
@budget(300)
@given(p=st.booleans().flatmap(lambda t: problems(tangents=t)))
def test_gradients(backend, device, p):
    _gradients(backend, device, p, p.T is not None)


@pytest.mark.parametrize("backend,device", SLOW, ids=_ids(SLOW))
@budget(20)
@given(p=st.booleans().flatmap(lambda t: problems(tiny=True, tangents=t)))
def test_gradients_slow_backends(backend, device, p):
    _gradients(backend, device, p, p.T is not None)


# ---- double backward (float64) ---------------------------------------------------------------------
def _gradgrad(backend, device, p, tangents):
    """d/dθ of <r, ∇L>: the second derivatives JSP scoring and trace-regularised training need."""
    dtype = torch.float64
    Wd, w, x, xd, s, b = _leaves(p, dtype, device, tangents)
    g = cast(p.g, dtype, device)
    leaves = [Wd, x, xd, s, b]
    gen = torch.Generator().manual_seed(p.seed + 2)
    rs = [None if t is None else torch.randn(t.shape, generator=gen, dtype=dtype) for t in leaves]

    def second(loss, ts):
        first = _grads(loss, ts, create_graph=True)
        inner = sum((f * r.to(f.device)).sum() for f, r in zip(first, rs) if f is not None and f.requires_grad)
        if not torch.is_tensor(inner) or not inner.requires_grad:
            return [None if t is None else torch.zeros_like(t) for t in ts]
        return _grads(inner, ts)

    if tangents:
        y, yd = jf.ops.bsr_linear_jvp(x, xd, w, s, b, p.act, backend=backend)
        got = second((y * g).sum() + (yd * cast(p.g_dot, dtype, device)).sum(), leaves)
    else:
        got = second((jf.ops.bsr_linear(x, w, s, b, p.act, backend=backend) * g).sum(), leaves)
    W64, x64, xd64, s64, b64 = _ref_leaves(Wd, x, xd, s, b)
    if tangents:
        ry, ryd, pre = ref_jvp(x64, xd64, W64, p.emask, s64, b64, p.act)
        ref = second((ry * p.g).sum() + (ryd * p.g_dot).sum(), [W64, x64, xd64, s64, b64])
    else:
        ry, pre = ref_forward(x64, W64, p.emask, s64, b64, p.act)
        ref = second((ry * p.g).sum(), [W64, x64, xd64, s64, b64])
    no_kink(pre.detach(), torch.full_like(pre, 1e-12), p.act, ("relu", "elu"))
    for name, gt, rf in zip(["W", "x", "x_dot", "scale", "bias"], got, ref):
        if rf is None:
            continue
        # float64 with O(1) data and reductions of <= a few hundred terms: errors are ~1e-13
        tol = 1e-9 * (1 + _max(rf.abs())) * torch.ones_like(rf)
        check(gt, rf, tol, f"gradgrad {name}", p)


@pytest.mark.parametrize("backend,device", FAST, ids=_ids(FAST))
@budget(150)
@given(p=st.booleans().flatmap(lambda t: problems(dtypes=[torch.float64], tangents=t)))
def test_double_backward(backend, device, p):
    _gradgrad(backend, device, p, p.T is not None)


@pytest.mark.parametrize("backend,device", SLOW, ids=_ids(SLOW))
@budget(8)
@given(p=st.booleans().flatmap(lambda t: problems(tiny=True, dtypes=[torch.float64], tangents=t)))
def test_double_backward_slow_backends(backend, device, p):
    _gradgrad(backend, device, p, p.T is not None)


# ---- bad inputs --------------------------------------------------------------------------------------
BAD = ["x_features", "x_dtype", "x_scalar", "scale_len", "scale_dtype", "bias_len", "x_dot_shape",
       "x_dot_dtype", "activation", "backend", "mask_unaligned", "weight_unaligned", "mask_shape",
       "block_nonpositive", "weight_int", "w_type"]


@budget(300)
@given(kind=st.sampled_from(BAD), bm=st.sampled_from(BLOCK_DIMS), bk=st.sampled_from(BLOCK_DIMS),
       nbr=st.integers(1, 4), nbc=st.integers(1, 4), batch=st.integers(0, 5),
       off=st.integers(1, 3), dtype=st.sampled_from(DTYPES), backend=st.sampled_from([c[0] for c in CASES]))
def test_bad_inputs_raise_clear_errors(kind, bm, bk, nbr, nbc, batch, off, dtype, backend):
    n, k = nbr * bm, nbc * bk
    other = torch.float64 if dtype == torch.float32 else torch.float32
    W = torch.randn(n, k, dtype=dtype)
    grid = torch.ones(nbr, nbc, dtype=torch.bool)
    x = torch.randn(batch, k, dtype=dtype)
    scale = bias = x_dot = None
    act = "tanh"
    build = lambda: BlockSparseWeight.from_dense(W, grid, block=(bm, bk))
    op = "fwd"
    if kind == "x_features":
        x = torch.randn(batch, k + off, dtype=dtype)
    elif kind == "x_dtype":
        x = x.to(other)
    elif kind == "x_scalar":
        x = torch.tensor(1.0, dtype=dtype)
    elif kind == "scale_len":
        scale = torch.ones(n + off, dtype=dtype)
    elif kind == "scale_dtype":
        scale = torch.ones(n, dtype=other)
    elif kind == "bias_len":
        bias = torch.ones(n + off, dtype=dtype)
    elif kind == "x_dot_shape":
        op, x_dot = "jvp", torch.randn(2, batch + off, k, dtype=dtype)
    elif kind == "x_dot_dtype":
        op, x_dot = "jvp", torch.randn(batch, k, dtype=other)
    elif kind == "activation":
        act = "gelu"
    elif kind == "backend":
        backend = "no-such-backend"
    elif kind == "mask_unaligned":
        assume(bm * bk > 1)
        emask = torch.zeros(n, k, dtype=torch.bool)
        emask[0, 0] = True  # one element of a bigger block
        build = lambda: BlockSparseWeight.from_dense(W, emask, block=(bm, bk))
    elif kind == "weight_unaligned":
        assume(bm > 1 or bk > 1)
        Wu = torch.randn(n + (off % bm if bm > 1 else 0), k + (off % bk if bk > 1 else 0), dtype=dtype)
        assume(tuple(Wu.shape) != (n, k))
        build = lambda: BlockSparseWeight.from_dense(Wu, None, block=(bm, bk))
    elif kind == "mask_shape":
        bad = torch.ones(nbr + off, nbc, dtype=torch.bool)
        build = lambda: BlockSparseWeight.from_dense(W, bad, block=(bm, bk))
    elif kind == "block_nonpositive":
        build = lambda: BlockSparseWeight.from_dense(W, grid, block=(0, bk))
    elif kind == "weight_int":
        build = lambda: BlockSparseWeight.from_dense(W.to(torch.int64), grid, block=(bm, bk))
    elif kind == "w_type":
        build = lambda: W
    with pytest.raises((ValueError, TypeError)) as info:
        w = build()
        if op == "fwd":
            jf.ops.bsr_linear(x, w, scale=scale, bias=bias, activation=act, backend=backend)
        else:
            jf.ops.bsr_linear_jvp(x, x_dot, w, scale, bias, act, backend=backend)
    assert len(str(info.value)) > 20, f"unhelpful message for {kind}: {info.value!r}"
