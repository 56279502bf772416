"""SparseODEnet against ODEnet: forward/jvp on fresh random data, the fused C++ field against the
per-layer path, odd batch sizes, empty block rows, every activation, bad inputs.

Tolerances: float64 comparisons are at 1e-12 relative (both sides do the same products in a
different order); float32 at 2e-5 relative to the output's scale (the fused float32 tanh is a
rational approximation good to a few ulp, and the summation order differs from MKL's).
"""
from __future__ import annotations

import pytest
import torch
import torchdiffeq

from jsp_fast.cnf import ACTIVATIONS, ODEnet
import jsp_fast as jf
from jsp_fast.sparse._field import BlockSparseConcatSquash, DenseConcatSquash, SparseODEnet

BLOCK = (8, 8)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
HAS_FUSED = "cpu" in jf.backends.available(fused=True)
needs_fused = pytest.mark.skipif(not HAS_FUSED, reason="jsp_fast._C has no fused field")


def _block_mask(n, k, density, gen, block=BLOCK, empty_row=True):
    bm, bk = block
    g = torch.rand(n // bm, k // bk, generator=gen) < density
    if empty_row:
        g[0] = False  # an output block row with no kept block: its outputs are act(shift) only
    return g.repeat_interleave(bm, 0).repeat_interleave(bk, 1)


def _pruned_odenet(dim, hidden, act="tanh", dtype=torch.float64, density=0.4, seed=0, block=BLOCK):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ODEnet(dim, hidden, act).to(dtype)
    with torch.no_grad():
        for layer in net.layers:  # non-trivial gates and shifts
            layer.hyper_gate.weight.normal_(0, 1, generator=gen)
            layer.hyper_bias.weight.normal_(0, 0.5, generator=gen)
            layer.linear.bias.normal_(0, 0.5, generator=gen)
            n, k = layer.linear.weight.shape
            if n % block[0] == 0 and k % block[1] == 0:
                layer.set_mask(_block_mask(n, k, density, gen, block))
    return net


def _close(a, b, dtype):
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= TOL[dtype] * scale, (a - b).abs().max().item()


def _data(B, D, T, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=gen, dtype=dtype)
    v = torch.randn(T, B, D, generator=gen, dtype=dtype)
    return torch.tensor(0.37, dtype=dtype), z, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("B,T", [(1, 1), (13, 3), (37, 2), (101, 1)])
def test_forward_jvp_match_odenet(dtype, fused, B, T):
    if fused and not HAS_FUSED:
        pytest.skip("no fused field")
    net = _pruned_odenet(16, (24, 40), dtype=dtype)
    snet = SparseODEnet.from_odenet(net, fused=fused)
    assert set(snet.sparse_layers) == {0, 1, 2} and snet.dense_layers == {}
    t, z, v = _data(B, 16, T, dtype)
    with torch.no_grad():
        f0, j0 = net.jvp(t, z, v)
        f1, j1 = snet.jvp(t, z, v)
        f2 = snet(t, z)
    assert f1.shape == (B, 16) and j1.shape == (T, B, 16)
    _close(f1, f0, dtype)
    _close(j1, j0, dtype)
    _close(f2, net(t, z), dtype)
    assert (snet._plan is not None) == fused


@needs_fused
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_matches_per_layer_every_activation(act, dtype):
    # dim 3 and widths that are not multiples of the SIMD panel: padded panels and dense layers.
    net = _pruned_odenet(3, (48, 40, 56), act=act, dtype=dtype, density=0.5)
    fused = SparseODEnet.from_odenet(net)
    slow = SparseODEnet.from_odenet(net, fused=False)
    assert set(fused.dense_layers) == {0, 3}
    t, z, v = _data(77, 3, 3, dtype)
    with torch.no_grad():
        f0, j0 = slow.jvp(t, z, v)
        f1, j1 = fused.jvp(t, z, v)
        # The exact-trace tangents the CNF passes: an expanded (non-contiguous) identity.
        eye = torch.eye(3, dtype=dtype).unsqueeze(1).expand(3, 77, 3)
        _, je0 = slow.jvp(t, z, eye)
        _, je1 = fused.jvp(t, z, eye)
    _close(f1, f0, dtype)
    _close(j1, j0, dtype)
    _close(je1, je0, dtype)


@needs_fused
def test_fused_large_batch_and_wide_layers_float32():
    # Several tiles per thread, a 256-wide layer and a fully pruned block row.
    net = _pruned_odenet(32, (256, 128), dtype=torch.float32, density=0.2, block=(32, 32))
    snet = SparseODEnet.from_odenet(net)
    t, z, v = _data(1531, 32, 1, torch.float32)
    with torch.no_grad():
        f0, j0 = net.jvp(t, z, v)
        f1, j1 = snet.jvp(t, z, v)
    _close(f1, f0, torch.float32)
    _close(j1, j0, torch.float32)


@needs_fused
def test_fused_plan_repacks_after_parameter_update():
    net = _pruned_odenet(16, (24,), dtype=torch.float64, density=0.9)
    snet = SparseODEnet.from_odenet(net)
    t, z, _ = _data(9, 16, 1, torch.float64)
    with torch.no_grad():
        before = snet(t, z)
        plan = snet._plan
        for layer in snet.layers:
            layer.values.mul_(2.0)  # in place, as an optimizer step does
        after = snet(t, z)
    assert snet._plan is not plan
    slow = SparseODEnet.from_odenet(snet.to_odenet(), fused=False)
    with torch.no_grad():
        _close(after, slow(t, z), torch.float64)
    assert not torch.allclose(before, after)


def test_gradients_use_per_layer_path_and_reach_blocks():
    net = _pruned_odenet(16, (24, 40), dtype=torch.float64)
    snet = SparseODEnet.from_odenet(net)
    t, z, v = _data(11, 16, 2, torch.float64)
    f, jv = snet.jvp(t, z, v)
    assert snet._plan is None  # gradients needed: no fused call
    (f.square().sum() + jv.square().sum()).backward()
    f0, j0 = net.jvp(t, z, v)
    (f0.square().sum() + j0.square().sum()).backward()
    for src, dst in zip(net.layers, snet.layers):
        bm, bk = dst.block
        n, k = src.linear.weight.shape
        g = src.linear.weight.grad.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)
        _close(dst.values.grad, g[dst.block_rows, dst.block_cols], torch.float64)
        _close(dst.bias.grad, src.linear.bias.grad, torch.float64)
        _close(dst.hyper_gate.weight.grad, src.hyper_gate.weight.grad, torch.float64)
        _close(dst.hyper_gate.bias.grad, src.hyper_gate.bias.grad, torch.float64)
        _close(dst.hyper_bias.weight.grad, src.hyper_bias.weight.grad, torch.float64)


def test_inside_plain_torchdiffeq():
    net = _pruned_odenet(16, (24,), dtype=torch.float64)
    snet = SparseODEnet.from_odenet(net)
    _, z, _ = _data(5, 16, 1, torch.float64)
    ts = torch.tensor([0.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        a = torchdiffeq.odeint(net, z, ts, rtol=1e-9, atol=1e-9)[-1]
        b = torchdiffeq.odeint(snet, z, ts, rtol=1e-9, atol=1e-9)[-1]
    _close(b, a, torch.float64)


def test_dense_layer_reasons_and_roundtrip():
    net = _pruned_odenet(16, (24, 40), dtype=torch.float64)
    net.layers[0].set_mask(None)
    net.layers[1].set_mask(torch.rand(40, 24) < 0.5)  # unstructured
    net.layers[2].set_mask(torch.ones(16, 40, dtype=torch.bool))
    snet = SparseODEnet.from_odenet(net)
    assert isinstance(snet.layers[0], DenseConcatSquash) and "no weight_mask" in snet.dense_layers[0]
    assert "not block-aligned" in snet.dense_layers[1]
    assert "every weight" in snet.dense_layers[2]
    assert "dense_layers" in repr(snet)
    snet2 = SparseODEnet.from_odenet(_pruned_odenet(16, (24, 40)), block=(8, 4))
    assert all(isinstance(l, BlockSparseConcatSquash) for l in snet2.layers)
    assert SparseODEnet.from_odenet(_pruned_odenet(16, (24, 40)), block=16).dense_layers.keys() == {0, 1, 2}
    back = snet.to_odenet()
    t, z, v = _data(7, 16, 1, torch.float64)
    with torch.no_grad():
        _close(back(t, z), net(t, z), torch.float64)


def test_bad_inputs():
    net = _pruned_odenet(16, (24,))
    with pytest.raises(TypeError):
        SparseODEnet.from_odenet(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="backend"):
        SparseODEnet.from_odenet(net, backend="nope")
    with pytest.raises(ValueError, match="block"):
        SparseODEnet.from_odenet(net, block=(0, 8))
    snet = SparseODEnet.from_odenet(net)
    t, z, v = _data(4, 16, 1, torch.float64)
    with pytest.raises(ValueError, match="v must have shape"):
        snet.jvp(t, z, v[:, :3])


@needs_fused
def test_fused_binding_checks_arguments():
    from jsp_fast import _C

    net = _pruned_odenet(16, (24,), dtype=torch.float32)
    plan = SparseODEnet.from_odenet(net).fused_plan(torch.float32)
    z = torch.randn(4, 16)
    f = torch.empty(4, 16)
    with pytest.raises(ValueError, match="dtype"):
        plan.eval(0.0, z.double().numpy(), None, f.numpy(), None)
    with pytest.raises(ValueError, match="dim 1"):
        plan.eval(0.0, torch.randn(4, 15).numpy(), None, f.numpy(), None)
    with pytest.raises(ValueError, match="jv is required"):
        plan.eval(0.0, z.numpy(), torch.randn(1, 4, 16).numpy(), f.numpy(), None)
    with pytest.raises(ValueError, match="inputs but the previous layer"):
        p = _C.FieldPlanF32()
        one = torch.ones(24)
        p.add_layer(torch.randn(24, 16).numpy(), None, one.numpy(), one.numpy(), one.numpy(), None, 1)
        p.add_layer(torch.randn(16, 23).numpy(), None, one[:16].numpy(), one[:16].numpy(), one[:16].numpy(), None, 0)
    with pytest.raises(ValueError, match="mask"):
        _C.FieldPlanF32().add_layer(torch.randn(24, 16).numpy(), torch.ones(24, 15, dtype=torch.uint8).numpy(),
                                    one.numpy(), one.numpy(), one.numpy(), None, 1)
