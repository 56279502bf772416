"""The continuous normalizing flow: dz/dt = f(z, t) from data (t=0) to a Gaussian latent (t=T).

``log p(x) = log N(z(T)) + ∫_0^T tr(∂f/∂z) dt``. The trace is exact (all ``dim`` tangents through
``field.jvp``) or Hutchinson's ``εᵀ J ε`` with ε drawn once per solve and held fixed (resampling it
inside an adaptive solve makes the right-hand side random and the step count explode; torchdiffeq
#120). The same tangents give ``‖J‖_F²``, so the regularisers RNODE uses (kinetic energy, Jacobian
Frobenius norm) and the cumulative Jacobian norm ``R = ∫ ‖J‖_F dt`` that JSP scores ride along as
extra ODE states when asked for.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torch import nn

from .. import _linear_mask
from ._layers import ODEnet, check_activation

TRACES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")
SOLVERS = tuple(n for n in _TORCHDIFFEQ_SOLVERS if n != "scipy_solver")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
STATS = ("R", "kinetic", "jacobian")
# ‖J‖_F = sqrt(‖J‖_F² + eps): keeps the gradient finite where a Hutchinson sample of J ε is zero.
FRO_EPS = 1e-8


class SolverError(RuntimeError):
    """The ODE solver gave up (step-size underflow, step budget exhausted)."""


def _field_jvp(field: nn.Module, t, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(t, z), J v)`` for tangents ``v`` [T, B, D]: the field's own ``jvp`` when it has one, else
    ``torch.func.jvp`` (vmapped over the T tangents) through its ``forward``, so any ``f(t, z)`` works.
    The result stays differentiable in the field's parameters (training through the trace)."""
    jvp = getattr(field, "jvp", None)
    if jvp is not None:
        return jvp(t, z, v)

    def one(vi):
        return torch.func.jvp(lambda zz: field(t, zz), (z,), (vi,))

    if v.shape[0] == 1:
        f, jv = one(v[0])
        return f, jv.unsqueeze(0)
    f, jv = torch.func.vmap(one)(v)
    return f[0], jv


def _standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class _Dynamics(nn.Module):
    """Right-hand side of one solve: z, optionally the log-density change and integrals of stats."""

    def __init__(self, field: nn.Module, trace: str | None, eps: torch.Tensor | None,
                 stats: Sequence[str], counter: dict):
        super().__init__()
        self.field = field
        self.trace = trace
        self.eps = eps
        self.stats = tuple(stats)
        self.counter = counter

    def _count(self, out: torch.Tensor) -> torch.Tensor:
        if not self.counter["solved"]:  # adjoint re-evaluations during backward are backward NFE
            self.counter["forward"] += 1
        if out.requires_grad:
            # Fires once per evaluation whose backward runs: the backward NFE, adjoint or not.
            def hook(g, counter=self.counter):
                counter["backward"] += 1
                return g

            out.register_hook(hook)
        return out

    def forward(self, t, state):
        z = state[0]
        if self.trace is None:
            return (self._count(self.field(t, z)),)
        n, d = z.shape
        if self.trace == "exact":
            v = torch.eye(d, dtype=z.dtype, device=z.device).unsqueeze(1).expand(d, n, d)
            f, jv = _field_jvp(self.field, t, z, v)
            tr = torch.diagonal(jv, dim1=0, dim2=2).sum(-1)  # Σ_i (J e_i)_i, per sample
            fro2 = (jv * jv).sum(dim=(0, 2)) if self.stats else None
        else:
            f, jv = _field_jvp(self.field, t, z, self.eps.unsqueeze(0))
            jv = jv[0]
            tr = (jv * self.eps).sum(-1)
            fro2 = (jv * jv).sum(-1) if self.stats else None
        f = self._count(f)
        out = [f, -tr]
        for name in self.stats:
            if name == "R":
                out.append(torch.sqrt(fro2 + FRO_EPS))
            elif name == "kinetic":
                out.append((f * f).sum(-1))
            else:
                out.append(fro2)
        return tuple(out)


class CNF(nn.Module):
    """FFJORD-style continuous normalizing flow over ``dim``-dimensional data.

    Args:
        dim: data dimension.
        hidden: widths of the concatsquash hidden layers.
        activation: tanh, softplus, elu, relu, sigmoid.
        trace: "exact" (``dim`` tangents per evaluation) or "hutchinson" (one, fixed per solve).
        noise: Hutchinson noise, "gaussian" or "rademacher".
        solver: a torchdiffeq method (dopri5, rk4, euler, ...); ``options`` are passed to it.
            Fixed-step solvers default to ``step_size = T / 20`` when ``options`` gives none.
        rtol, atol: adaptive solver tolerances.
        T: integration end time. ``train_T`` makes it a parameter (FFJORD's learned end time).
        adjoint: integrate gradients with the adjoint method (memory O(1) in the steps).
        net: use this field instead of building an ``ODEnet``: any module with ``forward(t, z)``
            (e.g. a block-sparse ``SparseODEnet``, or your own torchdiffeq right-hand side). One with
            ``jvp(t, z, v)`` gives the traces itself; for one without, they go through ``torch.func.jvp``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh",
                 trace: str = "exact", noise: str = "gaussian", solver: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, T: float = 1.0, adjoint: bool = False,
                 train_T: bool = False, options: dict | None = None, net: nn.Module | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if trace not in TRACES:
            raise ValueError(f"unknown trace {trace!r}; expected one of {TRACES}")
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; expected one of {NOISES}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
        if not (T > 0 and math.isfinite(T)):
            raise ValueError(f"T must be a positive finite number, got {T}")
        self.dim = dim
        self.trace = trace
        self.noise = noise
        self.solver = solver
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.adjoint = bool(adjoint)
        self.train_T = bool(train_T)
        self.options = dict(options or {})
        self.net = net if net is not None else ODEnet(dim, hidden, check_activation(activation))
        sqrt_T = torch.tensor(math.sqrt(T))
        if train_T:
            self.sqrt_T = nn.Parameter(sqrt_T)
        else:
            self.register_buffer("sqrt_T", sqrt_T)
        self._nfe = {"forward": 0, "backward": 0, "solved": True}

    # -- configuration ---------------------------------------------------------------------------
    @property
    def T(self) -> torch.Tensor:
        return self.sqrt_T * self.sqrt_T

    @property
    def nfe(self) -> dict:
        """Function evaluations of the last solve: ``{"forward": int, "backward": int}``."""
        return {"forward": self._nfe["forward"], "backward": self._nfe["backward"]}

    def config(self) -> dict[str, Any]:
        net = self.net
        return {
            "dim": self.dim, "hidden": list(getattr(net, "hidden", ())),
            "activation": getattr(net, "activation", "tanh"), "trace": self.trace, "noise": self.noise,
            "solver": self.solver, "rtol": self.rtol, "atol": self.atol, "T": float(self.T.detach()),
            "adjoint": self.adjoint, "train_T": self.train_T, "options": dict(self.options),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "CNF":
        keys = ("dim", "hidden", "activation", "trace", "noise", "solver", "rtol", "atol", "T",
                "adjoint", "train_T", "options")
        return cls(**{k: cfg[k] for k in keys if k in cfg})

    def prunable_parameters(self) -> dict[str, nn.Parameter]:
        """The main field weights ``W`` of every concatsquash layer, by their ``named_parameters`` name.

        For a field of another kind (``net=`` your own module): the weight of every ``nn.Linear`` in it
        that takes more than one input (a ``Linear(1, n)`` is a time hyper-layer), named
        ``net.<module>.weight`` (the Parameter is ``weight_orig`` when it is pruned in
        ``torch.nn.utils.prune``'s format).
        """
        # ODEnet and SparseODEnet (recognised without importing sparse/: it has sparse_layers).
        if isinstance(self.net, ODEnet) or hasattr(self.net, "sparse_layers"):
            return {name: p for name, p in self.named_parameters()
                    if name.startswith("net.layers.") and name.endswith(".linear.weight")}
        return {f"net.{q}.weight": _linear_mask.trainable_weight(m) for q, m in self.net.named_modules()
                if isinstance(m, nn.Linear) and m.in_features > 1}

    def apply_masks_(self) -> None:
        """Re-zero pruned weights (``jf.train`` calls this after every optimizer step)."""
        for m in self.modules():
            if m is not self and hasattr(m, "apply_mask_"):
                m.apply_mask_()
            elif isinstance(m, nn.Linear) and _linear_mask.get_mask(m)[1] == "jf.prune":
                with torch.no_grad():
                    m.weight.mul_(m.weight_mask)

    # -- solving ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, what: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of shape [n, {self.dim}], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape [n, {self.dim}], got {tuple(x.shape)}")
        ref = self.sqrt_T
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{what} is {x.dtype} but the model is {ref.dtype}: convert one of them "
                            f"(x.to({ref.dtype}) or model.to({x.dtype}))")
        if x.device != ref.device:
            raise ValueError(f"{what} is on {x.device} but the model is on {ref.device}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or inf")
        return x

    def _options(self) -> dict:
        opts = dict(self.options)
        if self.solver in FIXED_STEP_SOLVERS and "step_size" not in opts:
            opts["step_size"] = float(self.T.detach()) / 20.0
        return opts

    def _solve(self, state: tuple, t0, t1, trace: str | None, stats: Sequence[str] = (),
               eps: torch.Tensor | None = None) -> tuple:
        self._nfe = {"forward": 0, "backward": 0, "solved": False}
        dyn = _Dynamics(self.net, trace, eps, stats, self._nfe)
        ts = torch.stack([torch.as_tensor(t0, dtype=state[0].dtype, device=state[0].device).reshape(()),
                          torch.as_tensor(t1, dtype=state[0].dtype, device=state[0].device).reshape(())])
        kw = dict(rtol=self.rtol, atol=self.atol, method=self.solver, options=self._options())
        try:
            if self.adjoint:
                out = torchdiffeq.odeint_adjoint(dyn, state, ts, adjoint_params=tuple(self.parameters()), **kw)
            else:
                out = torchdiffeq.odeint(dyn, state, ts, **kw)
        except (AssertionError, RuntimeError) as exc:
            msg = str(exc)
            if "underflow in dt" in msg or "max_num_steps" in msg:
                raise SolverError(
                    f"the {self.solver} solver failed ({msg}) at rtol={self.rtol}, atol={self.atol} "
                    f"after {self._nfe['forward']} evaluations. Try looser tolerances, a fixed-step "
                    f"solver (solver='rk4', options={{'step_size': ...}}), RNODE regularisation "
                    f"(reg={{'kinetic': 0.01, 'jacobian': 0.01}}), or check the data scale."
                ) from exc
            raise
        self._nfe["solved"] = True
        return tuple(s[-1] for s in out)

    def _noise(self, z: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(z)
        return torch.sign(eps) if self.noise == "rademacher" else eps

    def log_prob(self, x: torch.Tensor, return_stats: bool = False):
        """Log-density of ``x`` (nats, per sample).

        With ``return_stats=True`` also returns per-sample integrals along the trajectory:
        ``{"R": ∫‖J‖_F dt, "kinetic": ∫‖f‖² dt, "jacobian": ∫‖J‖_F² dt}`` (Hutchinson estimates
        when ``trace="hutchinson"``).
        """
        x = self._check_input(x)
        n = x.shape[0]
        zeros = x.new_zeros(n)
        stats = STATS if return_stats else ()
        eps = self._noise(x) if self.trace == "hutchinson" else None
        state = (x, zeros) + tuple(zeros for _ in stats)
        out = self._solve(state, 0.0, self.T, self.trace, stats, eps)
        z, neg_int_tr = out[0], out[1]
        logp = _standard_normal_logprob(z) - neg_int_tr
        if return_stats:
            return logp, dict(zip(stats, out[2:]))
        return logp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Map data to the latent: z(T) from z(0) = x."""
        return self._solve((self._check_input(x),), 0.0, self.T, None)[0]

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents back to data: z(0) from z(T) = z."""
        return self._solve((self._check_input(z, "z"),), self.T, 0.0, None)[0]

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """Draw ``n`` samples: Gaussian latents (from ``seed`` when given) mapped back to data."""
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        ref = self.sqrt_T
        gen = torch.Generator(device=ref.device)
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        z = torch.randn(n, self.dim, generator=gen, device=ref.device, dtype=ref.dtype)
        return self.inverse(z)
