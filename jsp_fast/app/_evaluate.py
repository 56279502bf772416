"""The end-of-training test evaluation shared by ``compare`` and ``figure2``: what the claim is about.

Two solves, each measuring one thing:

1. a *plain* ``log_prob`` of the test points (z and the log-density only, no statistics riding along)
   at the evaluation tolerance: the test NLL (and bits/dim) and the forward NFE, the cost of a
   density evaluation. (A solve that also integrates ``R`` and the RNODE terms takes 18-62% more
   steps, unevenly across models, so its NFE is not the model's cost.)
2. ``R = ∫_0^T ‖J‖_F dt`` per point by ``jsp_fast.cnf._measure.jacobian_norm``: exact for
   ``dim <= 16``, else 8 Rademacher probes per point averaged before the square root.

Both run from ``t = 0`` to the model's ``T`` with the global RNG forked and seeded (Hutchinson noise of
the NLL solve), so an evaluation is reproducible.
"""
from __future__ import annotations

import time

import torch

from ..cnf._measure import EXACT_MAX_DIM, PROBES, jacobian_norm

__all__ = ["MEASURE_NOTE", "evaluate"]

MEASURE_NOTE = ("NFE = forward evaluations of a plain `log_prob` solve (no R statistics riding along) at the "
                "evaluation tolerance; R = ∫_0^T ‖J‖_F dt from a separate solve")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, tol: float, bits_per_dim=None, R_points: int | None = None,
             probes: int = PROBES, seed: int = 0) -> dict:
    """Test metrics of ``model`` on ``x`` at ``rtol = atol = tol`` (restored afterwards); the record keys
    ``test_nll``, ``test_bpd`` (with ``bits_per_dim``), ``test_nfe_forward`` (plain solve), ``test_R``
    (mean over the first ``R_points`` rows, all by default), ``test_R_nfe`` and ``measure``."""
    rtol, atol = model.rtol, model.atol
    model.rtol = model.atol = tol
    device = x.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            t = time.perf_counter()
            logp = model.log_prob(x)
            out = {"test_nll": float(-logp.double().mean()), "test_nfe_forward": int(model.nfe["forward"]),
                   "eval_seconds": time.perf_counter() - t}
            if bits_per_dim is not None:
                out["test_bpd"] = float(torch.as_tensor(bits_per_dim(logp, x)).double().mean())
        xr = x if R_points is None else x[:R_points]
        t = time.perf_counter()
        jn = jacobian_norm(model, xr, probes=probes, exact_max_dim=EXACT_MAX_DIM, seed=seed)
        out.update(test_R=float(jn.R.double().mean()), test_R_nfe=jn.nfe, R_seconds=time.perf_counter() - t)
        out["measure"] = {"nfe": "plain log_prob", "R": jn.describe(), "R_estimator": jn.estimator,
                          "R_probes": jn.probes, "R_points": int(xr.shape[0]), "T": jn.T, "tol": tol,
                          "trace": getattr(model, "trace", None)}
        return out
    finally:
        model.rtol, model.atol = rtol, atol
