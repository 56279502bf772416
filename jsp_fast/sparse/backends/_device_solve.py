"""Whole CNF solves on the device around a fused field (the GPU engines): ``odeint_device``.

The C++ native solve (``_cpu_solve``) runs the solver loop in C++ around the CPU field. On a GPU the
field is one kernel launch (Triton: ``kernels.fused_field``; CUDA: ``csrc/cuda``), and what costs is
the host: torchdiffeq runs ~20 small torch ops and Python per stage. Here the loop keeps everything on
the device: the state is one flat tensor ``y = [z (B·D) | logp (B)]`` (as in ``solve.cpp``), the time is
a device scalar (the fused fields take ``t`` as a tensor, so no copy per evaluation), and

- the fixed-grid solvers (``euler``, ``midpoint``, ``rk4`` with torchdiffeq's 3/8 rule and grid) have
  no host synchronisation at all; on CUDA the whole solve is captured in one CUDA graph per (shape,
  solver, grid, plan) and replayed (``graph=True``, the default there);
- ``dopri5`` (torchdiffeq's tableau, initial step, mixed RMS error norm over (z, logp), controller
  with ``min_step``/``max_step``/``safety``/``ifactor``/``dfactor``, interpolation back to ``t1``)
  synchronises once per step: the accept/reject decision reads the error ratio on the host.

Results and NFE follow torchdiffeq's (same steps; values equal up to rounding), which the tests check on
the CPU with a torch field. Only the "triton" and "cuda" fused fields offer it (``solve``): on the CPU the
C++ native solve is faster. Inference only (no gradient).
"""
from __future__ import annotations

import math
import warnings

import torch

from ...cnf import SolverError

__all__ = ["SOLVERS", "DeviceSolve", "capture", "odeint_device", "refusal"]

SOLVERS = ("dopri5", "euler", "midpoint", "rk4")
_ADAPTIVE = ("first_step", "min_step", "max_step", "safety", "ifactor", "dfactor", "max_num_steps")
_FIXED = ("step_size",)

# torchdiffeq's _DORMAND_PRINCE_SHAMPINE_TABLEAU and DPS_C_MID (as in csrc/cpu/solve.cpp).
_ALPHA = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_BETA = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_ERR = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
        -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
_MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
        187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)
_ORDER = 5


def refusal(solver: str, options: dict) -> str | None:
    """Why ``odeint_device`` cannot take ``solver``/``options`` (None: it can)."""
    if solver not in SOLVERS:
        return f"solver {solver!r} (device solve: {SOLVERS})"
    extra = sorted(set(options) - set(_ADAPTIVE if solver == "dopri5" else _FIXED))
    return f"options {extra}" if extra else None


class _Rhs:
    """d[z, logp]/ds of the flat state at solver time s (s = t, or -t backwards as torchdiffeq's
    _ReverseFunc), one fused-field call per evaluation."""

    def __init__(self, run, plan, B: int, D: int, trace: str, noise, rev: bool, like: torch.Tensor):
        self.run, self.plan, self.B, self.D, self.rev = run, plan, B, D, rev
        self.nz, self.trace, self.noise, self.nfe = B * D, trace, noise, 0
        self.v = None
        if trace == "exact":
            self.v = torch.eye(D, dtype=like.dtype, device=like.device).unsqueeze(1).expand(D, B, D).contiguous()
        elif trace == "hutchinson":
            self.v = noise.unsqueeze(0)

    def __call__(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        f, jv = self.run(self.plan, -s if self.rev else s, y[: self.nz].view(self.B, self.D), self.v)
        out = torch.empty_like(y)
        out[: self.nz] = (-f if self.rev else f).reshape(-1)
        if self.trace == "exact":
            tr = jv.diagonal(dim1=0, dim2=2).sum(-1)  # (J e_i)_i summed over i, per row
        elif self.trace == "hutchinson":
            tr = (jv[0] * self.noise).sum(-1)
        else:
            return out
        out[self.nz:] = tr if self.rev else -tr  # dlogp/dt = -tr; -(-tr) backwards
        return out


def _mixed_rms(x: torch.Tensor, nz: int) -> torch.Tensor:
    """torchdiffeq's norm of a (z, logp) tuple state: the max of the parts' RMS (a device scalar)."""
    r = x[:nz].pow(2).mean().sqrt()
    return r if x.shape[0] == nz else torch.maximum(r, x[nz:].pow(2).mean().sqrt())


def _grid(start: float, end: float, step_size: float | None, dtype, device) -> torch.Tensor:
    """torchdiffeq's _grid_constructor_from_step_size (in the state's dtype); [start, end] without a step."""
    if not step_size:
        return torch.tensor([start, end], dtype=dtype, device=device)
    n = int(math.ceil(float((torch.tensor(end, dtype=dtype) - start) / step_size + 1)))
    grid = torch.arange(0, n, dtype=dtype, device=device) * step_size + start
    grid[-1] = end
    return grid


def _fixed_grid(rhs: _Rhs, y: torch.Tensor, grid: torch.Tensor, solver: str):
    for i in range(grid.shape[0] - 1):
        ta, tb = grid[i], grid[i + 1]
        dt = tb - ta
        k1 = rhs(ta, y)
        if solver == "euler":
            y = y + dt * k1
        elif solver == "midpoint":
            half = 0.5 * dt
            y = y + dt * rhs(ta + half, y + k1 * half)
        else:  # torchdiffeq's rk4_alt_step_func (the 3/8 rule)
            third = 1.0 / 3
            k2 = rhs(ta + dt * third, y + dt * k1 * third)
            k3 = rhs(ta + dt * (2 * third), y + dt * (k2 - k1 * third))
            k4 = rhs(tb, y + dt * (k1 - k2 + k3))
            y = y + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
    return y


def _dopri5(rhs: _Rhs, y: torch.Tensor, s: float, s_end: float, rtol: float, atol: float, opt: dict):
    nz, dtype, dev = rhs.nz, y.dtype, y.device
    min_step, max_step = opt.get("min_step", 0.0), opt.get("max_step", math.inf)
    safety, ifactor, dfactor = opt.get("safety", 0.9), opt.get("ifactor", 10.0), opt.get("dfactor", 0.2)
    max_steps = opt.get("max_num_steps", 2**31 - 1)

    def T(x):
        return torch.as_tensor(x, dtype=dtype, device=dev)

    k0 = rhs(T(s), y)
    if "first_step" in opt:
        dt = float(opt["first_step"])
    else:  # torchdiffeq's _select_initial_step, its scalars in the state's dtype (on the host)
        scale = atol + y.abs() * rtol
        d0, d1 = (_mixed_rms(x / scale, nz).abs().cpu() for x in (y, k0))
        h0 = torch.tensor(1e-6, dtype=dtype) if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = h0.abs()
        f1 = rhs(T(s) + h0.to(dev), y + h0.to(dev) * k0)
        d2 = (_mixed_rms((f1 - k0) / scale, nz).cpu() / h0).abs()
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = torch.maximum(torch.tensor(1e-6, dtype=dtype), h0 * 1e-3)
        else:
            h1 = (0.01 / torch.maximum(d1, d2)) ** (1.0 / _ORDER)
        dt = float(torch.minimum(100 * h0, h1.abs()))
    steps = 0
    while True:
        if steps >= max_steps:
            raise SolverError(f"dopri5 solver failed: max_num_steps ({max_steps}) exceeded at t = {s:.6g}")
        if not math.isfinite(dt):
            dt = min_step
        dt = min(max(dt, min_step), max_step)
        if not (s + dt > s):
            raise SolverError(f"dopri5 solver failed: step size underflow (dt = {dt:.6g}) at t = {s:.6g}")
        steps += 1
        s1 = s + dt
        t0T, dtT, t1T = T(s), T(dt), T(s1)
        K = [k0]
        for i in range(6):
            ti = torch.nextafter(t1T, T(-math.inf)) if _ALPHA[i] == 1.0 else t0T + _ALPHA[i] * dtT
            yi = y + sum(K[j] * (_BETA[i][j] * dtT) for j in range(i + 1))
            if i == 5:
                y1 = yi
            K.append(rhs(ti, yi))
        err = sum(K[j] * (_ERR[j] * dtT) for j in range(7))
        tol = atol + rtol * torch.maximum(y.abs(), y1.abs())
        ratio = _mixed_rms(err / tol, nz).abs().item()  # the one host synchronisation of a step
        if math.isnan(ratio) and not min_step > 0:
            raise SolverError(f"dopri5 solver failed: the field returned non-finite values (NaN) at t = {s:.6g}")
        accept = (ratio <= 1 or dt <= min_step) and dt <= max_step
        factor = ifactor if ratio == 0 else min(ifactor, max(safety / ratio ** (1 / _ORDER),
                                                             1.0 if ratio < 1 else dfactor))
        dt_next = min(max(dt * factor, min_step), max_step)
        if accept:
            if s1 >= s_end:  # torchdiffeq's _interp_fit / _interp_evaluate back to s_end
                x = T((s_end - s) / (s1 - s))
                ym = y + sum(K[j] * (dtT * _MID[j]) for j in range(7))
                f0, f1_ = K[0], K[6]
                a = 2 * dtT * (f1_ - f0) - 8 * (y1 + y) + 16 * ym
                b = dtT * (5 * f0 - 3 * f1_) + 18 * y + 14 * y1 - 32 * ym
                c = dtT * (f1_ - 4 * f0) - 11 * y - 5 * y1 + 16 * ym
                return y + x * (dtT * f0) + x ** 2 * c + x ** 3 * b + x ** 4 * a
            y, k0, s = y1, K[6], s1
        dt = dt_next


_GRAPHS: dict = {}


def capture(fn, static: list[torch.Tensor]):
    """``(graph, out)``: ``fn(*static)`` captured in a CUDA graph (``graph.replay()`` recomputes ``out``
    from the current contents of ``static``), after one warm-up call on a side stream (kernel
    compilation and allocator warm-up must happen outside the capture). Also used by bench/gpu_fields.py."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def _graphed(key, fn, inputs: list[torch.Tensor]):
    """``fn(*inputs)`` replayed from a CUDA graph captured on first use (static copies of ``inputs``).
    Capture failing (an engine that synchronises) falls back to running ``fn`` eagerly, with a warning."""
    entry = _GRAPHS.get(key)
    if entry is None:
        static = [x.clone() for x in inputs]
        try:
            graph, out = capture(fn, static)
        except RuntimeError as exc:  # noqa: BLE001
            warnings.warn(f"device solve: CUDA graph capture failed ({exc}); running the solve eagerly",
                          stacklevel=3)
            _GRAPHS[key] = False
            return fn(*inputs)
        entry = _GRAPHS[key] = (graph, static, out)
        if len(_GRAPHS) > 64:  # bounded: the oldest capture goes
            _GRAPHS.pop(next(iter(_GRAPHS)))
    if entry is False:
        return fn(*inputs)
    graph, static, out = entry
    for s, x in zip(static, inputs):
        s.copy_(x)
    graph.replay()
    return out.clone()


def odeint_device(run, plan, z0: torch.Tensor, logp0: torch.Tensor | None, t0: float, t1: float, *,
                  trace: str, noise: torch.Tensor | None, solver: str, rtol: float, atol: float,
                  options: dict | None = None, graph: bool | None = None):
    """Integrate ``(z, logp)`` from ``t0`` to ``t1`` with the fused field ``run(plan, t, z, v) -> (f, Jv)``.

    Same contract as ``_cpu_solve.odeint_native`` (``z0`` [B, D], ``trace`` "exact" / "hutchinson" with
    ``noise`` [B, D] / "none", returns ``(z1, logp1 or None, nfe)``), for tensors on any device.
    ``graph``: capture fixed-grid solves in a CUDA graph (default: on CUDA tensors). A failed solve raises
    ``SolverError``.
    """
    options = dict(options or {})
    why = refusal(solver, options)
    if why is not None:
        raise ValueError(f"odeint_device cannot take {why}")
    B, D = z0.shape
    rev = t1 < t0
    s0, s1 = (-t0, -t1) if rev else (t0, t1)
    with torch.no_grad():
        parts = [z0.reshape(-1)]
        if trace != "none":
            parts.append(z0.new_zeros(B) if logp0 is None else logp0)
        y0 = torch.cat(parts)
        rhs = _Rhs(run, plan, B, D, trace, noise, rev, z0)
        if solver == "dopri5":
            y = _dopri5(rhs, y0, float(s0), float(s1), float(rtol), float(atol), options)
            nfe = rhs.nfe
        else:
            step = options.get("step_size")
            grid = _grid(float(s0), float(s1), step, z0.dtype, z0.device)

            def solve(y_in, noise_in):
                rhs.noise = noise_in
                if trace == "hutchinson":
                    rhs.v = noise_in.unsqueeze(0)
                return _fixed_grid(rhs, y_in, grid, solver)

            use_graph = z0.is_cuda if graph is None else graph
            inputs = [y0, noise if noise is not None else y0.new_zeros(0)]
            if use_graph:
                key = (id(plan), solver, trace, B, D, z0.dtype, z0.device, float(s0), float(s1), step)
                y = _graphed(key, solve, inputs)
            else:
                y = solve(*inputs)
            nfe = (grid.shape[0] - 1) * {"euler": 1, "midpoint": 2, "rk4": 4}[solver]
        if not torch.isfinite(y).all():
            raise SolverError(f"{solver} solver failed: the state became non-finite (NaN or inf) integrating "
                              f"from {t0:.6g} to {t1:.6g}")
    z1 = y[: B * D].view(B, D)
    return z1, (y[B * D:] if trace != "none" else None), nfe


class DeviceSolve:
    """The whole-solve offer of a fused field whose ``run(plan, t, z, v)`` takes ``t`` as a device tensor
    (the registry's ``solve``/``solve_refusal``, used by ``SparseODEnet.native_solve``)."""

    def solve_refusal(self, solver: str, options: dict) -> str | None:
        return refusal(solver, options)

    def solve(self, plan, z0, logp0, t0, t1, *, trace, noise, solver, rtol, atol, options):
        return odeint_device(self.run, plan, z0, logp0, t0, t1, trace=trace, noise=noise, solver=solver, rtol=rtol,
                             atol=atol, options=options)
