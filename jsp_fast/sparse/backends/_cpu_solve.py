"""Whole CNF solves in one native call (CPU): ``odeint_native``.

A solve through torchdiffeq pays Python and Runge-Kutta bookkeeping on every stage; with a sparse
field that bookkeeping is a third of the solve. Here the whole solve of the FFJORD augmented
dynamics

    dz/dt = f(t, z),    dlogp/dt = -tr(df/dz)

runs in C++ (``csrc/cpu/solve.cpp``) around the packed one-call field (``FieldPlanF32/F64``,
``csrc/cpu/field.h``). The solvers follow torchdiffeq step for step (same steps, same NFE, results
equal up to rounding): ``dopri5`` (its initial step, error norm over the tuple state, step-size
control, steps past ``t1`` and interpolation back) and the fixed-grid ``euler``, ``midpoint`` and
``rk4`` (torchdiffeq's 3/8 rule) with ``options={"step_size": h}`` (one step over the whole interval
without it). No gradients: inference only.

It is the ``"cpu"`` fused field's ``solve`` (``backends/cpu.py``): ``CNF`` reaches it through
``SparseODEnet.native_solve`` whenever the registry picks the C++ field for the inputs and no gradient
is needed. What it computes, in ``CNF`` terms (the field packed by ``SparseODEnet.fused_plan(dtype)``;
``T = float(cnf.T)``)::

    # cnf.log_prob(x) under no_grad
    z, dlogp, nfe = odeint_native(plan, x, None, 0.0, T, trace=cnf.trace, noise=eps,
                                  solver=cnf.solver, rtol=cnf.rtol, atol=cnf.atol,
                                  options=cnf._options())
    logp = standard_normal_logprob(z) - dlogp      # dlogp = ∫ -tr dt; nfe == cnf.nfe["forward"]
    # cnf.sample(n) / cnf.inverse(z): latents back to data, no density
    x, _, nfe = odeint_native(plan, z, None, T, 0.0, trace="none", ...)
    # cnf.transform(x): odeint_native(plan, x, None, 0.0, T, trace="none", ...)

``eps`` is the Hutchinson noise CNF draws per solve (``cnf._noise(x)``); it is held fixed for the
whole solve, as CNF does. Times are rounded to the state's dtype first, as CNF's time tensor is.

Failures (step-size underflow, a non-finite state, ``max_num_steps`` exceeded) raise
``jsp_fast._C.SolveError`` (a ``RuntimeError``; ``CpuField.solve`` turns it into ``jf.SolverError``)
whose message names the solver, the time reached and what to try.
"""
from __future__ import annotations

import math

import torch

from ..._ext import require_C

SOLVERS = ("dopri5", "euler", "midpoint", "rk4")
TRACES = ("exact", "hutchinson", "none")
# torchdiffeq's option names; "chunk" is ours (independent step sizes per batch chunk).
_ADAPTIVE_OPTIONS = ("first_step", "min_step", "max_step", "safety", "ifactor", "dfactor",
                     "max_num_steps", "chunk")
_FIXED_OPTIONS = ("step_size", "chunk")


def _positive(name, x, allow_zero=False, integer=False):
    ok_type = (int,) if integer else (int, float)
    if isinstance(x, bool) or not isinstance(x, ok_type):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(x).__name__}")
    if not (math.isfinite(x) or (name == "max_step" and x == math.inf)) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {x!r}")
    return x


def _tensor(name, x, shape, dtype, check_finite=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (the native solve is CPU-only), got {x.device}")
    if x.dtype != dtype:
        raise TypeError(f"{name} is {x.dtype} but z0 is {dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x.detach().contiguous()


def _time(name, t, dtype):
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {list(t.shape)}")
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(t).__name__}")
    if not math.isfinite(t):
        raise ValueError(f"{name} must be finite, got {t!r}")
    # CNF builds its time tensor in the state's dtype; round the same way so grids and steps match.
    return torch.tensor(float(t), dtype=dtype).item()


def _options(solver, options):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    allowed = _ADAPTIVE_OPTIONS if solver == "dopri5" else _FIXED_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unsupported option(s) {unknown} for solver {solver!r}; the native solve "
                         f"supports {list(allowed)}")
    out = {}
    for k, v in options.items():
        if k in ("max_num_steps", "chunk"):
            out[k] = _positive(k, v, integer=True)
        elif k == "min_step":
            out[k] = float(_positive(k, v, allow_zero=True))
        else:
            out[k] = float(_positive(k, v))
    if out.get("min_step", 0.0) > out.get("max_step", math.inf):
        raise ValueError(f"min_step ({out['min_step']}) must not exceed max_step ({out['max_step']})")
    return out


def odeint_native(plan, z0: torch.Tensor, logp0: torch.Tensor | None, t0, t1, *,
                  trace: str = "exact", noise: torch.Tensor | None = None, solver: str = "dopri5",
                  rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None,
                  threads: int | None = None, check_finite: bool = True):
    """Integrate ``(z, logp)`` from ``t0`` to ``t1`` (either direction) in one native call.

    Args:
        plan: the packed field, a ``jsp_fast._C.FieldPlanF32`` or ``FieldPlanF64`` (square: D -> D)
            of the same dtype as ``z0``.
        z0: ``[B, D]`` CPU float32/float64 state.
        logp0: ``[B]`` initial log-density change, or None for zeros. Must be None with
            ``trace="none"``.
        t0, t1: start and end times (numbers or 1-element tensors), ``t0 != t1``.
        trace: "exact" (D tangents), "hutchinson" (``noise``, fixed for the whole solve) or "none"
            (z only; ``logp1`` is None).
        noise: ``[B, D]`` Hutchinson noise; None draws ``torch.randn_like(z0)``. Only with
            ``trace="hutchinson"``.
        solver: "dopri5", "euler", "midpoint" or "rk4".
        rtol, atol: dopri5 tolerances (``atol > 0``, ``rtol >= 0``); defaults are CNF's.
        options: dopri5: ``first_step``, ``min_step``, ``max_step``, ``safety``, ``ifactor``,
            ``dfactor``, ``max_num_steps`` (torchdiffeq's meaning and defaults). Fixed-step:
            ``step_size``. Either: ``chunk`` (rows): solve each chunk of the batch on its own,
            with its own step sizes; chunks run in parallel when there are at least ``threads``.
        threads: CPU threads (default ``torch.get_num_threads()``).
        check_finite: refuse a non-finite ``z0``/``logp0``/``noise`` up front (a ValueError). ``CNF`` passes
            False: it checked its input and drew the noise itself, and the solver stops on a non-finite
            state anyway (``SolveError``); the two passes cost ~0.3 ms per solve (2% of a digits solve).

    Returns:
        ``(z1, logp1, nfe)``: ``z1`` ``[B, D]``, ``logp1`` ``[B]`` (``logp0 + ∫ -tr dt``; None with
        ``trace="none"``), ``nfe`` the field evaluations (an int; with ``chunk``, a tuple with one
        count per chunk).

    Raises:
        SolveError: the solve failed (step-size underflow, non-finite state, max_num_steps).
        TypeError, ValueError: bad arguments.
    """
    C = require_C()
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; the native solve supports {SOLVERS}")
    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; expected one of {TRACES}")
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape [B, D], got {type(z0).__name__}")
    if z0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"z0 must be float32 or float64, got {z0.dtype}")
    plan_cls = C.FieldPlanF32 if z0.dtype == torch.float32 else C.FieldPlanF64
    if not isinstance(plan, (C.FieldPlanF32, C.FieldPlanF64)):
        raise TypeError(f"plan must be a jsp_fast._C.FieldPlanF32/F64 (SparseODEnet.fused_plan), got {type(plan).__name__}")
    if not isinstance(plan, plan_cls):
        raise TypeError(f"plan is {type(plan).__name__} but z0 is {z0.dtype}: build the plan for "
                        f"{z0.dtype}")
    if plan.num_layers == 0:
        raise ValueError("plan has no layers")
    D = plan.dim_in
    if plan.dim_out != D:
        raise ValueError(f"a solve needs a square field, the plan maps {D} -> {plan.dim_out}")
    if z0.dim() != 2 or z0.shape[1] != D or z0.shape[0] == 0:
        raise ValueError(f"z0 must have shape [B >= 1, {D}], got {list(z0.shape)}")
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in (z0, logp0, noise)):
        raise ValueError("odeint_native has no gradient: call it under torch.no_grad() or pass "
                         "detached tensors")
    dtype, B = z0.dtype, z0.shape[0]
    z0 = _tensor("z0", z0, (B, D), dtype, check_finite)
    if trace == "none":
        if logp0 is not None:
            raise ValueError("logp0 must be None with trace='none' (no log-density is integrated)")
    else:
        logp0 = z0.new_zeros(B) if logp0 is None else _tensor("logp0", logp0, (B,), dtype, check_finite)
    if trace == "hutchinson":
        noise = torch.randn_like(z0) if noise is None else _tensor("noise", noise, (B, D), dtype, check_finite)
    elif noise is not None:
        raise ValueError(f"noise is only used with trace='hutchinson', got trace={trace!r}")
    t0, t1 = _time("t0", t0, dtype), _time("t1", t1, dtype)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ (in {dtype}), got {t0} and {t1}")
    rtol = float(_positive("rtol", rtol, allow_zero=True))
    atol = float(_positive("atol", atol))
    opts = _options(solver, options)
    if "step_size" in opts and abs(t1 - t0) / opts["step_size"] > 2**31 - 2:
        raise ValueError(f"step_size {opts['step_size']} needs more than 2^31 steps over [{t0}, {t1}]")
    threads = torch.get_num_threads() if threads is None else _positive("threads", threads, integer=True)

    z1 = torch.empty_like(z0)
    logp1 = None if trace == "none" else torch.empty_like(logp0)
    stats = C.native_odeint(
        plan, z0.numpy(), None if logp0 is None else logp0.numpy(),
        None if noise is None else noise.numpy(), z1.numpy(), None if logp1 is None else logp1.numpy(),
        t0, t1, method=solver, trace=trace, rtol=rtol, atol=atol,
        step_size=opts.get("step_size", 0.0), first_step=opts.get("first_step", math.nan),
        min_step=opts.get("min_step", 0.0), max_step=opts.get("max_step", math.inf),
        safety=opts.get("safety", 0.9), ifactor=opts.get("ifactor", 10.0),
        dfactor=opts.get("dfactor", 0.2), max_num_steps=opts.get("max_num_steps", 2**31 - 1),
        chunk=opts.get("chunk", 0), num_threads=threads)
    nfe = tuple(s[0] for s in stats) if "chunk" in opts else stats[0][0]
    return z1, logp1, nfe
