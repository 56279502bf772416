"""Native whole-solve vs torchdiffeq + the fused field, on a log_prob-style solve (CPU).

A digits-like CNF (64-d, hidden 512x3, tanh) pruned at init to 90% with 32x32 blocks (random
scores), sparsified; ``log_prob`` of a batch of digits: dopri5, exact trace, 0 -> T, under no_grad.
Both paths use the same packed field and must take the same number of evaluations; the two are
timed round-robin and the ratio of medians is reported (shared machines are noisy).

    python bench/native_solve.py [--batch 1000] [--threads 2] [--repeats 5] [--trace exact]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

import jsp_fast as jf
from jsp_fast._native_solve import odeint_native
from jsp_fast._timing import round_robin
from jsp_fast.sparse._field import SparseODEnet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trace", default="exact", choices=("exact", "hutchinson"))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    data = jf.data.get("digits", seed=0)
    x = data.train[: args.batch].to(dtype).contiguous()
    cnf = jf.CNF(64, hidden=(512, 512, 512), trace=args.trace, rtol=1e-5, atol=1e-5).to(dtype)
    jf.prune(cnf, "random", args.sparsity, granularity="block", block=(32, 32))
    cnf.net = SparseODEnet.from_odenet(cnf.net)
    cnf.eval()
    plan = cnf.net.fused_plan(dtype)
    T = float(cnf.T)
    eps = torch.randn_like(x) if args.trace == "hutchinson" else None
    cnf._noise = lambda z: eps  # the same fixed noise on both paths

    nfe = {}

    def reference():
        with torch.no_grad():
            out = cnf.log_prob(x)
        nfe["torchdiffeq"] = cnf.nfe["forward"]
        return out

    def native():
        with torch.no_grad():
            z, dlogp, n = odeint_native(plan, x, None, 0.0, T, trace=args.trace, noise=eps,
                                        rtol=cnf.rtol, atol=cnf.atol, threads=args.threads)
        nfe["native"] = n
        return -0.5 * (z * z).sum(-1) - 0.5 * 64 * math.log(2 * math.pi) - dlogp

    a, b = reference(), native()
    err = ((a - b).abs().max() / a.abs().max()).item()
    times = round_robin({"torchdiffeq+fused": reference, "native": native}, args.repeats, warmup=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "batch": args.batch, "threads": args.threads, "trace": args.trace, "dtype": args.dtype,
        "density": plan.density(), "nfe": nfe, "max_rel_diff_logp": err,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "speedup_native": round(med["torchdiffeq+fused"] / med["native"], 3),
        "spread": {k: round((max(v) - min(v)) / statistics.median(v), 3) for k, v in times.items()},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
