"""The native CNF solve (jsp_fast.sparse.backends._cpu_solve.odeint_native) against torchdiffeq.odeint on the same
augmented dynamics written in torch.

The reference right-hand side calls the SparseODEnet's jvp, which under no_grad runs the same packed
field as the native solve, so the two differ only in the solver's own arithmetic: the same steps
(NFE equal; ±2 allowed for float32, where a norm summed in a different order could tip one
accept/reject decision), results within 10× the tolerance (dopri5) or equal up to rounding (fixed
grids: float64 1e-12, float32 1e-5 of the state's scale). One float64 case uses the dense torch
ODEnet as an independent field.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

from jsp_fast.cnf import ODEnet
import jsp_fast as jf
from jsp_fast.sparse import SparseODEnet, registry

_HAS_FIELD = "cpu" in registry.available("cpu", fused=True)
pytestmark = pytest.mark.skipif(not _HAS_FIELD, reason="jsp_fast._C has no fused field")

if _HAS_FIELD:
    from jsp_fast._ext import _C
    from jsp_fast.sparse.backends._cpu_solve import odeint_native

DIM, HIDDEN, BLOCK = 8, (32, 24), 8
ROUND = {torch.float64: 1e-12, torch.float32: 1e-5}


def _pruned_odenet(dtype, act="tanh", density=0.5, seed=0, scale=1.0, dim=DIM, hidden=HIDDEN):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ODEnet(dim, hidden, act).to(dtype)
    with torch.no_grad():
        for layer in net.layers:  # non-trivial gates, shifts and block masks
            layer.hyper_gate.weight.normal_(0, 1, generator=gen)
            layer.hyper_bias.weight.normal_(0, 0.5, generator=gen)
            layer.linear.bias.normal_(0, 0.3, generator=gen)
            layer.linear.weight.mul_(scale)
            n, k = layer.linear.weight.shape
            g = torch.rand(n // BLOCK, k // BLOCK, generator=gen) < density
            g[0, 0] = True
            if density < 1:
                g[-1, -1] = False
            layer.set_mask(g.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1))
    return net


class _Dynamics(torch.nn.Module):
    """FFJORD augmented dynamics in torch, as CNF writes them; counts evaluations."""

    def __init__(self, field, trace, eps=None):
        super().__init__()
        self.field, self.trace, self.eps, self.nfe = field, trace, eps, 0

    def forward(self, t, state):
        self.nfe += 1
        z = state[0]
        if self.trace == "none":
            return (self.field(t, z),)
        n, d = z.shape
        if self.trace == "exact":
            v = torch.eye(d, dtype=z.dtype).unsqueeze(1).expand(d, n, d)
            f, jv = self.field.jvp(t, z, v)
            tr = torch.diagonal(jv, dim1=0, dim2=2).sum(-1)
        else:
            f, jv = self.field.jvp(t, z, self.eps.unsqueeze(0))
            tr = (jv[0] * self.eps).sum(-1)
        return f, -tr


def _reference(field, z, logp, t0, t1, trace, eps, solver, rtol, atol, options):
    dyn = _Dynamics(field, trace, eps)
    ts = torch.tensor([t0, t1], dtype=z.dtype)
    state = (z,) if trace == "none" else (z, logp)
    with torch.no_grad():
        out = torchdiffeq.odeint(dyn, state, ts, rtol=rtol, atol=atol, method=solver, options=options)
    return out[0][-1], (None if trace == "none" else out[1][-1]), dyn.nfe


def _inputs(B, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, DIM, generator=gen, dtype=dtype)
    logp = torch.randn(B, generator=gen, dtype=dtype)  # a nonzero start: logp0 is carried through
    eps = torch.randn(B, DIM, generator=gen, dtype=dtype)
    return z, logp, eps


def _sparse(dtype, **kw):
    sp = SparseODEnet.from_odenet(_pruned_odenet(dtype, **kw))
    assert not sp.dense_layers  # every layer block-sparse: the plan is the fused sparse field
    return sp, sp.fused_plan(dtype)


def _check_tol(a, b, rtol, atol, factor=10.0):
    bound = factor * (atol + rtol * b.abs())
    excess = ((a - b).abs() - bound).max().item()
    assert excess <= 0, f"max |diff| {(a - b).abs().max().item():.3g} exceeds {factor}x tolerance"


def _check_round(a, b, dtype):
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= ROUND[dtype] * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("B", [1, 7, 129])
def test_dopri5_matches_torchdiffeq(dtype, t0, t1, trace, B):
    sp, plan = _sparse(dtype)
    z, logp, eps = _inputs(B, dtype)
    rtol, atol = 1e-5, 1e-6
    rz, rl, rnfe = _reference(sp, z, logp, t0, t1, trace, eps, "dopri5", rtol, atol, None)
    with torch.no_grad():
        z1, l1, nfe = odeint_native(plan, z, logp, t0, t1, trace=trace,
                                    noise=eps if trace == "hutchinson" else None, rtol=rtol, atol=atol)
    assert abs(nfe - rnfe) <= (0 if dtype == torch.float64 else 2), (nfe, rnfe)
    assert nfe >= 14  # a few real steps, not a trivial solve
    _check_tol(z1, rz, rtol, atol)
    _check_tol(l1, rl, rtol, atol)
    assert (z1 - z).abs().max() > 100 * atol  # the state actually moved


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver,step", [("euler", 0.05), ("midpoint", 0.1), ("rk4", 0.15), ("rk4", None)])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (0.9, -0.2)])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_fixed_grid_matches_torchdiffeq(dtype, solver, step, t0, t1, trace):
    sp, plan = _sparse(dtype)
    z, logp, eps = _inputs(7, dtype)
    options = None if step is None else {"step_size": step}
    rz, rl, rnfe = _reference(sp, z, logp, t0, t1, trace, eps, solver, 1e-5, 1e-5, options)
    with torch.no_grad():
        z1, l1, nfe = odeint_native(plan, z, logp, t0, t1, trace=trace, solver=solver, options=options,
                                    noise=eps if trace == "hutchinson" else None)
    assert nfe == rnfe
    _check_round(z1, rz, dtype)
    _check_round(l1, rl, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_no_trace_matches_torchdiffeq(dtype, solver):
    # z alone (transform / inverse / sample): torchdiffeq's norm is then the RMS of z alone.
    sp, plan = _sparse(dtype)
    z, _, _ = _inputs(33, dtype)
    options = {"step_size": 0.1} if solver == "rk4" else None
    rz, _, rnfe = _reference(sp, z, None, 1.0, 0.0, "none", None, solver, 1e-6, 1e-6, options)
    with torch.no_grad():
        z1, l1, nfe = odeint_native(plan, z, None, 1.0, 0.0, trace="none", solver=solver,
                                    options=options, rtol=1e-6, atol=1e-6)
    assert l1 is None
    assert abs(nfe - rnfe) <= (0 if dtype == torch.float64 else 2)
    if solver == "rk4":
        _check_round(z1, rz, dtype)
    else:
        _check_tol(z1, rz, 1e-6, 1e-6)


def test_dopri5_against_dense_torch_field():
    # An independent field: the masked dense ODEnet in torch (float64), exact trace.
    net = _pruned_odenet(torch.float64, act="softplus", seed=3)
    plan = SparseODEnet.from_odenet(net).fused_plan(torch.float64)
    z, logp, _ = _inputs(9, torch.float64, seed=4)
    rz, rl, rnfe = _reference(net, z, logp, 0.0, 1.0, "exact", None, "dopri5", 1e-6, 1e-6, None)
    with torch.no_grad():
        z1, l1, nfe = odeint_native(plan, z, logp, 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert nfe == rnfe
    _check_tol(z1, rz, 1e-6, 1e-6, factor=1.0)
    _check_tol(l1, rl, 1e-6, 1e-6, factor=1.0)


def test_dopri5_options_match_torchdiffeq():
    sp, plan = _sparse(torch.float64)
    z, logp, _ = _inputs(9, torch.float64)
    options = {"first_step": 0.01, "max_step": 0.2, "safety": 0.8, "ifactor": 5.0, "dfactor": 0.3}
    rz, rl, rnfe = _reference(sp, z, logp, 0.0, 1.0, "exact", None, "dopri5", 1e-6, 1e-6, options)
    with torch.no_grad():
        z1, l1, nfe = odeint_native(plan, z, logp, 0.0, 1.0, rtol=1e-6, atol=1e-6, options=options)
    assert nfe == rnfe
    _check_tol(z1, rz, 1e-6, 1e-6, factor=1.0)
    _check_tol(l1, rl, 1e-6, 1e-6, factor=1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_step_independently(threads):
    # Each chunk is its own solve: its NFE and result are torchdiffeq's on that chunk alone.
    sp, plan = _sparse(torch.float64)
    z, logp, _ = _inputs(23, torch.float64)
    z[:5] *= 4.0  # a harder first chunk: it needs more steps than the others
    with torch.no_grad():
        z1, l1, nfes = odeint_native(plan, z, logp, 0.0, 1.0, rtol=1e-6, atol=1e-6,
                                     options={"chunk": 5}, threads=threads)
    assert isinstance(nfes, tuple) and len(nfes) == 5
    for c, nfe in enumerate(nfes):
        sl = slice(5 * c, 5 * c + 5)
        rz, rl, rnfe = _reference(sp, z[sl], logp[sl], 0.0, 1.0, "exact", None, "dopri5", 1e-6, 1e-6, None)
        assert nfe == rnfe, (c, nfe, rnfe)
        _check_tol(z1[sl], rz, 1e-6, 1e-6, factor=1.0)
        _check_tol(l1[sl], rl, 1e-6, 1e-6, factor=1.0)
    assert len(set(nfes)) > 1  # the chunks really chose their own steps


def test_threads_do_not_change_results():
    # B(D+1) = 1.26M state elements: above the size (2^20) where the solver's own vector passes and
    # norms are split across threads; a tiny field keeps the test fast.
    _, plan = _sparse(torch.float64, hidden=(8,))
    z, logp, eps = _inputs(140_000, torch.float64)
    with torch.no_grad():
        a = odeint_native(plan, z, logp, 0.0, 0.5, threads=1, trace="hutchinson", noise=eps)
        b = odeint_native(plan, z, logp, 0.0, 0.5, threads=2, trace="hutchinson", noise=eps)
    assert a[2] == b[2]
    _check_round(b[0], a[0], torch.float64)
    _check_round(b[1], a[1], torch.float64)


def _exploding(dtype):
    # A linear field with a huge gain: the state grows like exp(1e3 t) and overflows.
    net = _pruned_odenet(dtype, act="none", density=1.0, seed=5, scale=40.0)
    return SparseODEnet.from_odenet(net, block=BLOCK).fused_plan(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exploding_dopri5_raises(dtype):
    plan = _exploding(dtype)
    z, logp, _ = _inputs(4, dtype)
    with torch.no_grad(), pytest.raises(_C.SolveError, match=r"dopri5 solver failed: .* at t = .*[Tt]ry"):
        odeint_native(plan, z, logp, 0.0, 1.0)


def test_exploding_fixed_step_raises():
    plan = _exploding(torch.float32)
    z, logp, _ = _inputs(4, torch.float32)
    with torch.no_grad(), pytest.raises(_C.SolveError, match=r"rk4 solver failed: the state became non-finite"):
        odeint_native(plan, z, logp, 0.0, 1.0, solver="rk4", options={"step_size": 0.1})


def test_max_num_steps_raises():
    _, plan = _sparse(torch.float64)
    z, logp, _ = _inputs(3, torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"max_num_steps \(2\) exceeded at t = "):
        odeint_native(plan, z, logp, 0.0, 1.0, rtol=1e-9, atol=1e-9, options={"max_num_steps": 2})


def test_step_size_underflow_raises():
    # At t = 1e8 a step of 1e-12 does not move the time: torchdiffeq's "underflow in dt".
    sp, plan = _sparse(torch.float64)
    z, logp, _ = _inputs(3, torch.float64)
    opts = {"first_step": 1e-12}
    with torch.no_grad(), pytest.raises(_C.SolveError, match=r"step size underflow \(dt = 1e-12\) at t = 1e\+08"):
        odeint_native(plan, z, logp, 1e8, 1e8 + 1, options=opts)
    with pytest.raises(AssertionError, match="underflow in dt"):
        _reference(sp, z, logp, 1e8, 1e8 + 1, "exact", None, "dopri5", 1e-5, 1e-5, opts)


def test_torchdiffeq_fails_too_on_the_exploding_field():
    # The error is a property of the problem, not of the native solver.
    plan32 = _exploding(torch.float32)
    net = _pruned_odenet(torch.float32, act="none", density=1.0, seed=5, scale=40.0)
    sp = SparseODEnet.from_odenet(net, block=BLOCK)
    z, logp, _ = _inputs(4, torch.float32)
    with pytest.raises(AssertionError):
        _reference(sp, z, logp, 0.0, 1.0, "exact", None, "dopri5", 1e-5, 1e-5, {"max_num_steps": 5000})
    assert plan32.dim_in == DIM


def test_hutchinson_draws_noise_and_defaults():
    _, plan = _sparse(torch.float32)
    z, _, _ = _inputs(5, torch.float32)
    with torch.no_grad():
        z1, l1, nfe = odeint_native(plan, z, None, 0.0, 1.0, trace="hutchinson")
    assert z1.shape == z.shape and l1.shape == (5,) and torch.isfinite(l1).all() and nfe > 2


def test_bad_inputs():
    sp, plan = _sparse(torch.float32)
    plan64 = sp.fused_plan(torch.float64)
    z, logp, eps = _inputs(4, torch.float32)
    with torch.no_grad():
        with pytest.raises(TypeError, match="FieldPlanF64 but z0 is torch.float32"):
            odeint_native(plan64, z, logp, 0.0, 1.0)
        with pytest.raises(TypeError, match="plan must be"):
            odeint_native(sp, z, logp, 0.0, 1.0)
        with pytest.raises(ValueError, match=r"z0 must have shape \[B >= 1, 8\]"):
            odeint_native(plan, z[:, :5], logp, 0.0, 1.0)
        with pytest.raises(ValueError, match=r"logp0 must have shape \[4\]"):
            odeint_native(plan, z, logp[:3], 0.0, 1.0)
        with pytest.raises(TypeError, match="logp0 is torch.float64"):
            odeint_native(plan, z, logp.double(), 0.0, 1.0)
        with pytest.raises(ValueError, match="noise is only used"):
            odeint_native(plan, z, logp, 0.0, 1.0, noise=eps)
        with pytest.raises(ValueError, match="logp0 must be None"):
            odeint_native(plan, z, logp, 0.0, 1.0, trace="none")
        with pytest.raises(ValueError, match="unknown solver"):
            odeint_native(plan, z, logp, 0.0, 1.0, solver="bosh3")
        with pytest.raises(ValueError, match="unknown trace"):
            odeint_native(plan, z, logp, 0.0, 1.0, trace="hutch")
        with pytest.raises(ValueError, match=r"unsupported option\(s\) \['step_size'\]"):
            odeint_native(plan, z, logp, 0.0, 1.0, options={"step_size": 0.1})
        with pytest.raises(ValueError, match="step_size must be > 0"):
            odeint_native(plan, z, logp, 0.0, 1.0, solver="rk4", options={"step_size": -0.1})
        with pytest.raises(ValueError, match="t0 and t1 must differ"):
            odeint_native(plan, z, logp, 0.5, 0.5)
        with pytest.raises(ValueError, match="atol must be > 0"):
            odeint_native(plan, z, logp, 0.0, 1.0, atol=0.0)
        with pytest.raises(ValueError, match="contains NaN"):
            odeint_native(plan, z.clone().fill_(math.nan), logp, 0.0, 1.0)
        with pytest.raises(TypeError, match="max_num_steps must be an int"):
            odeint_native(plan, z, logp, 0.0, 1.0, options={"max_num_steps": 10.0})
    with pytest.raises(ValueError, match="no gradient"):
        odeint_native(plan, z.requires_grad_(), logp, 0.0, 1.0)
    with pytest.raises(ValueError, match="expected one of dopri5"):  # the binding checks on its own
        _C.native_odeint(plan, z.detach().numpy(), logp.numpy(), None, z.detach().numpy().copy(),
                         logp.numpy().copy(), 0.0, 1.0, method="heun")


# ---- wired into CNF: jf.sparsify(model) solves natively for inference by default ------------------
# float32 at 1e-6 sits at the rounding floor, where step acceptance is decided by rounding noise.
CNF_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _cnf_pair(dtype, solver, trace, options=None, dim=DIM):
    net = _pruned_odenet(dtype, dim=dim)
    model = jf.CNF(dim=dim, hidden=HIDDEN, trace=trace, solver=solver, rtol=CNF_TOL[dtype], atol=CNF_TOL[dtype],
                   options=options or {}).to(dtype)
    model.net.load_state_dict(net.state_dict(), strict=False)
    for src, dst in zip(net.layers, model.net.layers):
        dst.set_mask(src.mask)
    fast = jf.sparsify(model)
    ref = jf.sparsify(model)
    ref.net.native = False  # the same sparse field, integrated by torchdiffeq
    return fast, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("solver,options", [("dopri5", None), ("rk4", {"step_size": 0.1}),
                                            ("euler", {"step_size": 0.05}), ("midpoint", None)])
@pytest.mark.parametrize("batch", [1, 37])
def test_cnf_native_matches_torchdiffeq_path(dtype, trace, solver, options, batch):
    fast, ref = _cnf_pair(dtype, solver, trace, options)
    x = torch.randn(batch, DIM, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.manual_seed(5)  # the same Hutchinson noise on both paths
        a = fast.log_prob(x)
        na, native = fast.nfe["forward"], fast.last_solve["native"]
        torch.manual_seed(5)
        b = ref.log_prob(x)
        nb = ref.nfe["forward"]
        assert native and not ref.last_solve["native"]
        if solver == "dopri5":
            assert abs(na - nb) <= (0 if dtype == torch.float64 else 2)
        else:
            assert na == nb
        tol = 10 * CNF_TOL[dtype] if solver == "dopri5" else ROUND[dtype] * 100
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        za, zb = fast.sample(batch, seed=2), ref.sample(batch, seed=2)
        torch.testing.assert_close(za, zb, rtol=tol, atol=tol)
        torch.testing.assert_close(fast.transform(x), ref.transform(x), rtol=tol, atol=tol)


def test_cnf_native_is_not_used_with_gradients_or_stats():
    fast, _ = _cnf_pair(torch.float64, "dopri5", "exact")
    x = torch.randn(5, DIM, dtype=torch.float64)
    fast.log_prob(x).sum().backward()  # training: torchdiffeq through the per-layer ops
    assert not fast.last_solve["native"]
    with torch.no_grad():
        fast.log_prob(x, return_stats=True)  # R and RNODE integrals: the Python path
        assert not fast.last_solve["native"]
        fast.log_prob(x)
        assert fast.last_solve["native"]


def test_cnf_native_chunks_report_nfe_per_chunk():
    fast, ref = _cnf_pair(torch.float64, "dopri5", "exact")
    fast.net.native_chunk = 8
    x = torch.randn(20, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fast.log_prob(x), ref.log_prob(x)
    chunks = fast.last_solve["chunks"]
    assert len(chunks) == 3 and fast.nfe["forward"] == max(chunks)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cnf_native_failure_is_a_solver_error():
    net = _pruned_odenet(torch.float64, scale=40.0)
    model = jf.CNF(dim=DIM, hidden=HIDDEN, trace="exact", rtol=1e-9, atol=1e-9,
                   options={"max_num_steps": 3}).to(torch.float64)
    model.net.load_state_dict(net.state_dict(), strict=False)
    for src, dst in zip(net.layers, model.net.layers):
        dst.set_mask(src.mask)
    fast = jf.sparsify(model)
    with torch.no_grad(), pytest.raises(jf.SolverError, match="dopri5"):
        fast.log_prob(torch.randn(4, DIM, dtype=torch.float64))
    assert isinstance(jf.SolverError("x"), RuntimeError)


@pytest.mark.parametrize("bad", ["z0", "noise"])
def test_native_solve_of_a_non_finite_input_names_it(bad):
    """SparseODEnet.native_solve skips odeint_native's up-front finiteness passes (CNF checked its input
    and drew the noise); a NaN that reaches the solver anyway is reported as a non-finite state, not as
    the step-size underflow it also causes."""
    net = jf.sparsify(jf.CNF(dim=DIM, hidden=HIDDEN, trace="hutchinson")).net
    gen = torch.Generator().manual_seed(5)
    z, eps = torch.randn(6, DIM, generator=gen), torch.randn(6, DIM, generator=gen)
    (z if bad == "z0" else eps)[2, 1] = float("nan")
    with torch.no_grad(), pytest.raises(jf.SolverError, match="non-finite"):
        net.native_solve(z, torch.zeros(6), 0.0, 1.0, trace="hutchinson", noise=eps, solver="dopri5", rtol=1e-5,
                         atol=1e-5, options={})
