"""Measuring a trained CNF the way the pruning claim is stated: ``R = ∫_0^T ‖J(z(t), t)‖_F dt`` per point.

``CNF.log_prob(x, return_stats=True)`` integrates ``R`` next to the log-density, with the solve's one
Hutchinson vector ``ε``: ``sqrt(‖J ε‖²)`` is then an estimate of ``‖J‖_F`` that is biased *low*
(Jensen: ``E sqrt(X) <= sqrt(E X)``), by an amount that depends on the Jacobian's spectrum, so it is
not even the same bias for two models. It also adds ODE states, and so adaptive steps, to the solve
whose NFE gets reported.

``jacobian_norm`` integrates ``z`` and ``R`` only (no trace, no log-density), with

- the exact ``‖J‖_F² = Σ_i ‖J e_i‖²`` (``dim`` tangents) when ``dim <= exact_max_dim``, else
- ``probes`` Rademacher vectors per point, fixed for the whole solve and drawn from their own seeded
  generator (the global RNG is untouched): ``‖J‖_F² ≈ mean_k ‖J ε_k‖²`` (unbiased, as
  ``E[ε εᵀ] = I``), averaged *before* the square root, per point and per time. The square root of
  the average still underestimates a little, but the bias shrinks like ``1 / probes``.

The trajectory is the data-to-latent flow from ``t = 0`` to ``T = model.T`` at the model's current
solver and tolerances; the NFE of this solve is returned too but is *not* the model's cost (it
carries the ``R`` state): measure that on a plain ``log_prob``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torchdiffeq
from torch import nn

from ._cnf import FRO_EPS, SolverError

__all__ = ["EXACT_MAX_DIM", "PROBES", "JacobianNorm", "jacobian_norm"]

EXACT_MAX_DIM = 16  # exact ‖J‖_F up to this many dimensions (dim tangents per evaluation)
PROBES = 8  # noise vectors per point otherwise


@dataclass
class JacobianNorm:
    """``R`` per point (``[n]``) and how it was measured."""

    R: torch.Tensor
    estimator: str  # "exact" or "hutchinson"
    probes: int  # tangents per point and evaluation (dim for exact)
    nfe: int  # forward evaluations of the largest chunk's solve
    T: float

    def describe(self) -> str:
        if self.estimator == "exact":
            return f"exact ‖J‖_F ({self.probes} tangents), T = {self.T:g}"
        return (f"sqrt(mean over {self.probes} Rademacher vectors of ‖J ε‖²) per point and time, "
                f"T = {self.T:g}")


class _NormDynamics(nn.Module):
    def __init__(self, field: nn.Module, tangents: torch.Tensor, exact: bool, counter: list):
        super().__init__()
        self.field, self.tangents, self.exact, self.counter = field, tangents, exact, counter

    def forward(self, t, state):
        z = state[0]
        f, jv = self.field.jvp(t, z, self.tangents)
        sq = (jv * jv).sum(-1)  # [T, B]
        fro2 = sq.sum(0) if self.exact else sq.mean(0)
        self.counter[0] += 1
        return f, torch.sqrt(fro2 + FRO_EPS)


def _check(model, x, probes, exact_max_dim, batch_size) -> None:
    if not hasattr(model, "net") or not hasattr(model, "T"):
        raise TypeError(f"model must be a jf.CNF, got {type(model).__name__}")
    if not hasattr(model.net, "jvp"):
        raise TypeError(f"the model's field ({type(model.net).__name__}) has no jvp(t, z, v)")
    for name, v, lo in (("probes", probes, 1), ("exact_max_dim", exact_max_dim, 0), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != model.dim or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a non-empty [n, {model.dim}] tensor, got {shape}")


@torch.no_grad()
def jacobian_norm(model, x: torch.Tensor, probes: int = PROBES, exact_max_dim: int = EXACT_MAX_DIM,
                  seed: int = 0, batch_size: int = 512) -> JacobianNorm:
    """``R = ∫_0^T ‖J‖_F dt`` for every row of ``x`` (see the module docstring for the estimator).

    ``seed`` fixes the Rademacher probes (a point gets the same probes whatever ``batch_size``);
    ``batch_size`` points are solved at a time.
    """
    _check(model, x, probes, exact_max_dim, batch_size)
    n, d = x.shape
    exact = d <= exact_max_dim
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if not exact:  # drawn on the CPU so the probes do not depend on the device
        eps = (torch.randint(0, 2, (probes, n, d), generator=gen).to(x.dtype) * 2 - 1).to(x.device)
    T = model.T.detach()
    ts = torch.stack([torch.zeros((), dtype=x.dtype, device=x.device), T.to(x.dtype).reshape(())])
    out, nfe = [], 0
    for i in range(0, n, batch_size):
        xc = x[i:i + batch_size]
        if exact:
            v = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1).expand(d, xc.shape[0], d)
        else:
            v = eps[:, i:i + batch_size]
        counter = [0]
        dyn = _NormDynamics(model.net, v, exact, counter)
        try:
            sol = torchdiffeq.odeint(dyn, (xc, xc.new_zeros(xc.shape[0])), ts, rtol=model.rtol, atol=model.atol,
                                     method=model.solver, options=model._options())
        except (AssertionError, RuntimeError) as exc:
            if "underflow in dt" in str(exc) or "max_num_steps" in str(exc):
                raise SolverError(f"the R solve failed ({exc}) at rtol={model.rtol}, atol={model.atol}") from exc
            raise
        out.append(sol[1][-1])
        nfe = max(nfe, counter[0])
    return JacobianNorm(R=torch.cat(out), estimator="exact" if exact else "hutchinson",
                        probes=d if exact else int(probes), nfe=nfe, T=float(T))
