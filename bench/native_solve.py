"""The native whole solve against torchdiffeq around the same fused field, and its overhead per step.

A digits-like CNF (64-d, hidden 512x3, tanh) pruned at init with 32x32 blocks (random scores) and
sparsified; ``log_prob`` of a batch of digits under ``no_grad`` (dopri5, 1e-5). Providers, timed
round-robin (``jsp_fast._timing``): ``torchdiffeq`` (``fast.net.native = False``: torchdiffeq steps
around one fused C++ call per evaluation), ``native`` (the default: the whole solve in one call) and
``field x NFE`` (the bare fused field evaluated NFE times, the floor any solver pays), and ``odeint_native``
(the native solve called directly on prepared tensors: what ``native`` costs without CNF's Python around it).
Reported: ``solver_overhead`` = ``odeint_native / (field x NFE) - 1`` (the integrator's own work per
evaluation: stage combinations, the trace reduction, error norms, step control) and
``overhead_per_step_outside_field`` = ``native / (field x NFE) - 1`` (everything, per-solve Python included:
input checks, the Hutchinson noise draw, the plan-cache key, the final log-density).

    python bench/native_solve.py [--batch 1000] [--threads 2] [--repeats 5] [--trace hutchinson]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import jsp_fast as jf
from jsp_fast._timing import round_robin


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trace", default="hutchinson", choices=("exact", "hutchinson"))
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = jf.data.get("digits", seed=0).train[: args.batch].contiguous()
    model = jf.CNF(64, hidden=(512, 512, 512), trace=args.trace, rtol=1e-5, atol=1e-5)
    jf.prune(model, "random", args.sparsity, granularity="block", block=(32, 32))
    model.eval()
    native = jf.sparsify(model)
    stepped = jf.sparsify(model)
    stepped.net.native = False
    t = torch.tensor(0.5)
    v = torch.randn(1 if args.trace == "hutchinson" else 64, *x.shape)
    nfe = {}

    def run(m, name):
        def call():
            torch.manual_seed(1)  # the same Hutchinson noise on both paths
            with torch.no_grad():
                out = m.log_prob(x)
            nfe[name] = m.nfe["forward"]
            return out
        return call

    a, b = run(stepped, "torchdiffeq")(), run(native, "native")()
    assert native.last_solve["native"] and not stepped.last_solve["native"]

    engine = jf.backends.fused_field("cpu")  # the packed C++ field itself: no Python per call but this loop
    plan = native.net.fused_plan(x.dtype, "cpu")

    def field():
        for _ in range(nfe["native"]):
            engine.run(plan, t, x, v)

    from jsp_fast.sparse.backends._cpu_solve import odeint_native

    eps = torch.randn_like(x)

    def solve_only():
        odeint_native(plan, x, None, 0.0, float(native.T), trace=args.trace, noise=eps if args.trace == "hutchinson"
                      else None, rtol=1e-5, atol=1e-5, check_finite=False)

    times = round_robin({"torchdiffeq": run(stepped, "torchdiffeq"), "native": run(native, "native"),
                         "odeint_native": solve_only, "field x NFE": field}, args.repeats)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    result = {
        "batch": args.batch, "threads": args.threads, "trace": args.trace, "sparsity": args.sparsity,
        "nfe": nfe, "max_abs_diff_logp": float((a - b).abs().max()),
        "median_ms": {k: round(1e3 * s, 2) for k, s in med.items()},
        "native_x_torchdiffeq": round(med["torchdiffeq"] / med["native"], 2),
        "solver_overhead": round(med["odeint_native"] / med["field x NFE"] - 1, 3),
        "overhead_per_step_outside_field": round(med["native"] / med["field x NFE"] - 1, 3),
        "spread": {k: round((max(ts) - min(ts)) / statistics.median(ts), 2) for k, ts in times.items()},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
