"""The "triton" backend through the public ops (``jf.ops.bsr_linear[_jvp]``) against the torch backend.

Values, tangents and first and second derivatives (the ops' autograd calls the backend's transposed
product and weight gradient). On the CPU this runs under TRITON_INTERPRET=1, where the backend is
registered with a priority below "torch" so "auto" never picks it.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_util import INTERPRET, skip_unless_triton_runs  # noqa: E402

import jsp_fast as jf  # noqa: E402
from jsp_fast.sparse import BlockSparseWeight  # noqa: E402
from jsp_fast.sparse.backends import triton as triton_backend  # noqa: E402

SHAPES = {"cpu": dict(B=23, n=48, k=32, block=(16, 16)), "cuda": dict(B=2051, n=512, k=384, block=(32, 32))}


def _weight(device, dtype, seed, requires_grad=False):
    sh = SHAPES[device]
    gen = torch.Generator().manual_seed(seed)
    n, k, (bm, bk) = sh["n"], sh["k"], sh["block"]
    grid = torch.rand(n // bm, k // bk, generator=gen) < 0.5
    grid[0] = False
    grid[-1, -1] = True
    mask = grid.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    W = torch.randn(n, k, generator=gen, dtype=torch.float64) / k ** 0.5
    w = BlockSparseWeight.from_dense(W.to(device, dtype), mask.to(device), block=(bm, bk))
    if requires_grad:
        w.values.requires_grad_(True)
    x = torch.randn(sh["B"], k, generator=gen, dtype=torch.float64).to(device, dtype)
    scale = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(device, dtype)
    bias = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype)
    return w, x, scale, bias, gen


def test_registered():
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    assert "triton" in jf.backends.available()
    if INTERPRET:  # interpreter: never the automatic choice on the CPU
        assert jf.backends.resolve("auto", torch.device("cpu"), torch.float32) != "triton"


@pytest.mark.parametrize("act", ["tanh", "softplus", "relu"])
def test_ops_forward_and_jvp(device, act):
    skip_unless_triton_runs(device)
    w, x, scale, bias, gen = _weight(device, torch.float32, 1)
    y_t = jf.ops.bsr_linear(x, w, scale, bias, act, backend="triton")
    y_r = jf.ops.bsr_linear(x, w, scale, bias, act, backend="torch")
    torch.testing.assert_close(y_t, y_r, rtol=1e-5, atol=1e-5)
    xd = torch.randn(2, *x.shape, generator=gen).to(device)
    y_t, yd_t = jf.ops.bsr_linear_jvp(x, xd, w, scale, bias, act, backend="triton")
    y_r, yd_r = jf.ops.bsr_linear_jvp(x, xd, w, scale, bias, act, backend="torch")
    torch.testing.assert_close(y_t, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yd_t, yd_r, rtol=1e-5, atol=1e-5)


def _grads(backend, device, act, double):
    w, x, scale, bias, gen = _weight(device, torch.float64, 2, requires_grad=True)
    x.requires_grad_(True), scale.requires_grad_(True), bias.requires_grad_(True)
    xd = torch.randn(1, *x.shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    y, yd = jf.ops.bsr_linear_jvp(x, xd, w, scale, bias, act, backend=backend)
    loss = (y ** 2).sum() + (yd ** 2).sum()
    leaves = (x, xd, w.values, scale, bias)
    grads = torch.autograd.grad(loss, leaves, create_graph=double)
    if double:  # differentiate a gradient norm again (training through the trace)
        grads = torch.autograd.grad(sum((g ** 2).sum() for g in grads[:2]), leaves, allow_unused=True)
    return grads


@pytest.mark.parametrize("double", [False, True], ids=["grad", "double-grad"])
def test_ops_autograd(device, double):
    skip_unless_triton_runs(device)
    for a, b in zip(_grads("triton", device, "tanh", double), _grads("torch", device, "tanh", double)):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_field_plan_matches_sparse_odenet(device):
    """``field_plan`` (one fused launch) agrees with a sparsified field's per-layer jvp."""
    skip_unless_triton_runs(device)
    from jsp_fast.cnf import ODEnet  # noqa: PLC0415
    from jsp_fast.sparse import SparseODEnet  # noqa: PLC0415

    torch.manual_seed(0)
    dim, hidden, blk = (2, (32, 32), 16) if device == "cpu" else (8, (256, 256), 32)
    net = ODEnet(dim, hidden, "tanh").double()
    for layer in net.layers[1:-1]:
        n, k = layer.linear.weight.shape
        g = torch.rand(n // blk, k // blk) < 0.5
        layer.set_mask(g.repeat_interleave(blk, 0).repeat_interleave(blk, 1))
    sparse = SparseODEnet.from_odenet(net, backend="torch", fused=False).to(device)
    plan = triton_backend.field_plan(sparse)
    assert plan.block == (blk, blk)
    z = torch.randn(19, dim, dtype=torch.float64, device=device)
    eps = torch.randn(19, dim, dtype=torch.float64, device=device)
    t = torch.tensor(0.5, dtype=torch.float64, device=device)
    with torch.no_grad():
        f_ref, je_ref = sparse.jvp(t, z, eps[None])
    f, je = plan(z, eps, t=t)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(je, je_ref[0], rtol=1e-10, atol=1e-10)
