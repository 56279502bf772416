"""The CNF core against closed forms, autograd and its own invariants."""
import math

import pytest
import torch

import jsp_fast as jf
from jsp_fast.cnf import ACTIVATIONS, ODEnet, SolverError


def _linear_cnf(dim=3, T=0.7, seed=0):
    """A CNF whose field is exactly f(z) = A z, built through the ordinary ODEnet code path.

    One concatsquash layer, no activation, zero time shift: f = diag(g) W z with g = sigmoid(b_g).
    """
    torch.manual_seed(seed)
    m = jf.CNF(dim, hidden=(), activation="none", rtol=1e-10, atol=1e-10, T=T).double()
    layer = m.net.layers[0]
    with torch.no_grad():
        layer.linear.weight.copy_(torch.randn(dim, dim, dtype=torch.float64) * 0.8)
        layer.linear.bias.zero_()
        layer.hyper_gate.weight.zero_()
        layer.hyper_gate.bias.copy_(torch.randn(dim, dtype=torch.float64))
        layer.hyper_bias.weight.zero_()
    A = torch.sigmoid(layer.hyper_gate.bias)[:, None] * layer.linear.weight
    return m, A.detach()


def test_linear_field_matches_closed_form():
    m, A = _linear_cnf()
    T = float(m.T)
    x = torch.randn(50, 3, dtype=torch.float64)
    expA = torch.linalg.matrix_exp(T * A)
    z_ref = x @ expA.T
    logp_ref = -0.5 * (z_ref**2).sum(-1) - 1.5 * math.log(2 * math.pi) + T * torch.trace(A)
    torch.testing.assert_close(m.transform(x), z_ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(m.inverse(z_ref), x, rtol=1e-7, atol=1e-8)
    logp, stats = m.log_prob(x, return_stats=True)
    torch.testing.assert_close(logp, logp_ref, rtol=1e-7, atol=1e-8)
    # ‖J‖_F is constant along the flow, so R = T‖A‖_F and ∫‖J‖_F² = T‖A‖_F².
    fro = torch.linalg.matrix_norm(A)
    torch.testing.assert_close(stats["R"], torch.full((50,), T * math.sqrt(fro.item()**2 + 1e-8),
                                                       dtype=torch.float64), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats["jacobian"], torch.full((50,), T * fro.item()**2, dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    # Kinetic energy ∫‖A z(t)‖² dt by quadrature of the closed-form trajectory.
    ts = torch.linspace(0, T, 2001, dtype=torch.float64)
    zs = torch.stack([x @ torch.linalg.matrix_exp(t * A).T for t in ts])
    ke = torch.trapezoid(((zs @ A.T) ** 2).sum(-1), ts, dim=0)
    torch.testing.assert_close(stats["kinetic"], ke, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
def test_jvp_matches_autograd_and_masks_apply(activation):
    torch.manual_seed(1)
    net = ODEnet(3, (7, 5), activation).double()
    mask = torch.rand_like(net.layers[1].linear.weight) > 0.5
    net.layers[1].set_mask(mask)
    assert torch.all(net.layers[1].linear.weight[~mask] == 0)
    t = torch.tensor(0.3, dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    v = torch.randn(2, 4, 3, dtype=torch.float64)
    f, jv = net.jvp(t, z, v)
    torch.testing.assert_close(f, net(t, z))
    for i in range(2):
        _, ref = torch.func.jvp(lambda zz: net(t, zz), (z,), (v[i],))
        torch.testing.assert_close(jv[i], ref)
    # Pruned weights get no gradient through the mask.
    net.layers[1].linear.weight.grad = None
    net(t, z).sum().backward()
    assert torch.all(net.layers[1].linear.weight.grad[~mask] == 0)


def test_exact_trace_matches_autograd_jacobian():
    torch.manual_seed(2)
    m = jf.CNF(3, hidden=(8, 8), rtol=1e-8, atol=1e-8).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    from jsp_fast.cnf._cnf import _Dynamics

    dyn = _Dynamics(m.net, "exact", None, ("jacobian",), {"forward": 0, "backward": 0, "solved": False})
    f, neg_tr, fro2 = dyn(t, (z, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)))
    J = torch.stack([torch.autograd.functional.jacobian(lambda zz: m.net(t, zz[None])[0], zi) for zi in z])
    torch.testing.assert_close(-neg_tr, torch.diagonal(J, dim1=1, dim2=2).sum(-1))
    torch.testing.assert_close(fro2, (J**2).sum((1, 2)))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(noise):
    """Mean of εᵀJε over many draws is within 4 standard errors of the exact trace, per sample."""
    torch.manual_seed(3)
    net = ODEnet(4, (16, 16), "tanh").double()
    t = torch.tensor(0.5, dtype=torch.float64)
    z = torch.randn(3, 4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64).unsqueeze(1).expand(4, 3, 4)
    _, jv = net.jvp(t, z, eye)
    exact = torch.diagonal(jv, dim1=0, dim2=2).sum(-1)
    k = 20000
    eps = torch.randn(k, 3, 4, dtype=torch.float64)
    if noise == "rademacher":
        eps = torch.sign(eps)
    _, je = net.jvp(t, z, eps)
    est = (je * eps).sum(-1)  # [k, 3]
    se = est.std(0) / math.sqrt(k)
    assert torch.all((est.mean(0) - exact).abs() < 4 * se), (est.mean(0), exact, se)
    assert torch.all(se > 0)


class _Spy(torch.nn.Module):
    """Wraps a field and records every call, to check what the solver feeds it."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.tangents = []
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return self.net(t, z)

    def jvp(self, t, z, v):
        self.calls += 1
        self.tangents.append(v.detach().clone())
        return self.net.jvp(t, z, v)


def test_hutchinson_noise_fixed_within_a_solve_and_fresh_across():
    torch.manual_seed(4)
    m = jf.CNF(2, hidden=(16,), trace="hutchinson", rtol=1e-4, atol=1e-4)
    spy = _Spy(m.net)
    m.net = spy
    x = torch.randn(64, 2)
    m.log_prob(x)
    first = spy.tangents
    assert len(first) > 2
    assert all(torch.equal(v, first[0]) for v in first)
    spy.tangents = []
    m.log_prob(x)
    assert not torch.equal(spy.tangents[0], first[0])


def test_nfe_counts_every_field_call():
    torch.manual_seed(5)
    m = jf.CNF(2, hidden=(16, 16))
    spy = _Spy(m.net)
    m.net = spy
    x = torch.randn(32, 2)
    logp = m.log_prob(x)
    assert m.nfe["forward"] == spy.calls > 0
    assert m.nfe["backward"] == 0
    logp.mean().backward()
    assert 0 < m.nfe["backward"] <= m.nfe["forward"]
    spy.calls = 0
    m.transform(x)
    assert m.nfe["forward"] == spy.calls


def test_fixed_step_nfe_and_adjoint_backward():
    torch.manual_seed(6)
    x = torch.randn(16, 2)
    m = jf.CNF(2, hidden=(8,), solver="rk4", options={"step_size": 0.25})
    m.log_prob(x).sum().backward()
    assert m.nfe == {"forward": 16, "backward": 16}  # 4 steps × 4 stages, each backpropagated once
    ma = jf.CNF(2, hidden=(8,), adjoint=True)
    ma.load_state_dict(m.state_dict())
    ma.log_prob(x).sum().backward()
    assert ma.nfe["forward"] > 0 and ma.nfe["backward"] > 0
    assert all(p.grad is not None for p in ma.net.parameters())


def test_inverse_of_transform_and_seeded_sampling():
    torch.manual_seed(7)
    m = jf.CNF(2, hidden=(32, 32), rtol=1e-6, atol=1e-6)
    x = torch.randn(200, 2) * 2
    with torch.no_grad():
        torch.testing.assert_close(m.inverse(m.transform(x)), x, rtol=0, atol=1e-4)
    a, b, c = m.sample(100, seed=3), m.sample(100, seed=3), m.sample(100, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (100, 2) and torch.isfinite(a).all()


def test_trainable_end_time_gets_gradient():
    m = jf.CNF(2, hidden=(8,), train_T=True, T=0.5)
    m.log_prob(torch.randn(8, 2)).mean().backward()
    assert m.sqrt_T.grad is not None and m.sqrt_T.grad.abs() > 0
    assert abs(m.config()["T"] - 0.5) < 1e-6


def test_config_round_trip():
    m = jf.CNF(3, hidden=(5, 6), activation="softplus", trace="hutchinson", noise="rademacher",
               solver="rk4", options={"step_size": 0.1}, T=0.8)
    m2 = jf.CNF.from_config(m.config())
    assert m2.config() == m.config()


def test_solver_failure_is_explained():
    m = jf.CNF(2, hidden=(8,), rtol=1e-9, atol=1e-9, options={"max_num_steps": 2})
    with pytest.raises(SolverError, match=r"dopri5.*rtol=1e-09.*Try"):
        m.log_prob(torch.randn(8, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(trace="exactly"), "unknown trace"),
    (dict(noise="uniform"), "unknown noise"),
    (dict(solver="rk5"), "unknown solver"),
    (dict(activation="gelu"), "unknown activation"),
    (dict(rtol=0), "rtol and atol"),
    (dict(T=-1.0), "T must be"),
    (dict(hidden=(0,)), "positive"),
])
def test_bad_construction_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jf.CNF(2, **kwargs)


def test_bad_inputs_are_rejected():
    m = jf.CNF(2, hidden=(8,))
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        m.log_prob(torch.randn(4, 3))
    with pytest.raises(TypeError, match="float64 but the model is torch.float32"):
        m.log_prob(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        m.log_prob(torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        m.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="positive int"):
        m.sample(0)
    with pytest.raises(ValueError, match="does not fit"):
        m.net.layers[0].set_mask(torch.ones(3, 3, dtype=torch.bool))


def test_hutchinson_log_prob_is_unbiased_through_the_solver():
    """For f = A z the Hutchinson log-det is T εᵀAε: its mean over draws is the exact T tr A."""
    m, A = _linear_cnf(dim=3, seed=8)
    m.trace = "hutchinson"
    x = torch.randn(1, 3, dtype=torch.float64).expand(4000, 3).contiguous()
    est = m.log_prob(x)
    m.trace = "exact"
    exact = m.log_prob(x[:1])
    se = est.std() / math.sqrt(len(est))
    assert se > 0 and (est.mean() - exact).abs() < 4 * se


# ---- chunked solves (batch_size=) ----------------------------------------------------------------
class _RowSpy(_Spy):
    """Also records the largest batch the field was called with."""

    def __init__(self, net):
        super().__init__(net)
        self.rows = 0

    def forward(self, t, z):
        self.rows = max(self.rows, z.shape[0])
        return super().forward(t, z)

    def jvp(self, t, z, v):
        self.rows = max(self.rows, z.shape[0])
        return super().jvp(t, z, v)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_chunked_equals_one_chunk_fixed_step(trace):
    """rk4: each point's result depends on that point only; Hutchinson noise is drawn once for all
    points, so any chunking gives the one-chunk answer (float64: to rounding of the products)."""
    torch.manual_seed(10)
    m = jf.CNF(2, hidden=(16, 16), trace=trace, solver="rk4", options={"step_size": 0.25}).double()
    x = torch.randn(203, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(11)
        ref, ref_stats = m.log_prob(x, return_stats=True, batch_size=203)
        for bs in (1, 7, 64, 202, 500):
            torch.manual_seed(11)
            got, stats = m.log_prob(x, return_stats=True, batch_size=bs)
            torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
            for k in ref_stats:
                torch.testing.assert_close(stats[k], ref_stats[k], rtol=1e-13, atol=1e-13)
        z = m.transform(x)
        for bs in (1, 50):
            torch.testing.assert_close(m.transform(x, batch_size=bs), z, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(m.inverse(z, batch_size=bs), m.inverse(z), rtol=1e-13, atol=1e-13)
    # the noise really differs per point: a different seed changes the Hutchinson estimate
    if trace == "hutchinson":
        torch.manual_seed(12)
        assert not torch.allclose(m.log_prob(x, batch_size=64).detach(), ref)


def test_chunked_adaptive_agrees_to_tolerance_and_nfe_is_the_max():
    torch.manual_seed(13)
    m = jf.CNF(2, hidden=(32, 32), rtol=1e-7, atol=1e-7).double()
    x = torch.randn(300, 2, dtype=torch.float64) * 1.5
    spy = _RowSpy(m.net)
    m.net = spy
    with torch.no_grad():
        ref = m.log_prob(x, batch_size=300)
        spy.calls, spy.rows = 0, 0
        got = m.log_prob(x, batch_size=64)
    assert spy.rows == 64
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # nfe: the largest chunk count, not the sum (5 chunks made spy.calls evaluations in all)
    assert 0 < m.nfe["forward"] < spy.calls


def test_fixed_step_nfe_is_per_solve_and_backward_counts_per_chunk():
    torch.manual_seed(14)
    m = jf.CNF(2, hidden=(8,), solver="rk4", options={"step_size": 0.25})
    spy = _RowSpy(m.net)
    m.net = spy
    x = torch.randn(30, 2)
    m.log_prob(x, batch_size=10).sum().backward()
    assert spy.calls == 48 and spy.rows == 10  # 3 chunks x 4 steps x 4 stages
    assert m.nfe == {"forward": 16, "backward": 16}


def test_default_chunk_bounds_rows_under_no_grad_only(monkeypatch):
    import jsp_fast.cnf._cnf as cnf_mod

    torch.manual_seed(15)
    m = jf.CNF(2, hidden=(8,), solver="euler", options={"step_size": 0.5})
    spy = _RowSpy(m.net)
    m.net = spy
    monkeypatch.setattr(cnf_mod, "MIN_CHUNK", 16)
    monkeypatch.setattr(cnf_mod, "CHUNK_BYTES", {"cpu": 1})
    assert m.default_chunk("exact") == 16
    x = torch.randn(100, 2)
    with torch.no_grad():
        lp = m.log_prob(x)
        assert spy.rows == 16
        torch.testing.assert_close(m.sample(40, seed=1), m.sample(40, seed=1, batch_size=40))
    spy.rows = 0
    lp_grad = m.log_prob(x)  # autograd recording: one chunk (chunking would save nothing)
    assert spy.rows == 100 and lp_grad.requires_grad
    torch.testing.assert_close(lp_grad.detach(), lp, rtol=1e-6, atol=1e-6)


def test_chunked_gradients_match():
    torch.manual_seed(16)
    m = jf.CNF(2, hidden=(8, 8), solver="rk4", options={"step_size": 0.5}).double()
    x = torch.randn(40, 2, dtype=torch.float64)
    grads = []
    for bs in (None, 7):
        m.zero_grad()
        m.log_prob(x, batch_size=bs).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sample_is_invariant_to_batch_size():
    torch.manual_seed(17)
    m = jf.CNF(2, hidden=(16,), solver="rk4", options={"step_size": 0.2}).double()
    ref = m.sample(257, seed=5)
    for bs in (1, 16, 100, 1000):
        torch.testing.assert_close(m.sample(257, seed=5, batch_size=bs), ref, rtol=1e-13, atol=1e-13)
    ma = jf.CNF(2, hidden=(16,), rtol=1e-7, atol=1e-7).double()
    torch.testing.assert_close(ma.sample(257, seed=5, batch_size=32), ma.sample(257, seed=5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_empty_batch_gives_empty_results(trace):
    m = jf.CNF(2, hidden=(8,), trace=trace)
    x = torch.zeros(0, 2)
    for ctx in (torch.no_grad(), torch.enable_grad()):
        with ctx:
            logp, stats = m.log_prob(x, return_stats=True)
            assert logp.shape == (0,) and all(v.shape == (0,) for v in stats.values())
            assert set(stats) == {"R", "kinetic", "jacobian"}
            assert m.log_prob(x, batch_size=3).shape == (0,)
            assert m.transform(x).shape == (0, 2) and m.inverse(x).shape == (0, 2)
            assert m.nfe == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True, torch.tensor(8)])
def test_bad_batch_size_is_rejected(bad):
    m = jf.CNF(2, hidden=(8,))
    x = torch.randn(4, 2)
    for call in (lambda: m.log_prob(x, batch_size=bad), lambda: m.transform(x, batch_size=bad),
                 lambda: m.inverse(x, batch_size=bad), lambda: m.sample(4, batch_size=bad)):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            call()


@pytest.mark.parametrize("x, err, match", [
    (torch.randn(5), ValueError, r"shape \[n, 2\]"),
    (torch.randn(2, 5, 2), ValueError, r"shape \[n, 2\]"),
    (torch.randn(0, 3), ValueError, r"shape \[n, 2\]"),
    (torch.tensor([[float("inf"), 0.0]]), ValueError, "NaN or inf"),
    (torch.zeros(3, 2, dtype=torch.float16), TypeError, "float16 but the model"),
    ([[0.0, 1.0]], TypeError, "torch.Tensor"),
])
def test_bad_points_are_rejected_by_every_solve(x, err, match):
    m = jf.CNF(2, hidden=(8,))
    for f in (m.log_prob, m.transform, m.inverse):
        with pytest.raises(err, match=match):
            f(x, batch_size=2)
