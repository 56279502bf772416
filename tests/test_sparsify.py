"""jf.sparsify: the block-sparse CNF agrees with the masked dense model it came from.

float64 with tight solver tolerances: both models evaluate the same field to ~1e-15, so the adaptive
solver takes the same steps and the results agree far below the solver tolerance (1e-8 here).
"""
from __future__ import annotations

import pytest
import torch

import jsp_fast as jf
from jsp_fast.sparse._field import BlockSparseConcatSquash, SparseODEnet
from jsp_fast.sparse._sparsify import sparsify

DTYPE = torch.float64
AGREE = 1e-8


def _pruned(dim=16, hidden=(32, 32), trace="exact", method="random", sparsity=0.7, block=(8, 8), seed=0,
            **kw):
    torch.manual_seed(seed)
    model = jf.CNF(dim=dim, hidden=hidden, trace=trace, rtol=1e-4, atol=1e-4, **kw).to(DTYPE)
    x = torch.randn(64, dim, dtype=DTYPE)
    jf.prune(model, method, sparsity, data=x, granularity="block", block=block, seed=seed)
    model.rtol = model.atol = 1e-8  # scores at a loose tolerance (fast), compare at a tight one
    return model


def _x(n=23, dim=16, seed=3):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("method", ["random", "jsp"])
def test_log_prob_exact_trace_matches(method):
    model = _pruned(method=method)
    fast = sparsify(model)
    assert isinstance(fast, jf.CNF) and isinstance(fast.net, SparseODEnet)
    assert fast.config() == model.config()
    assert all(isinstance(l, BlockSparseConcatSquash) for l in fast.net.layers)
    x = _x()
    ref = model.log_prob(x)
    out = fast.log_prob(x)  # per-layer path (parameters require grad)
    assert (out - ref).abs().max() < AGREE
    with torch.no_grad():
        out2 = fast.log_prob(x)  # fused path
    assert (out2 - ref).abs().max() < AGREE
    assert fast.nfe["forward"] == model.nfe["forward"]


def test_log_prob_hutchinson_same_noise_matches():
    model = _pruned(trace="hutchinson", noise="rademacher")
    fast = sparsify(model)
    x = _x()
    torch.manual_seed(11)
    ref = model.log_prob(x)
    torch.manual_seed(11)
    with torch.no_grad():
        out = fast.log_prob(x)
    assert (out - ref).abs().max() < AGREE
    torch.manual_seed(11)
    out_stats, stats = fast.log_prob(x, return_stats=True)
    torch.manual_seed(11)
    ref_stats, ref_s = model.log_prob(x, return_stats=True)
    assert (out_stats - ref_stats).abs().max() < AGREE
    for k in ref_s:
        assert (stats[k] - ref_s[k]).abs().max() < AGREE


def test_sample_transform_inverse_match():
    model = _pruned()
    fast = sparsify(model)
    s0, s1 = model.sample(17, seed=5), fast.sample(17, seed=5)
    assert (s0 - s1).abs().max() < AGREE
    x = _x()
    with torch.no_grad():
        assert (fast.transform(x) - model.transform(x)).abs().max() < AGREE
        assert (fast.inverse(x) - model.inverse(x)).abs().max() < AGREE
    if "cpu" in jf.backends.available(fused=True):
        assert fast.net._plan is not None  # sample ran the one-call field


def test_gradients_match_masked_dense():
    model = _pruned(hidden=(24, 40), sparsity=0.5, trace="exact")
    fast = sparsify(model)
    x = _x(9)
    (-model.log_prob(x).mean()).backward()
    (-fast.log_prob(x).mean()).backward()
    for src, dst in zip(model.net.layers, fast.net.layers):
        bm, bk = dst.block
        n, k = src.linear.weight.shape
        g = src.linear.weight.grad.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)
        torch.testing.assert_close(dst.values.grad, g[dst.block_rows, dst.block_cols], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(dst.bias.grad, src.linear.bias.grad, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(dst.hyper_gate.weight.grad, src.hyper_gate.weight.grad, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(dst.hyper_bias.weight.grad, src.hyper_bias.weight.grad, rtol=1e-7, atol=1e-10)


def test_training_steps_then_fused_inference_agree():
    model = _pruned(trace="hutchinson", hidden=(24, 24), sparsity=0.5)
    fast = sparsify(model)
    opt = torch.optim.Adam(fast.parameters(), lr=1e-2)
    x = _x(32)
    for _ in range(3):
        opt.zero_grad()
        loss = -fast.log_prob(x).mean()
        loss.backward()
        opt.step()
    # The trained sparse model against its own dense equivalent, through the fused path.
    dense = jf.CNF(dim=16, hidden=(24, 24), trace="hutchinson", rtol=1e-8, atol=1e-8, net=fast.net.to_odenet())
    dense = dense.to(DTYPE)
    torch.manual_seed(2)
    ref = dense.log_prob(x)
    torch.manual_seed(2)
    with torch.no_grad():
        out = fast.log_prob(x)
    assert (out - ref).abs().max() < AGREE


def test_dense_fallback_layers_are_reported():
    # 2-d toy field: the first and last layers (64x2, 2x64) cannot be cut into 32x32 blocks.
    torch.manual_seed(0)
    model = jf.CNF(dim=2, hidden=(64, 64), rtol=1e-8, atol=1e-8).to(DTYPE)
    res = jf.prune(model, "random", 0.5, data=torch.randn(32, 2, dtype=DTYPE), granularity="block",
                   block=(32, 32))
    fast = sparsify(model, block=(32, 32))
    assert set(fast.net.dense_layers) == {0, 2}, (res.fallback, fast.net.dense_layers)
    assert set(fast.net.sparse_layers) == {1}
    x = _x(19, 2)
    with torch.no_grad():
        assert (fast.log_prob(x) - model.log_prob(x)).abs().max() < AGREE
    unpruned = sparsify(jf.CNF(dim=2, hidden=(8,)))
    assert all("no weight_mask" in r for r in unpruned.net.dense_layers.values())


def test_sparsify_leaves_original_and_resparsifies():
    model = _pruned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = sparsify(model)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    again = sparsify(fast)  # a sparsified model converts again (through its dense equivalent)
    assert isinstance(again.net, SparseODEnet)


def test_deepcopy_after_fused_use():
    import copy

    model = _pruned()
    fast = sparsify(model)
    x = _x(5)
    with torch.no_grad():
        ref = fast.log_prob(x)
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        assert (twin.log_prob(x) - ref).abs().max() < AGREE
    assert fast.net._plan is not None  # the original keeps its cache


def test_public_names():
    assert jf.sparsify is sparsify
    assert jf.sparse.SparseODEnet is SparseODEnet


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify(object())
    model = _pruned()
    with pytest.raises(ValueError, match="backend"):
        sparsify(model, backend="fpga")

    class Field(torch.nn.Module):
        def forward(self, t, z):
            return z

    with pytest.raises(ValueError, match="no nn.Linear layer"):  # any field works, but one needs layers
        sparsify(jf.CNF(dim=2, net=Field()))
    with pytest.raises(ValueError, match="block"):
        sparsify(model, block=(8, -1))
