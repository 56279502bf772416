"""Drop-in: jf.sparsify / jf.prune / jf.CNF on fields written independently of jsp_fast.

The fields below are written here the way other code bases write them (FFJORD's concatsquash layout
``_layer``/``_hyper_gate``/``_hyper_bias``, an ``nn.Sequential`` MLP on ``cat([z, t])``, a field with a
part that is not prunable). float64 throughout: the sparsified copy evaluates the same function to
~1e-15, so forward passes agree to 1e-12 and adaptive solves (same steps) far below their tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from torch import nn
from torch.nn.utils import prune as torch_prune

import jsp_fast as jf
from jsp_fast.sparse import BlockSparseLinear, SparseODEnet
from jsp_fast.sparse._convert import ConcatSquashBlock, MaskedLinear, SplitBlockLinear

DT = torch.float64
TIGHT = 1e-12
SOLVE = dict(rtol=1e-9, atol=1e-9, method="dopri5")


# ---- fields as other code bases write them -----------------------------------------------------------
class FfjordConcatSquash(nn.Module):
    """FFJORD's diffeq_layers.ConcatSquashLinear (same names and forward)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(t.view(1, 1))


class FfjordODEnet(nn.Module):
    """FFJORD's ODEnet for flat data: concatsquash layers, an activation module between them."""

    def __init__(self, dim, hidden, act=nn.Softplus):
        super().__init__()
        dims = [dim, *hidden, dim]
        self.layers = nn.ModuleList(FfjordConcatSquash(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation_fns = nn.ModuleList(act() for _ in hidden)

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class SeqField(nn.Module):
    """A torchdiffeq right-hand side with time concatenated to the state."""

    def __init__(self, dim, width, act=nn.Tanh, t_first=False):
        super().__init__()
        self.t_first = t_first
        self.mlp = nn.Sequential(nn.Linear(dim + 1, width), act(), nn.Linear(width, width), act(),
                                 nn.Linear(width, dim))

    def forward(self, t, z):
        tt = t.expand(z.shape[0], 1)
        return self.mlp(torch.cat([tt, z] if self.t_first else [z, tt], dim=1))


class MixedField(nn.Module):
    """Prunable layers plus a part that is not: a LayerNorm, a learned scale, a time embedding."""

    def __init__(self, dim, width):
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.inp = nn.Linear(dim, width)
        self.norm = nn.LayerNorm(width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.ELU())
        self.out = nn.Linear(width, dim)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, t, z):
        h = torch.tanh(self.norm(self.inp(z) + self.embed(t.reshape(1, 1))))
        return self.out(self.body(h) + h) * self.scale


# ---- helpers -------------------------------------------------------------------------------------------
def block_mask(n, k, block, density=0.4, seed=0, edge=0):
    """bool [n, k]: random whole blocks over the first k - edge columns (at least one kept block, and at
    least one pruned), the last ``edge`` columns kept."""
    g = torch.Generator().manual_seed(seed)
    bm, bk = block
    grid = torch.rand((n // bm, (k - edge) // bk), generator=g) < density
    grid.view(-1)[0] = True
    grid.view(-1)[-1] = False
    m = grid.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    return torch.cat([m, torch.ones(n, edge, dtype=torch.bool)], 1) if edge else m


def t_(v):
    return torch.tensor(v, dtype=DT)


def z_(n=9, dim=8, seed=3):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


def pruning_hooks(module):
    return [h for m in module.modules() for h in m._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod)]


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(module, before):
    after = module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def ffjord_field(dim=8, hidden=(32, 32), act=nn.Softplus, block=(8, 8), seed=0):
    torch.manual_seed(seed)
    f = FfjordODEnet(dim, hidden, act).to(DT)
    for i, layer in enumerate(f.layers):
        n, k = layer._layer.weight.shape
        if n % block[0] == 0 and k % block[1] == 0:
            torch_prune.custom_from_mask(layer._layer, "weight", block_mask(n, k, block, seed=seed + i))
    return f


# ---- concatsquash fields and layers -----------------------------------------------------------------------
@pytest.mark.parametrize("act,name", [(nn.Softplus, "softplus"), (nn.Tanh, "tanh"), (nn.ELU, "elu")])
def test_ffjord_field_maps_onto_the_fused_field(act, name):
    f = ffjord_field(act=act)
    before, hooks = snapshot(f), len(pruning_hooks(f))
    fast = jf.sparsify(f)
    assert isinstance(fast, SparseODEnet) and fast.activation == name
    assert set(fast.sparse_layers) == {0, 1, 2} and fast.sparse_layers[1] == (8, 8)
    rep = fast.sparsify_report
    assert set(rep.converted) == {"layers.0._layer", "layers.1._layer", "layers.2._layer"}
    assert all(r.mask_source == "torch.nn.utils.prune" for r in rep.layers)
    assert "SparseODEnet" in str(rep)
    z, ts = z_(), torch.tensor([0.0, 1.0], dtype=DT)
    with torch.no_grad():
        for t in (0.0, 0.63):
            assert (fast(t_(t), z) - f(t_(t), z)).abs().max() < TIGHT
        ref = torchdiffeq.odeint(f, z, ts, **SOLVE)
        out = torchdiffeq.odeint(fast, z, ts, **SOLVE)
    assert (out - ref).abs().max() < 1e-10
    assert_same_state(f, before)  # the original is untouched, hooks included
    assert len(pruning_hooks(f)) == hooks == 3 and not pruning_hooks(fast)


def test_ffjord_field_in_a_cnf_log_prob_and_sample():
    f = ffjord_field(hidden=(16, 16), block=(8, 8))
    dense = jf.CNF(8, net=f, rtol=1e-9, atol=1e-9).to(DT)  # no jvp: traces through torch.func.jvp
    fast = jf.sparsify(dense)
    assert isinstance(fast, jf.CNF) and isinstance(fast.net, SparseODEnet)
    assert set(fast.sparsify_report.converted) == {"net.layers.0._layer", "net.layers.1._layer",
                                                   "net.layers.2._layer"}
    x = z_(11)
    ref = dense.log_prob(x)
    assert (fast.log_prob(x) - ref).abs().max() < 1e-8
    with torch.no_grad():
        assert (fast.log_prob(x) - ref).abs().max() < 1e-8  # the one-call fused field
    assert (fast.sample(7, seed=2) - dense.sample(7, seed=2)).abs().max() < 1e-8


def test_concatsquash_layers_outside_a_field_convert_one_by_one():
    # Swish has no kernel activation: not a SparseODEnet, but each concatsquash layer is one kernel call.
    f = ffjord_field(act=Swish)
    fast = jf.sparsify(f)
    assert type(fast) is FfjordODEnet
    assert all(isinstance(layer, ConcatSquashBlock) for layer in fast.layers)
    assert all("concatsquash layer" in r.part_of for r in fast.sparsify_report.converted.values())
    z = z_()
    with torch.no_grad():
        assert (fast(t_(0.4), z) - f(t_(0.4), z)).abs().max() < TIGHT
    # Gradients reach the kept blocks and the hyper-layers, like the masked dense original's.
    fast(t_(0.4), z).square().sum().backward()
    f(t_(0.4), z).square().sum().backward()
    src, dst = f.layers[1], fast.layers[1].layer
    torch.testing.assert_close(dst.hyper_gate.weight.grad, src._hyper_gate.weight.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dst.bias.grad, src._layer.bias.grad, rtol=1e-9, atol=1e-12)
    g = src._layer.weight_orig.grad * src._layer.weight_mask
    bm, bk = dst.block
    n, k = g.shape
    g = g.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)[dst.block_rows, dst.block_cols]
    torch.testing.assert_close(dst.values.grad, g, rtol=1e-9, atol=1e-12)


def test_a_look_alike_with_another_forward_is_not_taken_for_a_concatsquash_layer():
    class NotSquash(FfjordConcatSquash):
        def forward(self, t, x):  # gate without the sigmoid
            return self._layer(x) * self._hyper_gate(t.view(1, 1)) + self._hyper_bias(t.view(1, 1))

    torch.manual_seed(0)
    m = NotSquash(16, 16).to(DT)
    torch_prune.custom_from_mask(m._layer, "weight", block_mask(16, 16, (8, 8)))
    fast = jf.sparsify(m)
    assert isinstance(fast._layer, BlockSparseLinear)  # converted as a plain layer, its forward kept
    z = z_(5, 16)
    with torch.no_grad():
        assert (fast(t_(0.3), z) - m(t_(0.3), z)).abs().max() < TIGHT


# ---- nn.Sequential fields with a concatenated time ----------------------------------------------------
@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus, nn.ELU, nn.ReLU, nn.Sigmoid, nn.SiLU])
@pytest.mark.parametrize("t_first", [False, True])
def test_sequential_field_with_concatenated_time(act, t_first):
    torch.manual_seed(1)
    f = SeqField(16, 32, act, t_first).to(DT)
    edge_masks = block_mask(32, 17, (8, 8), seed=1, edge=1)
    if t_first:
        edge_masks = torch.roll(edge_masks, 1, dims=1)
    torch_prune.custom_from_mask(f.mlp[0], "weight", edge_masks)
    torch_prune.custom_from_mask(f.mlp[2], "weight", block_mask(32, 32, (8, 8), seed=2))
    torch_prune.custom_from_mask(f.mlp[4], "weight", block_mask(16, 32, (8, 8), seed=3))
    fast = jf.sparsify(f)
    rep = fast.sparsify_report
    assert isinstance(fast.mlp[0], SplitBlockLinear) and isinstance(fast.mlp[2], BlockSparseLinear)
    assert fast.mlp[0].edge_cols == ((0, 1) if t_first else (16, 17))
    if act is nn.SiLU:
        assert isinstance(fast.mlp[3], nn.SiLU) and fast.mlp[2].activation == "none"
        assert any("SiLU" in n for n in rep.notes)
    else:
        assert isinstance(fast.mlp[3], nn.Identity) and fast.mlp[2].activation != "none"
    z, ts = z_(7, 16), torch.tensor([0.0, 0.7], dtype=DT)
    with torch.no_grad():
        assert (fast(t_(0.2), z) - f(t_(0.2), z)).abs().max() < TIGHT
        ref = torchdiffeq.odeint(f, z, ts, **SOLVE)
        assert (torchdiffeq.odeint(fast, z, ts, **SOLVE) - ref).abs().max() < 1e-10
    # With a gradient (the unfused edge path) the value agrees too, and gradients reach the input.
    zg = z.clone().requires_grad_(True)
    zr = z.clone().requires_grad_(True)
    fast(t_(0.2), zg).sum().backward()
    f(t_(0.2), zr).sum().backward()
    torch.testing.assert_close(zg.grad, zr.grad, rtol=1e-9, atol=1e-12)


def test_sequential_in_a_cnf_exact_trace_and_hutchinson():
    torch.manual_seed(2)
    f = SeqField(4, 16).to(DT)
    torch_prune.custom_from_mask(f.mlp[2], "weight", block_mask(16, 16, (4, 4), seed=5))
    for trace in ("exact", "hutchinson"):
        dense = jf.CNF(4, net=f, trace=trace, rtol=1e-9, atol=1e-9).to(DT)
        fast = jf.sparsify(dense)
        x = z_(13, 4)
        torch.manual_seed(4)
        ref = dense.log_prob(x)
        torch.manual_seed(4)
        out = fast.log_prob(x)
        assert (out - ref).abs().max() < 1e-8, trace


# ---- torch.nn.utils.prune masks: block-aligned and unstructured; explicit masks --------------------------
def test_unstructured_torch_masks_stay_dense_and_are_reported():
    torch.manual_seed(3)
    f = SeqField(16, 32).to(DT)
    torch_prune.l1_unstructured(f.mlp[2], "weight", amount=0.6)
    torch_prune.custom_from_mask(f.mlp[4], "weight", block_mask(16, 32, (8, 8)))
    fast = jf.sparsify(f)
    rep = fast.sparsify_report
    assert isinstance(fast.mlp[2], MaskedLinear) and isinstance(fast.mlp[3], nn.Tanh)
    assert rep.dense["mlp.2"].startswith("mask is not block-aligned") and rep.dense["mlp.0"] == "no mask"
    assert set(rep.converted) == {"mlp.4"}
    assert torch.equal(fast.mlp[2].weight_mask, f.mlp[2].weight_mask.bool())
    z = z_(5, 16)
    with torch.no_grad():
        assert (fast(t_(0.5), z) - f(t_(0.5), z)).abs().max() < TIGHT
    assert not pruning_hooks(fast) and not any("weight_orig" in n for n, _ in fast.named_parameters())


def test_explicit_masks_and_mixed_field():
    torch.manual_seed(4)
    f = MixedField(16, 32).to(DT)
    before = snapshot(f)
    diag = torch.eye(2, dtype=torch.bool).repeat_interleave(16, 0).repeat_interleave(16, 1)  # only 16x16-aligned
    masks = {"inp": block_mask(32, 16, (8, 8), seed=1), "body.0.weight": diag,
             "out": torch.rand(16, 32) < 0.5}
    fast = jf.sparsify(f, masks=masks)
    rep = fast.sparsify_report
    assert isinstance(fast.inp, BlockSparseLinear) and fast.inp.block == (8, 8)
    assert isinstance(fast.body[0], BlockSparseLinear) and fast.body[0].block == (16, 16)
    assert fast.body[0].activation == "elu" and isinstance(fast.body[1], nn.Identity)
    assert isinstance(fast.out, MaskedLinear) and isinstance(fast.norm, nn.LayerNorm)
    assert rep.converted["inp"].mask_source == "masks=" and rep.dense["embed"] == "no mask"
    ref = copy.deepcopy(f)  # the original with the same masks applied by hand
    with torch.no_grad():
        for name, m in (("inp", masks["inp"]), ("body.0", masks["body.0.weight"]), ("out", masks["out"])):
            ref.get_submodule(name).weight.mul_(m)
    z = z_(6, 16)
    with torch.no_grad():
        assert (fast(t_(0.1), z) - ref(t_(0.1), z)).abs().max() < TIGHT
    assert_same_state(f, before)


def test_forced_block():
    torch.manual_seed(5)
    f = SeqField(16, 32).to(DT)
    torch_prune.custom_from_mask(f.mlp[2], "weight", block_mask(32, 32, (16, 16)))
    fast = jf.sparsify(f, block=8)  # 16x16 blocks are 8x8-aligned too
    assert fast.mlp[2].block == (8, 8)
    torch_prune.custom_from_mask(f.mlp[4], "weight", block_mask(16, 32, (8, 8)))
    with pytest.raises(ValueError, match="not aligned to the forced block 16x16"):
        jf.sparsify(f, block=16)


# ---- errors -------------------------------------------------------------------------------------------
def test_bad_inputs():
    f = SeqField(16, 32).to(DT)
    with pytest.raises(ValueError, match=r"has shape \(32, 16\); expected the weight's shape \(32, 32\)"):
        jf.sparsify(f, masks={"mlp.2": torch.ones(32, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not an nn.Linear of the module.*mlp.0"):
        jf.sparsify(f, masks={"mlp.9": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="must be a tensor"):
        jf.sparsify(f, masks={"mlp.2": [[1]]})
    with pytest.raises(ValueError, match="0 and 1"):
        jf.sparsify(f, masks={"mlp.2": torch.full((32, 32), 0.5)})
    with pytest.raises(TypeError, match="dict"):
        jf.sparsify(f, masks=[torch.ones(32, 32)])
    with pytest.raises(TypeError, match="backend="):
        jf.sparsify(f, "cpu")
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        jf.sparsify(nn.Sequential(nn.Tanh(), nn.LayerNorm(3)))
    with pytest.raises(TypeError, match="nn.Module"):
        jf.sparsify(lambda t, z: z)
    with pytest.raises(ValueError, match="masks of a CNF are named from the CNF"):
        jf.sparsify(jf.CNF(16, net=f), masks={"mlp.2": torch.ones(32, 32, dtype=torch.bool)})


# ---- jf.CNF, jf.prune, jf.train and remove_pruning on a user field --------------------------------------
def _exact_log_prob(f, x, T=1.0, steps=400):
    """log p(x) by RK4 on [z, -tr J] with the trace from torch.autograd.functional.jacobian."""
    def rhs(t, z):
        tr = torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda zz: f(t, zz[None])[0], zi))
                          for zi in z])
        return f(t, z), -tr

    h = T / steps
    z, a = x.clone(), torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(steps):
        t = torch.tensor(i * h, dtype=x.dtype)
        k1 = rhs(t, z)
        k2 = rhs(t + h / 2, z + h / 2 * k1[0])
        k3 = rhs(t + h / 2, z + h / 2 * k2[0])
        k4 = rhs(t + h, z + h * k3[0])
        z = z + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        a = a + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype)) - a


def test_cnf_on_a_field_without_jvp_matches_an_independent_trace():
    torch.manual_seed(6)
    f = SeqField(2, 8).to(DT)
    model = jf.CNF(2, net=f, rtol=1e-10, atol=1e-10).to(DT)
    x = z_(3, 2)
    with torch.no_grad():
        ref = _exact_log_prob(f, x, steps=60)
    assert (model.log_prob(x) - ref).abs().max() < 1e-7


@pytest.mark.parametrize("method", ["jsp", "snip", "grasp", "synflow", "magnitude", "random"])
def test_prune_user_field_both_formats(method):
    def fresh():
        torch.manual_seed(7)
        return jf.CNF(4, net=SeqField(4, 16), trace="hutchinson", rtol=1e-4, atol=1e-4).to(DT)

    x = z_(24, 4)
    jf_model, torch_model = fresh(), fresh()
    assert list(jf_model.prunable_parameters()) == ["net.mlp.0.weight", "net.mlp.2.weight", "net.mlp.4.weight"]
    kw = dict(data=x, granularity="block", block=(4, 4), scope="layer", seed=1)  # every layer pruned
    r1 = jf.prune(jf_model, method, 0.6, **kw)
    r2 = jf.prune(torch_model, method, 0.6, as_torch_prune=True, **kw)
    for name in r1.masks:
        assert torch.equal(r1.masks[name], r2.masks[name]), name
    lin = torch_model.net.mlp[2]
    assert torch_prune.is_pruned(lin) and hasattr(lin, "weight_orig") and len(pruning_hooks(torch_model)) == 3
    assert not pruning_hooks(jf_model) and jf_model.net.mlp[2].weight_mask.dtype == torch.bool
    assert (jf_model.net.mlp[2].weight[~r1.masks["net.mlp.2.weight"]] == 0).all()
    # Both formats sparsify to the same block-sparse copy.
    a, b = jf.sparsify(jf_model, block=4), jf.sparsify(torch_model, block=4)  # 4x4: below the inferred sizes
    assert isinstance(a.net.mlp[2], BlockSparseLinear) and isinstance(b.net.mlp[2], BlockSparseLinear)
    torch.testing.assert_close(a.net.mlp[2].values, b.net.mlp[2].values, rtol=0, atol=0)
    # Linear(4 + 1, 16) on cat([z, t]): blocks over the 4 state columns, the time column kept whole.
    m0 = r1.masks["net.mlp.0.weight"]
    assert m0[:, -1].all() and not m0[:, :-1].all() and "concatenated t" in r1.fallback["net.mlp.0.weight"]
    assert isinstance(a.net.mlp[0], SplitBlockLinear) and a.net.mlp[0].edge_cols == (4, 5)
    assert a.sparsify_report.converted["net.mlp.2"].mask_source == "jf.prune"
    assert b.sparsify_report.converted["net.mlp.2"].mask_source == "torch.nn.utils.prune"


def test_train_keeps_user_field_masks_and_remove_pruning_takes_both_formats():
    torch.manual_seed(8)
    x = z_(64, 4)
    for fmt in (False, True):
        torch.manual_seed(8)
        model = jf.CNF(4, net=SeqField(4, 16), trace="hutchinson", rtol=1e-3, atol=1e-3).to(DT)
        res = jf.prune(model, "magnitude", 0.5, granularity="block", block=(4, 4), as_torch_prune=fmt)
        mask = res.masks["net.mlp.2.weight"]
        jf.train(model, x, steps=2, batch_size=32, lr=1e-2, progress=False)
        assert (model.net.mlp[2].weight[~mask] == 0).all()
        p = model.prunable_parameters()["net.mlp.2.weight"]
        jf.remove_pruning(model)
        lin = model.net.mlp[2]
        assert not pruning_hooks(model) and "weight_mask" not in lin._buffers and "weight_orig" not in lin._parameters
        assert lin.weight is p and (lin.weight[~mask] == 0).all()  # same Parameter, baked


def test_as_torch_prune_refuses_jf_odenet():
    model = jf.CNF(2, hidden=(8,))
    with pytest.raises(ValueError, match="as_torch_prune=True needs nn.Linear"):
        jf.prune(model, "random", 0.5, as_torch_prune=True)
