"""End-to-end CNF benchmarks (pytest-benchmark): dense vs. torch.compile vs. jf.sparsify.

    pytest bench/test_bench_e2e.py --benchmark-group-by=group [-k digits]

One group per (dataset, sparsity, op); providers: ``dense`` (masked dense CNF, eager), ``compiled``
(its field's forward/jvp under torch.compile; the compile happens in the untimed warm-up), ``sparse``
(``jf.sparsify`` with ``net.native = False``: torchdiffeq around one fused C++ call per field
evaluation), ``native`` (``jf.sparsify`` as it runs by default: the whole solve in one native call).
Same solver, tolerance and Hutchinson
noise for all; ``extra_info`` carries the NFE and the largest log-density difference from dense.
The full sweep (80/90/95%) with a markdown table is ``jsp-fast bench e2e``. Built on the public API
only (jf.data, jf.CNF, jf.prune, jf.sparsify).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import jsp_fast as jf

SPARSITY = 0.9
PROVIDERS = ("dense", "compiled", "sparse", "native")


@dataclass(frozen=True)
class Setup:
    dataset: str
    dim: int
    hidden: tuple
    trace: str
    block: tuple
    n: int


# The design's two end-to-end cases: digits (64-d, 512x3, Hutchinson) and the narrow 2-d toy field,
# whose 64-wide layers take 8x8 blocks (fewer than one 32x32 block per layer would survive 95%).
SETUPS = {
    "digits": Setup("digits", 64, (512, 512, 512), "hutchinson", (32, 32), 1000),
    "toy": Setup("8gaussians", 2, (64, 64, 64), "exact", (8, 8), 10_000),
}
_CACHE: dict = {}


def _data(setup: Setup) -> torch.Tensor:
    if setup.dataset == "digits":
        ds = jf.data.digits(seed=0)
        x = torch.cat([ds.train, ds.val, ds.test])
        return x.repeat(-(-setup.n // x.shape[0]), 1)[: setup.n].contiguous()
    return jf.data.toy(setup.dataset, setup.n, seed=0)


def _models(name: str):
    if name not in _CACHE:
        setup = SETUPS[name]
        x = _data(setup)
        torch.manual_seed(0)
        dense = jf.CNF(dim=setup.dim, hidden=setup.hidden, trace=setup.trace, rtol=1e-5, atol=1e-5)
        res = jf.prune(dense, "jsp", SPARSITY, data=x[:256], granularity="block", block=setup.block)
        dense.eval()
        stepped = jf.sparsify(dense)
        stepped.net.native = False  # torchdiffeq steps around the fused field
        _CACHE[name] = {"setup": setup, "x": x, "dense": dense, "sparse": stepped, "native": jf.sparsify(dense),
                        "compiled": None,
                        "density": res.overall_density}
    return _CACHE[name]


def _compiled(model):
    """A copy of ``model`` whose field's forward and jvp run under ``torch.compile``."""
    comp = copy.deepcopy(model)
    comp.net.forward = torch.compile(comp.net.forward, dynamic=False)
    comp.net.jvp = torch.compile(comp.net.jvp, dynamic=False)
    return comp


def _call(model, op: str, x: torch.Tensor, n: int):
    with torch.no_grad():
        if op == "sample":
            return model.sample(n, seed=0)
        torch.manual_seed(1)  # same Hutchinson noise for every provider
        return model.log_prob(x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["sample", "log_prob"])
@pytest.mark.parametrize("name", list(SETUPS))
def test_e2e(benchmark, name, op, provider):
    m = _models(name)
    setup, x = m["setup"], m["x"]
    if provider == "compiled" and m["compiled"] is None:
        m["compiled"] = _compiled(m["dense"])
    model = m[provider]
    ref = _call(m["dense"], op, x, setup.n)
    benchmark.group = f"e2e {name} {SPARSITY:.0%} {op}"
    out = benchmark.pedantic(_call, args=(model, op, x, setup.n), rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(nfe=model.nfe["forward"], n=setup.n, density=m["density"],
                                max_abs_diff=float((out - ref).abs().max()))
    # Agreement within solver tolerance (float32; values of a few hundred nats for digits).
    scale = float(ref.abs().max()) if op == "log_prob" else 1.0
    assert float((out - ref).abs().max()) <= 1e-3 * max(scale, 1.0)
