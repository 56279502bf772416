"""jsp_fast.cnf._measure.jacobian_norm against hand-computed R, and app._evaluate's plain-solve NFE."""
import math

import pytest
import torch
from torch import nn

import jsp_fast as jf
from jsp_fast.app._evaluate import evaluate
from jsp_fast.cnf._measure import jacobian_norm


class _Linear(nn.Module):
    """f(t, z) = z Aᵀ: J = A everywhere, so R = T · ‖A‖_F exactly."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, z):
        return z @ self.A.T

    def jvp(self, t, z, v):
        return z @ self.A.T, v @ self.A.T


def _linear_cnf(A, T=1.0):
    d = A.shape[0]
    return jf.CNF(d, trace="exact", T=T, rtol=1e-8, atol=1e-8, net=_Linear(A))


@pytest.mark.parametrize("d, T", [(3, 1.0), (7, 0.5)])
def test_exact_R_of_a_linear_field(d, T):
    g = torch.Generator().manual_seed(d)
    A = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    model = _linear_cnf(A, T).double()
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    jn = jacobian_norm(model, x)
    want = T * math.sqrt(float((A * A).sum()) + 1e-8)
    assert jn.estimator == "exact" and jn.probes == d and jn.T == pytest.approx(T)
    assert torch.allclose(jn.R, torch.full((5,), want, dtype=torch.float64), rtol=1e-6)
    assert jn.nfe > 0


def test_probes_average_before_the_root_and_one_probe_is_biased_low():
    """A nearly rank-one J: one probe's sqrt(‖Aε‖²) = 3 |1ᵀε| / sqrt(d) underestimates ‖A‖_F (Jensen:
    E|1ᵀε| / sqrt(d) ≈ 0.8); 64 probes averaged before the root nearly remove the bias."""
    d = 24
    A = torch.zeros(d, d, dtype=torch.float64)
    A[0] = 3.0 / math.sqrt(d)
    A += 0.05 * torch.eye(d, dtype=torch.float64)
    model = _linear_cnf(A).double()
    x = torch.zeros(400, d, dtype=torch.float64)
    exact = float(jacobian_norm(model, x[:4], exact_max_dim=d).R.mean())
    one = float(jacobian_norm(model, x, probes=1, exact_max_dim=0, seed=1).R.mean())
    many = float(jacobian_norm(model, x, probes=64, exact_max_dim=0, seed=1).R.mean())
    assert exact == pytest.approx(math.sqrt(float((A * A).sum()) + 1e-8), rel=1e-6)
    assert one < 0.9 * exact
    assert many == pytest.approx(exact, rel=0.02)


def test_probes_are_seeded_and_chunk_invariant():
    torch.manual_seed(0)
    model = jf.CNF(20, hidden=(16,), trace="hutchinson", rtol=1e-6, atol=1e-6)
    x = torch.randn(10, 20)
    state = torch.get_rng_state()
    a = jacobian_norm(model, x, seed=3, batch_size=10).R
    b = jacobian_norm(model, x, seed=3, batch_size=3).R
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.allclose(a, b, rtol=1e-4)
    assert not torch.allclose(a, jacobian_norm(model, x, seed=4).R, rtol=1e-4)


def test_jacobian_norm_rejects_bad_input():
    model = jf.CNF(2, hidden=(8,))
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        jacobian_norm(model, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="probes"):
        jacobian_norm(model, torch.zeros(4, 2), probes=0)
    with pytest.raises(TypeError, match="jf.CNF"):
        jacobian_norm(nn.Linear(2, 2), torch.zeros(4, 2))


def test_evaluate_reports_the_plain_solve():
    """The NFE evaluate reports is that of a plain log_prob at the evaluation tolerance, not of the
    solve that carries R; R comes from jacobian_norm; the model's tolerances are restored."""
    torch.manual_seed(1)
    model = jf.CNF(2, hidden=(16, 16), rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a field with some structure, so the solves take a few steps
    x = torch.randn(64, 2)
    out = evaluate(model, x, 1e-5)
    assert (model.rtol, model.atol) == (1e-2, 1e-2)
    model.rtol = model.atol = 1e-5
    with torch.no_grad():
        logp = model.log_prob(x)
    assert out["test_nfe_forward"] == model.nfe["forward"]
    assert out["test_nll"] == pytest.approx(float(-logp.double().mean()), rel=1e-6)
    assert out["test_R"] == pytest.approx(float(jacobian_norm(model, x).R.mean()), rel=1e-6)
    assert out["measure"]["R_estimator"] == "exact" and out["measure"]["nfe"] == "plain log_prob"
