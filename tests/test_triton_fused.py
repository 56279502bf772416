"""The fused whole-field Triton kernel against a float64 torch reference of the same math.

Per layer: pre = s * (h W^T) + b, h = act(pre) (not on the last layer), hd = act'(pre) * s * (hd W^T).
On the CPU it runs under TRITON_INTERPRET=1 on small fields; with a GPU the same bodies run at widths
up to 512. float32 results must be within ~2x torch's own float32 error (+ a small floor).
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from _triton_util import ACTS, act_grad_ref, act_ref, skip_unless_triton_runs  # noqa: E402

from jsp_fast.sparse.backends.triton import FusedFieldPlan, fused_field  # noqa: E402


def field_ref(z, eps, layers, act):
    """float-any torch reference; ``eps`` [T, B, D] or None."""
    h, hd = z, eps
    last = len(layers) - 1
    for i, (w, s, b) in enumerate(layers):
        prod = h @ w.T
        pre = prod * (s if s is not None else 1) + (b if b is not None else 0)
        g = s if s is not None else torch.ones_like(pre[0])
        if i < last:
            h = act_ref(act, pre)
            g = act_grad_ref(act, pre) * g
        else:
            h = pre
        if hd is not None:
            hd = g * (hd @ w.T)
    return h, hd


def make_layers(dims, block, kind, gen, dtype, device, with_scale=True, with_bias=True):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = torch.randn(b, a, generator=gen, dtype=torch.float64) / a ** 0.5 * 1.5
        hidden = 0 < i < len(dims) - 2
        if hidden and kind != "dense":
            gb, ga = -(-b // block), -(-a // block)
            g = torch.rand(gb, ga, generator=gen) < 0.4
            g[0] = False                                   # an empty block row
            if kind == "single":
                g = torch.zeros(gb, ga, dtype=torch.bool)
                g[gb - 1, 0] = True
            m = g.repeat_interleave(block, 0).repeat_interleave(block, 1)[:b, :a]
            w = w * m
        s = (0.5 + torch.rand(b, generator=gen, dtype=torch.float64)) if with_scale else None
        bb = torch.randn(b, generator=gen, dtype=torch.float64) * 0.5 if with_bias else None
        cast = lambda v: None if v is None else v.to(device, dtype)  # noqa: E731
        layers.append((cast(w), cast(s), cast(bb)))
    return layers


SHAPES = {"cpu": dict(B=37, dims=(2, 32, 48, 2), block=16),
          "cuda": dict(B=10007, dims=(16, 512, 512, 512, 16), block=32)}


def _close(ours, ref64, torch32, dtype):
    err = (ours.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    if dtype == torch.float64:
        assert err <= 1e-10 * scale, err
        return
    base = (torch32.double() - ref64).abs().max().item()
    assert err <= 2 * base + 2e-6 * scale, (err, base)


def _run(device, act="tanh", kind="random", T=1, with_scale=True, with_bias=True, dtype=torch.float32, seed=0,
         squeeze=True, shape=None, **call):
    skip_unless_triton_runs(device)
    sh = dict(SHAPES[device], **(shape or {}))
    gen = torch.Generator().manual_seed(seed)
    layers = make_layers(sh["dims"], sh["block"], kind, gen, dtype, device, with_scale, with_bias)
    D = sh["dims"][0]
    z = torch.randn(sh["B"], D, generator=gen, dtype=torch.float64).to(device, dtype)
    eps = None if T == 0 else torch.randn(T, sh["B"], D, generator=gen, dtype=torch.float64).to(device, dtype)
    e_in = eps[0] if (eps is not None and squeeze and T == 1) else eps
    f, je = fused_field(z, e_in, layers, act, block=sh["block"], **call)
    d64 = [tuple(None if v is None else v.double() for v in l) for l in layers]
    f_ref, je_ref = field_ref(z.double(), None if eps is None else eps.double(), d64, act)
    f32, je32 = field_ref(z, eps, layers, act)
    assert f.shape == z.shape and f.dtype == dtype
    _close(f, f_ref, f32, dtype)
    if T == 0:
        assert je is None
        return
    if squeeze and T == 1:
        assert je.shape == z.shape
        je = je[None]
    assert je.shape == (T, *z.shape)
    _close(je, je_ref, je32, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_fused_activations(device, act):
    _run(device, act, seed=ACTS.index(act))


@pytest.mark.parametrize("with_scale,with_bias", [(False, False), (True, False), (False, True)])
def test_fused_epilogue_variants(device, with_scale, with_bias):
    _run(device, "softplus", with_scale=with_scale, with_bias=with_bias, seed=11)


@pytest.mark.parametrize("kind", ["dense", "single"])
def test_fused_layouts(device, kind):
    _run(device, "tanh", kind=kind, seed=12)


def test_fused_value_only(device):
    _run(device, "elu", T=0, seed=13)


def test_fused_many_tangents_chunked(device):
    # T=3 tangents with at most 2 per launch: two launches, the second one partial
    skip_unless_triton_runs(device)
    sh = SHAPES[device]
    gen = torch.Generator().manual_seed(14)
    layers = make_layers(sh["dims"], sh["block"], "random", gen, torch.float64, device)
    z = torch.randn(sh["B"], sh["dims"][0], generator=gen, dtype=torch.float64).to(device)
    eps = torch.randn(3, *z.shape, generator=gen, dtype=torch.float64).to(device)
    plan = FusedFieldPlan([w for w, _, _ in layers], block=sh["block"], activation="sigmoid", max_tangents=2)
    f, je = plan(z, eps, [s for _, s, _ in layers], [b for _, _, b in layers])
    f_ref, je_ref = field_ref(z, eps, layers, "sigmoid")
    _close(f, f_ref, None, torch.float64)
    _close(je, je_ref, None, torch.float64)


def test_fused_float64_and_persistent_tiles(device):
    # more batch tiles than programs: every program walks several tiles
    B = 70 if device == "cpu" else 100_003
    _run(device, "tanh", dtype=torch.float64, seed=15, T=2, shape=dict(B=B), max_programs=2)


def test_fused_small_blocks(device):
    # 8x8 blocks: the broadcast-sum path instead of tl.dot
    _run(device, "relu", seed=16, shape=dict(block=8, dims=(3, 24, 16, 3)))


def test_fused_concatsquash_odenet(device):
    """``from_specs`` with the time gate computed in the kernel agrees with ``ODEnet.jvp``."""
    skip_unless_triton_runs(device)
    from jsp_fast.cnf import ODEnet  # noqa: PLC0415

    torch.manual_seed(0)
    dims = (2, (32, 32)) if device == "cpu" else (8, (256, 256, 256))
    net = ODEnet(dims[0], dims[1], "softplus").double().to(device)
    blk = 16 if device == "cpu" else 32
    for layer in net.layers[1:-1]:
        n, k = layer.linear.weight.shape
        g = torch.rand(n // blk, k // blk) < 0.5
        layer.set_mask(g.repeat_interleave(blk, 0).repeat_interleave(blk, 1).to(device))
        with torch.no_grad():
            layer.hyper_gate.weight.normal_()
            layer.hyper_bias.weight.normal_()
    specs = []
    for layer in net.layers:
        specs.append((layer.effective_weight(), layer.mask, layer.hyper_gate.weight, layer.hyper_gate.bias,
                      layer.hyper_bias.weight, layer.linear.bias))
    plan = FusedFieldPlan.from_specs(specs, "softplus", block=blk)
    B = 29 if device == "cpu" else 4099
    z = torch.randn(B, dims[0], dtype=torch.float64, device=device)
    eps = torch.randn(B, dims[0], dtype=torch.float64, device=device)
    t = torch.tensor(0.37, dtype=torch.float64, device=device)
    with torch.no_grad():
        f_ref, je_ref = net.jvp(t, z, eps[None])
    f, je = plan(z, eps, t=t)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(je, je_ref[0], rtol=1e-10, atol=1e-10)
    # float32 inputs against the float64 net (the plan keeps float64 weights: cast per call)
    f32, je32 = plan(z.float(), eps.float(), t=t.float())
    torch.testing.assert_close(f32.double(), f_ref, rtol=1e-4, atol=1e-5)


def test_fused_rejects_bad_inputs():
    skip_unless_triton_runs("cpu")
    gen = torch.Generator().manual_seed(0)
    layers = make_layers((2, 32, 2), 16, "dense", gen, torch.float32, "cpu")
    plan = FusedFieldPlan([w for w, _, _ in layers], block=16)
    z = torch.randn(5, 2)
    with pytest.raises(ValueError, match="z must be"):
        plan(torch.randn(5, 3))
    with pytest.raises(ValueError, match="eps"):
        plan(z, torch.randn(4, 2))
    with pytest.raises(ValueError, match="hyper"):
        plan(z, t=torch.tensor(0.0))
    with pytest.raises(ValueError, match="map back"):
        FusedFieldPlan([torch.randn(32, 2), torch.randn(3, 32)])
    with pytest.raises(ValueError, match="feed"):
        FusedFieldPlan([torch.randn(32, 2), torch.randn(2, 16)])
