"""Peak RSS of ``CNF.log_prob`` on many points under no_grad (not collected by pytest: leading ``_``).

    python tests/_memory_probe.py [--n 1000000] [--batch-size N | --one-chunk] [--threads 1]

A dense 2-d CNF with hidden (64, 64, 64), exact trace, dopri5 at rtol = atol = 1e-3 (to keep it
short). Prints the peak RSS of the process (``ru_maxrss``), the RSS after ``import torch`` (what
torch itself costs), the time and the NFE. Run each configuration in a fresh process: ``ru_maxrss``
only ever grows.
"""
from __future__ import annotations

import argparse
import resource
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=None, help="points per chunk (default: the model's)")
    ap.add_argument("--one-chunk", action="store_true", help="all points in one solve (the old behaviour)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import jsp_fast as jf

    base = _rss_mb()
    torch.manual_seed(0)
    model = jf.CNF(2, hidden=(64, 64, 64), trace="exact", rtol=1e-3, atol=1e-3)
    x = torch.randn(args.n, 2)
    bs = args.n if args.one_chunk else args.batch_size
    t0 = time.perf_counter()
    with torch.no_grad():
        logp = model.log_prob(x, batch_size=bs)
    dt = time.perf_counter() - t0
    chunk = bs if bs is not None else model.default_chunk("exact")
    print(f"n={args.n} chunk={chunk} threads={args.threads}: peak RSS {_rss_mb():.0f} MB "
          f"(after imports {base:.0f} MB), {dt:.1f} s, NFE {model.nfe['forward']}, "
          f"mean logp {float(logp.mean()):.4f}")


if __name__ == "__main__":
    main()
