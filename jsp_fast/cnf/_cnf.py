"""The continuous normalizing flow: dz/dt = f(z, t) from data (t=0) to a Gaussian latent (t=T).

``log p(x) = log N(z(T)) + ∫_0^T tr(∂f/∂z) dt``. The trace is exact (all ``dim`` tangents through
``field.jvp``) or Hutchinson's ``εᵀ J ε`` with ε drawn once per solve and held fixed (resampling it
inside an adaptive solve makes the right-hand side random and the step count explode; torchdiffeq
#120). The same tangents give ``‖J‖_F²``, so the regularisers RNODE uses (kinetic energy, Jacobian
Frobenius norm) and the cumulative Jacobian norm ``R = ∫ ‖J‖_F dt`` that JSP scores ride along as
extra ODE states when asked for.

Bounded memory: ``log_prob``, ``transform``, ``inverse`` and ``sample`` take ``batch_size=`` and solve
the points in chunks of that many, concatenating the results. Under ``torch.no_grad()`` (or
``inference_mode``) each chunk's solver state is freed before the next, so peak memory is that of
one chunk; ``None`` then means a default chunk sized from a memory budget (``default_chunk``). With
autograd recording every chunk's graph is kept for the backward, so chunking bounds nothing and
``None`` means one chunk (a training batch is solved as a whole, as before). What chunking keeps:

- With a fixed-step solver every point's result depends only on that point, so chunked results
  equal those of one chunk up to the rounding of the field's matrix products, which BLAS may order
  differently for different row counts (a few ulp; bitwise in practice on the CPU for chunks of 64+
  rows). An adaptive solver picks its steps from the error norm of the whole chunk, so chunked
  results agree with one chunk only to the solver tolerance.
- Hutchinson noise is drawn once for all ``n`` points (one ``randn`` from the global generator, as
  before chunking existed) and sliced per chunk: a point gets the same ε whatever ``batch_size``.
- ``sample(n, seed)`` draws all ``n`` base points from the seeded generator first: the same samples
  for every ``batch_size``.
- ``nfe`` reports, per direction, the *largest* count of any chunk: the evaluations a single solve
  needed, comparable across ``batch_size`` (a sum would grow with the number of chunks).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torch import nn

from ..errors import SolverError  # noqa: F401  (defined there, re-exported by jsp_fast.cnf)
from .._device import check_device
from .. import _linear_mask
from ._layers import ODEnet, check_activation

TRACES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")
SOLVERS = tuple(n for n in _TORCHDIFFEQ_SOLVERS if n != "scipy_solver")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
STATS = ("R", "kinetic", "jacobian")
# ‖J‖_F = sqrt(‖J‖_F² + eps): keeps the gradient finite where a Hutchinson sample of J ε is zero.
FRO_EPS = 1e-8
# Working-set budget of one default chunk (no_grad), by device type. Measured on the CPU (1M 2-d points,
# dense 64x3 exact trace, dopri5, 1 thread; tests/_memory_probe.py): ~3.1 KB per point, i.e. about
# 4 numbers per (tangent + value) per unit of the widest layer (see default_chunk); peak RSS 3.4 GB
# in one chunk, 0.45 GB at 16384 points per chunk, 0.30 GB at 4096 (torch alone: 0.27 GB). 32 MiB
# (10922 such points) keeps the 10k-point batches of `jsp-fast bench e2e` in one chunk: a second chunk
# there cost the fused/native sparse paths 25-40% (a second solve, half the rows per parallel call).
# A GPU wants big launches.
CHUNK_BYTES = {"cpu": 32 << 20}
CHUNK_BYTES_OTHER = 1 << 30
MIN_CHUNK, MAX_CHUNK = 1024, 1 << 20


def _check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int (points per chunk) or None (a default "
                         f"chunk), got {batch_size!r}")
    return int(batch_size)


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
        self._nfe_chunks: list[dict] = []  # one counter per chunk of the last call

    # -- configuration ---------------------------------------------------------------------------
    @property
    def T(self) -> torch.Tensor:
        return self.sqrt_T * self.sqrt_T

    @property
    def nfe(self) -> dict:
        """Function evaluations of the last solve: ``{"forward": int, "backward": int}``.

        For a chunked call, the largest count over its chunks (backward counts grow as the backward
        of each chunk runs); 0 after an empty batch.
        """
        runs = self._nfe_chunks
        return {k: max((r[k] for r in runs), default=0) for k in ("forward", "backward")}

    def with_net(self, net: nn.Module) -> "CNF":
        """A new CNF with this one's configuration, end time and train/eval mode around the field
        ``net`` (``jf.sparsify`` and sparse training swap fields this way)."""
        cfg = self.config()
        keys = ("dim", "trace", "noise", "solver", "rtol", "atol", "adjoint", "train_T", "options")
        out = CNF(**{k: cfg[k] for k in keys}, T=1.0, net=net)
        ref = self.sqrt_T
        out.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out.sqrt_T.copy_(ref)
        out.train(self.training)
        return out

    @property
    def last_solve(self) -> dict:
        """How the last solve ran: ``{"native": bool}`` (one native call, or torchdiffeq), plus
        ``"chunks"`` (the NFE of each chunk) when the field stepped chunks independently
        (``SparseODEnet.native_chunk``). With ``batch_size=`` chunking, the last ``batch_size`` chunk."""
        out = {"native": bool(self._nfe.get("native", False))}
        if "chunks" in self._nfe:
            out["chunks"] = list(self._nfe["chunks"])
        return out

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
        check_device(ref.device, "the model")
        check_device(x.device, what)
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
        self._nfe_chunks.append(self._nfe)
        native = self._native_solve(state, t0, t1, trace, stats, eps)
        if native is not None:
            return native
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

    def _native_solve(self, state: tuple, t0, t1, trace: str | None, stats: Sequence[str],
                      eps: torch.Tensor | None) -> tuple | None:
        """The field's own one-call solve (a sparsified field on the CPU: ``SparseODEnet.native_solve``)
        when it offers one and nothing needs a gradient; None otherwise, and torchdiffeq integrates.
        Same solver, tolerances, options and Hutchinson noise, so the same steps and NFE."""
        solve = getattr(self.net, "native_solve", None)
        if solve is None or stats or state[0].shape[0] == 0:
            return None
        if torch.is_grad_enabled() and (any(s.requires_grad for s in state)
                                        or any(p.requires_grad for p in self.parameters())):
            return None
        out = solve(state[0], None if trace is None else state[1], t0, t1, trace=trace, noise=eps,
                    solver=self.solver, rtol=self.rtol, atol=self.atol, options=self._options())
        if out is None:
            return None
        z1, logp1, nfe = out
        if isinstance(nfe, tuple):  # independent step sizes per batch chunk: one count per chunk
            self._nfe["chunks"] = list(nfe)
            nfe = max(nfe)
        self._nfe.update(forward=int(nfe), solved=True, native=True)
        return (z1,) if trace is None else (z1, logp1)

    def _noise(self, z: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(z)
        return torch.sign(eps) if self.noise == "rademacher" else eps

    # -- chunking --------------------------------------------------------------------------------
    def default_chunk(self, trace: str | None = None) -> int:
        """Points per chunk that ``batch_size=None`` uses under no_grad, for a solve with ``trace``.

        A field evaluation holds about 4 numbers per point per (tangent + value) per unit of the widest
        layer (pre-activation, activation, derivative, the next layer's input; measured, see
        ``CHUNK_BYTES``): the chunk is the device's budget over that, clamped to
        [MIN_CHUNK, MAX_CHUNK]. 10922 points for a 2-d 64-wide exact-trace model on the CPU.
        """
        widths = [int(w) for w in getattr(self.net, "hidden", ()) or ()]
        if not widths:  # a user field: its widest weight stands in for its widest layer
            widths = [max(p.shape) for p in self.net.parameters() if p.dim() == 2] or [self.dim]
        tangents = self.dim if trace == "exact" else 1 if trace == "hutchinson" else 0
        per_point = 4 * (tangents + 1) * max(max(widths), self.dim) * self.sqrt_T.element_size()
        budget = CHUNK_BYTES.get(self.sqrt_T.device.type, CHUNK_BYTES_OTHER)
        return int(min(MAX_CHUNK, max(MIN_CHUNK, budget // per_point)))

    def _chunk(self, n: int, batch_size, trace: str | None) -> int:
        batch_size = _check_batch_size(batch_size)
        if batch_size is not None:
            return batch_size
        if torch.is_grad_enabled():  # the graphs of all chunks are kept anyway: solve the batch whole
            return max(n, 1)
        return self.default_chunk(trace)

    def _chunks(self, n: int, chunk: int):
        self._nfe_chunks = []
        return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]

    # -- public solves ---------------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, return_stats: bool = False, batch_size: int | None = None):
        """Log-density of ``x`` (nats, per sample).

        With ``return_stats=True`` also returns per-sample integrals along the trajectory:
        ``{"R": ∫‖J‖_F dt, "kinetic": ∫‖f‖² dt, "jacobian": ∫‖J‖_F² dt}`` (Hutchinson estimates
        when ``trace="hutchinson"``). ``batch_size``: points per solve (see the module docstring).
        """
        x = self._check_input(x)
        n = x.shape[0]
        chunk = self._chunk(n, batch_size, self.trace)
        stats = STATS if return_stats else ()
        # One draw for all points (chunk-invariant noise; the same global-RNG use as one solve).
        eps = self._noise(x) if self.trace == "hutchinson" and n else None
        logps, outs = [], []
        for sl in self._chunks(n, chunk):
            xc = x[sl]
            zeros = xc.new_zeros(xc.shape[0])
            state = (xc, zeros) + tuple(zeros for _ in stats)
            out = self._solve(state, 0.0, self.T, self.trace, stats, None if eps is None else eps[sl])
            logps.append(_standard_normal_logprob(out[0]) - out[1])
            outs.append(out[2:])
        if not logps:  # n == 0: nothing to solve (the solver would fail on an empty state)
            logp = x.new_zeros(0)
            return (logp, {k: x.new_zeros(0) for k in stats}) if return_stats else logp
        logp = logps[0] if len(logps) == 1 else torch.cat(logps)
        if return_stats:
            cols = zip(*outs)
            return logp, {k: (c[0] if len(c) == 1 else torch.cat(c)) for k, c in zip(stats, cols)}
        return logp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def _map(self, z: torch.Tensor, t0, t1, batch_size) -> torch.Tensor:
        n = z.shape[0]
        parts = [self._solve((z[sl],), t0, t1, None)[0] for sl in self._chunks(n, self._chunk(n, batch_size, None))]
        if not parts:
            return z.new_zeros(0, self.dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def transform(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Map data to the latent: z(T) from z(0) = x."""
        return self._map(self._check_input(x), 0.0, self.T, batch_size)

    def inverse(self, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Map latents back to data: z(0) from z(T) = z."""
        return self._map(self._check_input(z, "z"), self.T, 0.0, batch_size)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Draw ``n`` samples: Gaussian latents (from ``seed`` when given) mapped back to data.

        All ``n`` latents are drawn before solving, so ``batch_size`` does not change which points
        come out (for a fixed-step solver; to the tolerance for an adaptive one).
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        _check_batch_size(batch_size)
        ref = self.sqrt_T
        gen = torch.Generator(device=ref.device)
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        z = torch.randn(int(n), self.dim, generator=gen, device=ref.device, dtype=ref.dtype)
        return self.inverse(z, batch_size=batch_size)
