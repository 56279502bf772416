"""Which one-call fused field a SparseODEnet runs (``fused_engine``), and that each engine agrees with a
float64 reference of the same field.

On the CPU the "triton" engine runs under TRITON_INTERPRET=1 (set by conftest without a GPU) when the
field is built with ``backend="triton"``; on a GPU the same tests check that "auto" takes a GPU engine
("cuda" when ``_C`` was built with CUDA, else "triton") and match at wider shapes.
"""
from __future__ import annotations

import pytest
import torch
from _triton_util import INTERPRET, skip_unless_triton_runs

import jsp_fast as jf
from jsp_fast.cnf import ODEnet
from jsp_fast.sparse import SparseODEnet, registry
from jsp_fast.sparse.backends import cuda as cuda_backend
from jsp_fast.sparse.backends import triton as triton_backend

HAS_CPU_FIELD = "cpu" in jf.backends.available(fused=True)
# (dim, hidden, block, batch) per device: the interpreter is ~1000x slower than a GPU
SHAPES = {"cpu": (3, (32, 48), 16, 21), "cuda": (16, (256, 512, 256), 32, 4099)}


def _skip_triton(device):
    if triton_backend.IMPORT_ERROR is not None:
        pytest.skip("triton is not installed")
    skip_unless_triton_runs(device)


def _net(device, seed=0, act="tanh"):
    """A float64 ODEnet with block masks on its hidden layers (one empty block row), random gates."""
    dim, hidden, blk, _ = SHAPES[device]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ODEnet(dim, hidden, act).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.hyper_gate.weight.normal_(0, 1, generator=gen)
            layer.hyper_bias.weight.normal_(0, 0.5, generator=gen)
            layer.linear.bias.normal_(0, 0.5, generator=gen)
        for layer in net.layers[1:-1]:
            n, k = layer.linear.weight.shape
            g = torch.rand(n // blk, k // blk, generator=gen) < 0.4
            g[0] = False
            g[-1, -1] = True
            layer.set_mask(g.repeat_interleave(blk, 0).repeat_interleave(blk, 1))
    return net.to(device)


def _data(device, T, dtype, seed=1):
    dim, _, _, B = SHAPES[device]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(T, B, dim, generator=gen, dtype=torch.float64)
    t = torch.tensor(0.37, dtype=torch.float64)
    return t.to(device, dtype), z.to(device, dtype), v.to(device, dtype)


def test_engine_choice_on_cpu():
    net = _net("cpu")
    t, z, v = _data("cpu", 2, torch.float64)
    auto = SparseODEnet.from_odenet(net)
    with torch.no_grad():
        assert auto.fused_engine(z, v) == ("cpu" if HAS_CPU_FIELD else None)
        assert SparseODEnet.from_odenet(net, fused=False).fused_engine(z) is None
        assert SparseODEnet.from_odenet(net, backend="torch").fused_engine(z) is None
    # gradients needed: the per-layer (differentiable) ops run
    assert auto.fused_engine(z) is None  # the parameters require grad
    assert auto.fused_engine(z.requires_grad_(True)) is None
    if INTERPRET and triton_backend.IMPORT_ERROR is None:
        tri = SparseODEnet.from_odenet(net, backend="triton")
        with torch.no_grad():
            assert tri.fused_engine(z, v) == "triton"
            assert tri.fused_engine(z.to(torch.bfloat16)) is None  # the interpreter cannot read bf16


def test_wide_fields_run_per_layer():
    _skip_triton("cpu")
    net = ODEnet(2, (16, 528), "tanh").double()  # 528 > FUSED_MAX_WIDTH
    layer = net.layers[1]
    g = torch.rand(528 // 16, 1) < 0.5
    g[-1] = True
    layer.set_mask(g.repeat_interleave(16, 0).repeat_interleave(16, 1))
    sparse = SparseODEnet.from_odenet(net, backend="triton")
    z = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        assert sparse.fused_engine(z) is None
        torch.testing.assert_close(sparse(torch.tensor(0.3), z), net(torch.tensor(0.3), z))


def test_env_var_picks_engine(monkeypatch):
    _skip_triton("cpu")
    net = SparseODEnet.from_odenet(_net("cpu"))
    _, z, _ = _data("cpu", 1, torch.float32)
    with torch.no_grad():
        monkeypatch.setenv("JSP_FAST_BACKEND", "triton")
        assert net.fused_engine(z) == "triton"
        monkeypatch.setenv("JSP_FAST_BACKEND", "torch")
        assert net.fused_engine(z) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 3])
def test_triton_engine_matches_reference(device, dtype, T):
    _skip_triton(device)
    ref = _net(device)
    net = SparseODEnet.from_odenet(ref, backend="auto" if device == "cuda" else "triton").to(dtype=dtype)
    t, z, v = _data(device, T, dtype)
    with torch.no_grad():
        f_ref, jv_ref = ref.jvp(t.double(), z.double(), v.double())
        if device == "cuda" and net.fused_engine(z, v) == "cuda":
            pytest.skip("covered by test_cuda_engine_matches_reference")
        assert net.fused_engine(z, v) == "triton"
        f, jv = net.jvp(t, z, v)
        f_only = net(t, z)
    tol = 1e-10 if dtype == torch.float64 else 2e-4  # float32: tf32 off, different summation order
    torch.testing.assert_close(f.double(), f_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(jv.double(), jv_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(f_only, f, rtol=0, atol=0)


def test_cuda_engine_matches_reference():
    if not cuda_backend.available():
        pytest.skip("needs a CUDA device and jsp_fast._C built with JSP_FAST_CUDA=ON")
    ref = _net("cuda")
    net = SparseODEnet.from_odenet(ref).float()
    t, z, v = _data("cuda", 2, torch.float32)
    with torch.no_grad():
        assert net.fused_engine(z, v) == "cuda"
        f, jv = net.jvp(t, z, v)
        f_ref, jv_ref = ref.jvp(t.double(), z.double(), v.double())
    torch.testing.assert_close(f.double(), f_ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(jv.double(), jv_ref, rtol=2e-4, atol=2e-4)


def test_triton_engine_one_launch_per_evaluation_and_repacks(monkeypatch):
    _skip_triton("cpu")
    FusedFieldPlan = triton_backend.FusedFieldPlan
    calls = []
    real = FusedFieldPlan.__call__
    monkeypatch.setattr(FusedFieldPlan, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    ref = _net("cpu")
    net = SparseODEnet.from_odenet(ref, backend="triton")
    t, z, v = _data("cpu", 2, torch.float64)
    with torch.no_grad():
        net.jvp(t, z, v)
        plan = net._plan
        net(t, z)
        assert len(calls) == 2 and net._plan is plan  # packed once, reused
        # a parameter update re-packs the plan, and the new weights are used
        net.layers[1].values.mul_(-0.5)
        ref.layers[1].linear.weight.mul_(-0.5)
        f, _ = net.jvp(t, z, v)
        assert net._plan is not plan
    torch.testing.assert_close(f, ref(t, z), rtol=1e-10, atol=1e-10)


def test_sparsified_cnf_log_prob_through_triton_engine(monkeypatch):
    """A whole CNF solve (log_prob with the exact trace, rk4) runs the Triton fused field on every
    evaluation and agrees with the masked dense model."""
    _skip_triton("cpu")
    FusedFieldPlan = triton_backend.FusedFieldPlan
    calls = []
    real = FusedFieldPlan.__call__
    monkeypatch.setattr(FusedFieldPlan, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = jf.CNF(dim=3, net=_net("cpu"), solver="rk4", options={"step_size": 0.25}).double()
    fast = jf.sparsify(model, backend="triton")
    x = torch.randn(9, 3, dtype=torch.float64)
    with torch.no_grad():
        lp_dense = model.log_prob(x)
        lp_fast = fast.log_prob(x)
    assert calls, "the Triton fused field was not used"
    torch.testing.assert_close(lp_fast, lp_dense, rtol=1e-9, atol=1e-9)


def test_fused_engines_are_named():
    names = {"cpu", "cuda"} | ({"triton"} if triton_backend.IMPORT_ERROR is None else set())
    assert {name for name in names if registry.get(name).fused is not None} == names
    assert registry.get("torch").fused is None
    with pytest.raises(ValueError, match="unknown fused engine"):
        SparseODEnet.from_odenet(_net("cpu")).fused_plan(torch.float32, engine="tpu")
