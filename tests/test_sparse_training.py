"""Sparse training: the fused backward epilogue, gradients through a whole sparse CNF solve, jf.train(sparse=True)
against the masked dense model, sparse checkpoints (save/load/resume) and the CLI's default sparse path."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.autograd import gradcheck, gradgradcheck

import jsp_fast as jf
from jsp_fast import _act
from jsp_fast._ext import _C
from jsp_fast.sparse._field import BlockSparseConcatSquash, SparseODEnet
from jsp_fast.sparse._ops import bsr_bwd_epilogue
from jsp_fast.sparse.backends.torch_ref import bwd_epilogue_reference
from jsp_fast.training import CheckpointError, _sparse, load_checkpoint
from _cli_util import run as _run

D = torch.float64
ACTS = ("none", "tanh", "softplus", "elu", "relu", "sigmoid")
HAS_C = _C is not None and hasattr(_C, "bsr_bwd_epilogue")
BACKENDS = ["torch"] + (["cpu"] if HAS_C else [])


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _y(act, B, n, dtype, gen):
    """An activation output away from the kinks (relu, elu at 0), where the epilogue is differentiable."""
    pre = torch.randn(B, n, generator=gen, dtype=dtype)
    pre = pre + 0.2 * pre.sign()
    y = _act.apply(act, pre)
    if act == "relu":
        y = torch.where(y == 0, torch.full_like(y, -0.5), y)
    return y


# ---- the epilogue primitive --------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_C, reason="needs the compiled core with bsr_bwd_epilogue")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ACTS)
def test_cpu_epilogue_matches_reference(dtype, act):
    from jsp_fast.sparse.backends.cpu import CpuBackend

    gen = torch.Generator().manual_seed(ACTS.index(act))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    seen = 0.0
    for B, n, T in ((37, 45, 0), (5, 17, 1), (64, 96, 3), (1, 3, 2)):
        y = _y(act, B, n, dtype, gen)
        gy = torch.randn(B, n, generator=gen, dtype=dtype)
        gyd = torch.randn(T, B, n, generator=gen, dtype=dtype) if T else None
        ud = torch.randn(T, B, n, generator=gen, dtype=dtype) if T else None
        for scale in (torch.rand(n, generator=gen, dtype=dtype) + 0.1, None):
            for g in (gy, None) if T else (gy,):
                ref = bwd_epilogue_reference(g, gyd, y, ud, scale, act, True)
                out = CpuBackend().bwd_epilogue(g, gyd, y, ud, scale, act, True)
                assert out[0].shape == ((1 + T) * B, n)
                assert (out[0] - ref[0]).abs().max() <= tol * (1 + ref[0].abs().max())
                assert (out[1] - ref[1]).abs().max() <= tol * B * (1 + ref[1].abs().max())
                seen = max(seen, float(ref[0].abs().max()))
    assert seen > 0  # the checks could fail


@pytest.mark.skipif(not HAS_C, reason="needs the compiled core")
def test_cpu_epilogue_errors():
    y = torch.randn(4, 8).tanh()
    G = torch.empty(8, 8)
    with pytest.raises(ValueError, match="ud"):
        _C.bsr_bwd_epilogue(None, torch.randn(1, 4, 8).numpy(), y.numpy(), None, None, 1, G.numpy(), None, None)
    with pytest.raises(ValueError, match=r"G has shape \[4, 8\], expected \[8, 8\]"):
        _C.bsr_bwd_epilogue(y.numpy(), torch.randn(1, 4, 8).numpy(), y.numpy(), y[None].numpy(), None, 1,
                            torch.empty(4, 8).numpy(), None, None)
    with pytest.raises(ValueError, match="gy or gyd"):
        _C.bsr_bwd_epilogue(None, None, y.numpy(), None, None, 1, torch.empty(4, 8).numpy(), None, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_epilogue_op_gradients_and_opcheck(backend, act):
    gen = torch.Generator().manual_seed(7)
    B, n, T = 4, 6, 2
    y = _y(act, B, n, D, gen).requires_grad_()
    gy = torch.randn(B, n, generator=gen, dtype=D, requires_grad=True)
    gyd = torch.randn(T, B, n, generator=gen, dtype=D, requires_grad=True)
    ud = torch.randn(T, B, n, generator=gen, dtype=D, requires_grad=True)
    s = (torch.rand(n, generator=gen, dtype=D) + 0.1).requires_grad_()

    def f(gy, gyd, y, ud, s):
        return bsr_bwd_epilogue(gy, gyd, y, ud, s, act, True, backend)

    assert gradcheck(f, (gy, gyd, y, ud, s))
    assert gradgradcheck(f, (gy, gyd, y, ud, s))
    assert gradcheck(lambda gy, y: bsr_bwd_epilogue(gy, None, y, None, None, act, False, backend), (gy, y))
    torch.library.opcheck(bsr_bwd_epilogue, (gy, gyd, y, ud, s, act, True, backend))
    torch.library.opcheck(bsr_bwd_epilogue, (gy, None, y, None, None, act, False, backend))


# ---- gradients through a whole sparse solve -----------------------------------------------------------------
def _pruned(dim=8, hidden=(32, 32), trace="exact", sparsity=0.5, block=(8, 8), seed=0, **kw):
    torch.manual_seed(seed)
    model = jf.CNF(dim=dim, hidden=hidden, trace=trace, **kw).to(D)
    x = torch.randn(64, dim, dtype=D)
    jf.prune(model, "random", sparsity, data=x, granularity="block", block=block, seed=seed, scope="layer")
    return model


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_solve_gradients_match_masked_dense_and_gradcheck(trace):
    """d log p / d params through a whole (fixed-step) solve: the sparse model's gradient equals the masked
    dense one's on the kept blocks; gradcheck and gradgradcheck in float64 on the kept-block values."""
    model = _pruned(trace=trace, solver="rk4", options={"step_size": 0.5}, noise="rademacher")
    sp = jf.sparsify(model, fused=False)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=D)
    torch.manual_seed(3)
    ld = model.log_prob(x).sum()
    torch.manual_seed(3)
    ls = sp.log_prob(x).sum()
    assert abs(float((ld - ls).detach())) < 1e-10
    ld.backward()
    ls.backward()
    for lay, dl in zip(sp.net.layers, model.net.layers):
        assert isinstance(lay, BlockSparseConcatSquash)
        gdense = dl.linear.weight.grad * dl.mask
        gs = lay.weight.with_values(lay.values.grad).to_dense()
        assert (gs - gdense).abs().max() < 1e-10 * (1 + gdense.abs().max())
        assert gdense.abs().max() > 0
        assert (lay.hyper_gate.weight.grad - dl.hyper_gate.weight.grad).abs().max() < 1e-10

    lay = sp.net.layers[1]
    v0 = lay.values.detach().clone()

    def f(v):  # the solve as a function of one kept block (a plain tensor in place of the Parameter)
        del lay.values
        lay.values = torch.cat([v[None], v0[1:]])
        torch.manual_seed(3)
        return sp.log_prob(x[:2])

    try:
        v = v0[0].clone().requires_grad_()
        assert gradcheck(f, (v,), atol=1e-6)
        assert gradgradcheck(f, (v,), atol=1e-5)
    finally:
        del lay.values
        lay.values = torch.nn.Parameter(v0)


# ---- jf.train(sparse=True) --------------------------------------------------------------------------------
def _data(n=160, dim=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=D) * torch.linspace(0.5, 1.5, dim, dtype=D)


TRAIN = {"steps": 6, "batch_size": 32, "eval_every": 3, "progress": False, "seed": 2, "lr": 5e-3, "R_batch": 32}


@pytest.mark.parametrize("reg", [None, {"kinetic": 0.01, "jacobian": 0.01}])
def test_train_sparse_matches_masked_dense(reg):
    model = _pruned(trace="hutchinson", rtol=1e-8, atol=1e-8)
    x = _data()
    dense, sp = copy.deepcopy(model), copy.deepcopy(model)
    h_d = jf.train(dense, x[:128], x[128:], reg=reg, **TRAIN)
    h_s = jf.train(sp, x[:128], x[128:], reg=reg, sparse=True, **TRAIN)
    assert isinstance(sp.net, jf.cnf.ODEnet)  # the caller's model stays a masked dense model
    _, nll_d = h_d.column("train_nll")
    _, nll_s = h_s.column("train_nll")
    assert len(nll_s) == 6 and max(abs(a - b) for a, b in zip(nll_d, nll_s)) < 1e-8
    assert abs(h_d.last("val_nll") - h_s.last("val_nll")) < 1e-8
    assert abs(h_d.last("R") - h_s.last("R")) < 1e-8 and h_s.last("R") > 1e-3
    for (k, a), b in zip(dense.state_dict().items(), sp.state_dict().values()):
        assert (a.double() - b.double()).abs().max() < 1e-8, k
    # trained: the values moved, the masks did not
    for a, b in zip(model.net.layers, sp.net.layers):
        assert torch.equal(a.mask, b.mask)
        assert (a.linear.weight - b.linear.weight).abs().max() > 1e-4
        assert (b.linear.weight * ~b.mask).abs().max() == 0


def test_train_sparse_optimizer_state_only_kept_blocks_and_checkpoint(tmp_path):
    model = _pruned(trace="hutchinson", rtol=1e-6, atol=1e-6)
    x = _data()
    jf.train(model, x[:128], x[128:], sparse=True, checkpoint_dir=tmp_path, **TRAIN)
    ck = load_checkpoint(tmp_path)
    assert isinstance(ck.model.net, SparseODEnet)
    shapes = {tuple(l.values.shape) for l in ck.model.net.layers}
    avg = [v["exp_avg"] for v in ck.optimizer["state"].values()]
    assert any(tuple(a.shape) in shapes for a in avg)
    dense_shapes = {tuple(l.linear.weight.shape) for l in model.net.layers}
    assert not any(tuple(a.shape) in dense_shapes for a in avg)  # no moments of the dense [n, k] weights
    sd = load_file(tmp_path / "last" / "model.safetensors")
    assert "net.layers.0.values" in sd and "net.layers.0.block_rows" in sd and "net.layers.0.linear.weight" not in sd
    # the checkpoint's model is what was written back into the dense model (a load builds float32)
    dense = _sparse.to_dense(ck.model)
    for a, b in zip(dense.state_dict().values(), model.state_dict().values()):
        assert a.shape == b.shape and (a.double() - b.double()).abs().max() < 1e-6


def test_sparse_resume_equals_uninterrupted(tmp_path):
    model = _pruned(trace="hutchinson", rtol=1e-6, atol=1e-6)
    x = _data()
    full, part = copy.deepcopy(model), copy.deepcopy(model)
    kw = {**TRAIN, "checkpoint_every": 1}
    h_full = jf.train(full, x[:128], x[128:], sparse=True, checkpoint_dir=tmp_path / "a", **kw)
    jf.train(part, x[:128], x[128:], sparse=True, checkpoint_dir=tmp_path / "b", **{**kw, "steps": 3})
    fresh = jf.CNF(dim=8, hidden=(32, 32), trace="hutchinson", rtol=1e-6, atol=1e-6).to(D)  # unpruned, like the CLI
    h_res = jf.train(fresh, x[:128], x[128:], sparse=True, checkpoint_dir=tmp_path / "b", **kw)
    assert h_res.column("train_nll") == h_full.column("train_nll")
    for a, b in zip(full.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="block-sparse"):
        jf.train(copy.deepcopy(model), x[:128], x[128:], checkpoint_dir=tmp_path / "b", **{**kw, "steps": 7})
    # an already sparse model is trained (and resumed) in place
    sp = jf.sparsify(model)
    jf.train(sp, x[:128], x[128:], sparse=True, checkpoint_dir=tmp_path / "c", **{**kw, "steps": 3})
    sp2 = jf.sparsify(model)
    jf.train(sp2, x[:128], x[128:], sparse=True, checkpoint_dir=tmp_path / "c", **kw)
    for a, b in zip(jf.sparsify(full).state_dict().values(), sp2.state_dict().values()):
        assert torch.equal(a, b)


def test_sparse_save_load_roundtrip(tmp_path):
    model = _pruned(trace="exact", rtol=1e-8, atol=1e-8)
    model.net.layers[1].set_mask(torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) > 0.5)  # unaligned
    with pytest.raises(TypeError):
        jf.save(tmp_path / "bad", jf.CNF(dim=8, net=torch.nn.Linear(8, 8)))
    sp = jf.sparsify(model)
    assert list(sp.net.dense_layers) == [1]
    jf.save(tmp_path / "c", sp)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert [l["kind"] for l in cfg["model"]["sparse"]["layers"]] == ["sparse", "dense", "sparse"]
    back = jf.load(tmp_path / "c").to(D)
    assert isinstance(back.net, SparseODEnet) and list(back.net.dense_layers) == [1]
    x = _data(9)
    with torch.no_grad():
        ref = model.log_prob(x)
        assert (back.log_prob(x) - ref).abs().max() < 1e-8
        assert (_sparse.to_dense(back).log_prob(x) - ref).abs().max() < 1e-8
        assert (jf.sparsify(back).log_prob(x) - ref).abs().max() < 1e-8
    for (k, a), b in zip(sp.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a.to(b.dtype), b), k
    with pytest.raises(CheckpointError, match="block-sparse"):
        load_checkpoint(tmp_path / "c", model=copy.deepcopy(model))


def test_train_sparse_reports_dense_layers_and_errors(tmp_path):
    model = _pruned(trace="hutchinson", rtol=1e-6, atol=1e-6)
    model.net.layers[0].set_mask(torch.rand(32, 8, generator=torch.Generator().manual_seed(0)) > 0.5)
    x = _data()
    with pytest.warns(UserWarning, match="layer 0: mask is not"):
        jf.train(model, x[:128], x[128:], sparse=True, **{**TRAIN, "steps": 1})
    with pytest.raises(ValueError, match="block-pruned"):
        jf.train(jf.CNF(dim=8, hidden=(16,)).to(D), x, sparse=True, **{**TRAIN, "steps": 1})
    with pytest.raises(TypeError, match="sparse must be"):
        jf.train(model, x, sparse="yes", **{**TRAIN, "steps": 1})
    jf.train(copy.deepcopy(model), x, checkpoint_dir=tmp_path, **{**TRAIN, "steps": 1})  # a dense run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="dense run"):
            jf.train(copy.deepcopy(model), x, checkpoint_dir=tmp_path, sparse=True, **{**TRAIN, "steps": 2})


# ---- the CLI --------------------------------------------------------------------------------------------
def test_cli_block_pruned_trains_sparse_saves_loads_samples(capsys, tmp_path):
    run_dir = tmp_path / "run"
    common = ["train", "--dataset", "8gaussians", "--n", 300, "--hidden", "16,16", "--batch-size", 32,
              "--lr", 1e-2, "--eval-every", 2, "--prune", "random", "--sparsity", 0.5, "--granularity", "block",
              "--block", "8,8", "--out", run_dir, "--threads", 1, "--no-progress"]
    code, out, err = _run(capsys, *common, "--steps", 2)
    assert code == 0, err
    cfg = json.loads((run_dir / "last" / "config.json").read_text())
    assert "sparse" in cfg["model"]  # block-pruned: trained (and checkpointed) sparse by default
    code, out, err = _run(capsys, *common, "--steps", 3)
    assert code == 0 and "resuming" in err and out.startswith("step 3:"), err
    model = jf.load(run_dir)
    assert isinstance(model.net, SparseODEnet) and model.net.sparse_layers
    code, out, err = _run(capsys, "sample", "--checkpoint", run_dir, "--n", 50, "--seed", 1,
                          "--out", tmp_path / "s.npy", "--no-progress", "--device", "cpu")
    assert code == 0, err
    import numpy as np

    s = np.load(tmp_path / "s.npy")
    assert s.shape == (50, 2) and np.isfinite(s).all()
    code, out, err = _run(capsys, "eval", "--checkpoint", run_dir, "--max-n", 40, "--tol", 1e-3, "--no-progress")
    assert code == 0 and "NLL" in out, err

    dense_dir = tmp_path / "dense"
    code, out, err = _run(capsys, *[dense_dir if a == run_dir else a for a in common], "--steps", 1, "--no-sparse")
    assert code == 0, err
    assert "sparse" not in json.loads((dense_dir / "last" / "config.json").read_text())["model"]
