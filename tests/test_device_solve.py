"""The device-resident whole solve (``_device_solve.odeint_device``, the GPU engines' ``solve``) against
torchdiffeq through CNF, on the CPU: a torch field stands in for the fused GPU kernels, and the Triton
fused field runs it under the interpreter. CUDA graph capture itself needs a GPU (bench/gpu_session.sh)."""
import pytest
import torch

import jsp_fast as jf
from jsp_fast.sparse.backends import _device_solve
from jsp_fast.sparse.backends._device_solve import odeint_device

DIM, HIDDEN = 3, (16, 16)


def _model(trace, solver, seed=0, scale=3.0, **kw):
    torch.manual_seed(seed)
    m = jf.CNF(dim=DIM, hidden=HIDDEN, trace=trace, solver=solver, rtol=1e-6, atol=1e-6, **kw).double()
    with torch.no_grad():  # a field that does something over [0, T]
        for p in m.net.parameters():
            p.mul_(scale)
    return m


def _torch_run(net, t, z, v):
    return net.jvp(t, z, v) if v is not None else (net(t, z), None)


@pytest.mark.parametrize("solver", ["dopri5", "euler", "midpoint", "rk4"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("B", [1, 7])
def test_log_prob_matches_torchdiffeq(solver, trace, B):
    model = _model(trace, solver, options={"step_size": 0.1} if solver != "dopri5" else {})
    gen = torch.Generator().manual_seed(B)
    x = torch.randn(B, DIM, generator=gen, dtype=torch.float64)
    eps = torch.randn(B, DIM, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        z_ref, dlogp_ref = model._solve((x, x.new_zeros(B)), 0.0, model.T, trace, (), eps)
        nfe_ref = model.nfe["forward"]
        z, dlogp, nfe = odeint_device(_torch_run, model.net, x, None, 0.0, float(model.T), trace=trace, noise=eps,
                                      solver=solver, rtol=model.rtol, atol=model.atol, options=model._options())
    assert nfe == nfe_ref
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dlogp, dlogp_ref, rtol=1e-9, atol=1e-9)
    assert (dlogp.abs() > 1e-3).any()  # the trace is not trivially zero here


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_backwards_without_trace_matches_torchdiffeq(solver):
    model = _model("exact", solver, seed=3, options={"step_size": 0.05} if solver == "rk4" else {})
    z = torch.randn(5, DIM, dtype=torch.float64)
    with torch.no_grad():
        (x_ref,) = model._solve((z,), model.T, 0.0, None)
        x, logp, nfe = odeint_device(_torch_run, model.net, z, None, float(model.T), 0.0, trace="none", noise=None,
                                     solver=solver, rtol=model.rtol, atol=model.atol, options=model._options())
    assert logp is None and nfe == model.nfe["forward"]
    torch.testing.assert_close(x, x_ref, rtol=1e-9, atol=1e-9)


def test_refusals_and_failures():
    assert _device_solve.refusal("bosh3", {}) is not None
    assert _device_solve.refusal("rk4", {"max_num_steps": 3}) is not None
    assert _device_solve.refusal("dopri5", {"max_num_steps": 3, "first_step": 0.1}) is None
    model = _model("exact", "dopri5", scale=40.0)
    x = torch.randn(4, DIM, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(jf.SolverError, match="max_num_steps"):
        odeint_device(_torch_run, model.net, x, None, 0.0, 1.0, trace="exact", noise=None, solver="dopri5",
                      rtol=1e-12, atol=1e-12, options={"max_num_steps": 2})
    with pytest.raises(ValueError, match="bosh3"):
        odeint_device(_torch_run, model.net, x, None, 0.0, 1.0, trace="exact", noise=None, solver="bosh3",
                      rtol=1e-6, atol=1e-6)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with torch.no_grad(), pytest.raises(jf.SolverError, match="non-finite"):
        odeint_device(_torch_run, model.net, bad, None, 0.0, 1.0, trace="exact", noise=None, solver="rk4",
                      rtol=1e-6, atol=1e-6, options={"step_size": 0.25})


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_triton_fused_field_solves_through_cnf(solver):
    """A sparsified CNF with fused="triton" (the interpreter here; a GPU's engine there) takes the device
    solve for log_prob and sample, with the results and NFE of the torchdiffeq path."""
    pytest.importorskip("triton")
    if "triton" not in jf.backends.available():
        pytest.skip("triton backend not registered")
    model = jf.CNF(dim=8, hidden=(16, 16), trace="hutchinson", solver=solver, rtol=1e-5, atol=1e-5,
                   options={"step_size": 0.25} if solver == "rk4" else {})
    jf.prune(model, "random", 0.5, granularity="block", block=(8, 8), seed=0)
    fast = jf.sparsify(model, fused="triton")
    slow = jf.sparsify(model, fused="triton")
    slow.net.native = False
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        a = fast.log_prob(x)
        assert fast.last_solve["native"]
        torch.manual_seed(1)
        b = slow.log_prob(x)
        assert not slow.last_solve["native"]
        assert fast.nfe["forward"] == slow.nfe["forward"]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        sa, sb = fast.sample(3, seed=2), slow.sample(3, seed=2)
        assert fast.last_solve["native"] and fast.nfe["forward"] == slow.nfe["forward"]
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run by bench/gpu_session.sh)")
@pytest.mark.parametrize("trace", ["hutchinson", "exact"])
def test_cuda_graph_replay_equals_the_eager_solve(trace):
    """On a GPU a fixed-grid solve is captured once per shape and replayed; the replay equals the eager
    loop, new inputs flow through the static buffers, and dopri5 matches torchdiffeq's NFE there too."""
    model = jf.CNF(dim=16, hidden=(64, 64), trace=trace, solver="rk4", options={"step_size": 0.125}).cuda()
    jf.prune(model, "random", 0.75, granularity="block", block=(16, 16), seed=0)
    net = jf.sparsify(model).net
    engine = net.fused_engine(torch.zeros(1, 16, device="cuda"))
    fused = jf.backends.fused_field(engine)
    plan = net.fused_plan(torch.float32, engine, torch.device("cuda"))
    before = len(_device_solve._GRAPHS)
    for seed in (0, 1):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(300, 16, device="cuda", generator=gen)
        eps = torch.randn(300, 16, device="cuda", generator=gen)
        kw = dict(trace=trace, noise=eps if trace == "hutchinson" else None, solver="rk4", rtol=1e-5, atol=1e-5,
                  options={"step_size": 0.125})
        with torch.no_grad():
            zg, lg, nfe = odeint_device(fused.run, plan, x, None, 0.0, 1.0, graph=True, **kw)
            ze, le, _ = odeint_device(fused.run, plan, x, None, 0.0, 1.0, graph=False, **kw)
        assert nfe == 32
        torch.testing.assert_close(zg, ze, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-5)
    assert len(_device_solve._GRAPHS) == before + 1  # captured once, replayed for the second input
    model.solver, model.options = "dopri5", {}
    fast, slow = jf.sparsify(model), jf.sparsify(model)
    slow.net.native = False
    x = torch.randn(300, 16, device="cuda")
    with torch.no_grad():
        torch.manual_seed(0)
        a = fast.log_prob(x)
        torch.manual_seed(0)
        b = slow.log_prob(x)
    assert fast.last_solve["native"] and fast.nfe["forward"] == slow.nfe["forward"]
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
