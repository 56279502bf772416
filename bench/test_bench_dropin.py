"""Drop-in benchmark: a user-written torchdiffeq field pruned with torch.nn.utils.prune, then jf.sparsify.

    pytest bench/test_bench_dropin.py --benchmark-group-by=group      # pytest-benchmark
    python bench/test_bench_dropin.py [--repeats 7]                    # ratios from one round-robin run

The field is what a user writes, nothing from jsp_fast: ``f(t, z) = mlp(cat([z, t]))`` with ``mlp`` an
``nn.Sequential`` 65 -> 512 -> 512 -> 512 -> 64 with tanh, batch 1000, float32. Every linear layer is
pruned to 90% block sparsity with ``torch.nn.utils.prune.custom_from_mask`` and 32x32 block masks
(the first layer's time column is kept: it is not a whole block). Providers, each solved with
``torchdiffeq.odeint`` (dopri5, rtol = atol = 1e-5, t: 0 -> 1) under ``no_grad``:

- ``dense``: the original with the masks baked into plain weights (no pre-hook cost: the fairest
  dense baseline; torch's pruned module itself is no faster);
- ``compiled``: that dense field under ``torch.compile`` (compiled in the untimed warm-up);
- ``sparse``: ``jf.sparsify(original)``.

Targets (design): sparse >= 4x dense and >= 3x compiled, measured in one run.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import pytest
import torch
import torchdiffeq
from torch import nn
from torch.nn.utils import prune as torch_prune

import jsp_fast as jf
from jsp_fast._timing import round_robin

DIM, WIDTH, BATCH, BLOCK, SPARSITY = 64, 512, 1000, 32, 0.9
PROVIDERS = ("dense", "compiled", "sparse")
TARGETS = {"dense": 4.0, "compiled": 3.0}


class UserField(nn.Module):
    """A torchdiffeq right-hand side as users write it: time concatenated to the state."""

    def __init__(self, dim=DIM, width=WIDTH):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, z):
        return self.mlp(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))


def block_mask(n: int, k: int, density: float, gen: torch.Generator, block: int = BLOCK) -> torch.Tensor:
    """A bool [n, k] mask keeping round(density * blocks) random whole blocks (at least one)."""
    nb = (n // block) * (k // block)
    keep = max(1, round(density * nb))
    grid = torch.zeros(nb, dtype=torch.bool)
    grid[torch.randperm(nb, generator=gen)[:keep]] = True
    grid = grid.reshape(n // block, k // block)
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1)


def build(seed: int = 0):
    torch.manual_seed(seed)
    field = UserField()
    dense = copy.deepcopy(field)  # before pruning: torch's pruned modules cannot be deep-copied
    gen = torch.Generator().manual_seed(seed)
    for lin, twin in zip(field.mlp, dense.mlp):
        if not isinstance(lin, nn.Linear):
            continue
        n, k = lin.weight.shape
        k0 = k - k % BLOCK  # the first layer's time column: kept, outside the block grid
        mask = torch.ones(n, k, dtype=torch.bool)
        mask[:, :k0] = block_mask(n, k0, 1.0 - SPARSITY, gen)
        torch_prune.custom_from_mask(lin, "weight", mask)
        with torch.no_grad():
            twin.weight.mul_(mask)  # the same masked weights, baked: no pre-hook per call
    z0 = torch.randn(BATCH, DIM, generator=gen)
    return field, dense, z0


def solve(f, z0):
    with torch.no_grad():
        return torchdiffeq.odeint(f, z0, torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-5, method="dopri5")[-1]


_CACHE: dict = {}


def models():
    if not _CACHE:
        field, dense, z0 = build()
        sparse = jf.sparsify(field)
        compiled = torch.compile(copy.deepcopy(dense), dynamic=False)
        _CACHE.update(original=field, dense=dense, compiled=compiled, sparse=sparse, z0=z0)
    return _CACHE


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dropin(benchmark, provider):
    m = models()
    ref = solve(m["dense"], m["z0"])
    benchmark.group = f"drop-in {DIM}-d {WIDTH}x3 tanh, batch {BATCH}, {SPARSITY:.0%} blocks (torch prune)"
    out = benchmark.pedantic(solve, args=(m[provider], m["z0"]), rounds=3, warmup_rounds=1, iterations=1)
    err = float((out - ref).abs().max())
    benchmark.extra_info.update(max_abs_diff=err)
    assert err <= 1e-3 * (1.0 + float(ref.abs().max()))  # same field: the solves agree to solver tolerance


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    m = models()
    print(m["sparse"].sparsify_report)
    z0 = m["z0"]
    ref = solve(m["original"], z0)
    fns = {p: (lambda p=p: solve(m[p], z0)) for p in PROVIDERS}
    times = round_robin(fns, repeats=args.repeats, warmup=1)
    med = {p: statistics.median(v) for p, v in times.items()}
    for p in PROVIDERS:
        err = float((solve(m[p], z0) - ref).abs().max())
        print(f"{p:9s} {med[p] * 1e3:9.1f} ms   max|dz| vs original {err:.2e}")
    ratios = {p: med[p] / med["sparse"] for p in TARGETS}
    for p, r in ratios.items():
        print(f"sparse vs {p:8s}: {r:5.2f}x  (target >= {TARGETS[p]}x)")
    print(f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}; shared machine: ratios are noisy")
    return ratios


if __name__ == "__main__":
    main()
