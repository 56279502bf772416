"""Block-sparse layer benchmarks (pytest-benchmark), CPU: dense vs masked dense vs torch BSR vs ours.

    pytest bench/test_bench_bsr.py --benchmark-group-by=group            # full grid (long)
    JSP_FAST_BENCH_QUICK=1 pytest bench/test_bench_bsr.py --benchmark-group-by=group   # a few minutes

Grid: ops fwd / jvp / fwd_bwd; densities 0.5, 0.25, 0.1, 0.05; widths 256 and 1024; batches 1024,
4096, 16384; square blocks 16, 32, 64; fp32; ``JSP_FAST_BENCH_THREADS`` threads (default 2). The quick
subset is the design's reference point (width 1024, batch 4096, 32×32 blocks) at 25% and 10%.
Not collected by the default ``pytest`` (testpaths = tests). The table with ratios from one
round-robin run is ``python bench/report.py`` (writes bench/RESULTS.md).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch  # noqa: F401

from bsr_providers import OPS, PROVIDERS, Case, Setup, set_threads

QUICK = os.environ.get("JSP_FAST_BENCH_QUICK", "") not in ("", "0")
if QUICK:
    GRID = [(1024, 4096, 32, d) for d in (0.25, 0.1)]
else:
    GRID = list(itertools.product((256, 1024), (1024, 4096, 16384), (16, 32, 64), (0.5, 0.25, 0.1, 0.05)))

_SETUPS: dict = {}


def _setup(case: Case) -> Setup:
    if case not in _SETUPS:
        _SETUPS.clear()  # one case's tensors at a time (16384 x 1024 inputs are large)
        _SETUPS[case] = Setup(case)
    return _SETUPS[case]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("width,batch,block,density", GRID,
                         ids=[f"w{w}-b{b}-blk{k}-d{d}" for w, b, k, d in GRID])
def test_bsr(benchmark, width, batch, block, density, op, provider):
    threads = set_threads()
    case = Case(op, width, batch, block, density)
    s = _setup(case)
    fn = s.fn(provider)
    if fn is None:
        pytest.skip(f"{provider} has no {op} on the CPU")
    benchmark.group = f"{op} w{width} b{batch} blk{block} d{density}"
    benchmark.extra_info.update(density=s.density, threads=threads, dense_gflop=case.flops / 1e9)
    fn()  # warm-up (first-call costs, allocator)
    benchmark.pedantic(fn, rounds=5 if QUICK else 3, warmup_rounds=1, iterations=1)
