"""End-to-end CNF benchmarks (pytest-benchmark): dense vs. torch.compile vs. jf.sparsify.

    pytest bench/test_bench_e2e.py --benchmark-group-by=group [-k digits]

One group per (dataset, sparsity, op); providers: ``dense`` (masked dense CNF, eager), ``compiled``
(its field's forward/jvp under torch.compile; the compile happens in the untimed warm-up), ``sparse``
(``jf.sparsify`` with ``net.native = False``: torchdiffeq around one fused C++ call per field
evaluation), ``native`` (``jf.sparsify`` as it runs by default: the whole solve in one native call).
Same solver, tolerance and Hutchinson noise for all; ``extra_info`` carries the NFE and the largest
log-density difference from dense. The setups, data and models are those of ``jsp-fast bench e2e``
(``jsp_fast.app.bench``), which runs the full sweep (80/90/95%) with a markdown table.
"""
from __future__ import annotations

import copy

import pytest
import torch

from jsp_fast.app.bench import SETUPS, build_models, compile_like, load_data

SPARSITY = 0.9
PROVIDERS = ("dense", "compiled", "sparse", "native")
_CACHE: dict = {}


def _models(name: str):
    """The setup's data, its JSP-pruned dense model and the providers built from it (once per name)."""
    if name not in _CACHE:
        setup = SETUPS[name]
        x = load_data(setup, setup.n)
        dense, native, res = build_models(setup, SPARSITY, x)
        stepped = copy.deepcopy(native)
        stepped.net.native = False  # torchdiffeq steps around the fused field
        _CACHE[name] = {"setup": setup, "x": x, "dense": dense, "sparse": stepped, "native": native,
                        "compiled": None, "density": res.overall_density}
    return _CACHE[name]


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
        m["compiled"] = compile_like(m["dense"])
    model = m[provider]
    ref = _call(m["dense"], op, x, setup.n)
    benchmark.group = f"e2e {name} {SPARSITY:.0%} {op}"
    out = benchmark.pedantic(_call, args=(model, op, x, setup.n), rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(nfe=model.nfe["forward"], n=setup.n, density=m["density"],
                                max_abs_diff=float((out - ref).abs().max()))
    # Agreement within solver tolerance (float32; values of a few hundred nats for digits).
    scale = float(ref.abs().max()) if op == "log_prob" else 1.0
    assert float((out - ref).abs().max()) <= 1e-3 * max(scale, 1.0)
