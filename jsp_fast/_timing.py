"""The one timing helper (benchmarks, ``jsp-fast bench``, the demo's speed-up line).

Shared machines are noisy, so callers time several providers *round-robin* within each repeat (a
load change then hits all of them alike) and report medians and ratios from one run, never a lone
absolute time. On a GPU the device is synchronised inside the timed region (CUDA events would hide
host overhead, which is what narrow fields pay).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

__all__ = ["round_robin", "median_time", "synchronizer"]


def synchronizer(device: str | torch.device | None) -> Callable[[], None]:
    """A no-op on the CPU; ``torch.cuda.synchronize(device)`` on a CUDA device."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def round_robin(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: str | torch.device | None = None) -> dict[str, list[float]]:
    """``{name: [seconds per repeat]}``: each repeat calls every function once, in order.

    ``warmup`` untimed rounds go first (compilation, caches, packed plans).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                device: str | torch.device | None = None) -> float:
    """Median seconds of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    return statistics.median(round_robin({"fn": fn}, repeats, warmup, device)["fn"])
