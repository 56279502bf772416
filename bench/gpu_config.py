"""bench/gpu.py's configuration: the command line, the grids, the configs and the targets checked.

Importable and tested without a GPU (tests/test_triton_bench_gpu.py).
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from _args import float_list, int_list, str_list

FULL = dict(widths=(64, 256, 512, 1024, 2048, 4096), batches=(4096, 16384, 65536),
            densities=(0.5, 0.25, 0.1, 0.05), field_widths=(64, 128, 256, 512), field_batches=(16384, 65536))
QUICK = dict(widths=(256, 1024, 4096), batches=(16384,), densities=(0.5, 0.1, 0.05),
             field_widths=(128, 512), field_batches=(16384,))
SMOKE = dict(widths=(32,), batches=(19,), densities=(0.5,), field_widths=(32,), field_batches=(19,))

# "ours_*" is jf.ops.bsr_linear on the triton backend; "_tf32" runs a provider with
# torch.backends.cuda.matmul.allow_tf32 on (cuBLAS and our kernels both follow that switch).
LAYER_PROVIDERS = ("cublas_fp32", "cublas_tf32", "cublas_bf16", "torch_bsr_fp32", "torch_bsr_bf16",
                   "ours_fp32", "ours_tf32", "ours_bf16")
FIELD_PROVIDERS = ("dense_eager", "dense_compile", "ours_fused", "ours_fused_tf32", "ours_cuda_fused")


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    p.add_argument("--quick", action="store_true", help="a reduced grid")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    p.add_argument("--widths", type=int_list, default=None, help="comma list of layer widths")
    p.add_argument("--batches", type=int_list, default=None, help="comma list of batch sizes")
    p.add_argument("--densities", type=float_list, default=None, help="comma list of block densities")
    p.add_argument("--field-widths", type=int_list, default=None, help="hidden widths of the fused-field runs")
    p.add_argument("--field-batches", type=int_list, default=None)
    p.add_argument("--field-depth", type=int, default=3, help="hidden layers of the field")
    p.add_argument("--field-dim", type=int, default=2, help="data dimension of the field")
    p.add_argument("--field-sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=32, help="square block side")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--steps", type=int, default=20, help="RK4 steps of the solve benchmark")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed round-robin repeats per config (default 20; 1 with --smoke)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the dense field")
    p.add_argument("--providers", type=str_list, default=None, help="comma list restricting the layer providers")
    p.add_argument("--no-jvp", action="store_true", help="skip the forward+JVP layer timings")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else (QUICK if args.quick else FULL)
    for key, val in base.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 20
    if args.smoke:
        args.block = min(args.block, 16)
        args.steps = min(args.steps, 2)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    for d in args.densities:
        if not 0 < d <= 1:
            p.error(f"densities must be in (0, 1], got {d}")
    if not 0 <= args.field_sparsity < 1:
        p.error(f"--field-sparsity must be in [0, 1), got {args.field_sparsity}")
    args.providers = LAYER_PROVIDERS if args.providers is None else args.providers
    bad = set(args.providers) - set(LAYER_PROVIDERS)
    if bad:
        p.error(f"unknown providers {sorted(bad)}; expected some of {LAYER_PROVIDERS}")
    return args


@dataclass(frozen=True)
class LayerConfig:
    width: int
    batch: int
    density: float
    block: int

    @property
    def n_blocks(self) -> int:
        g = self.width // self.block
        return g * g

    @property
    def kept(self) -> int:
        """Exactly round(density * blocks), at least one."""
        return max(1, round(self.density * self.n_blocks))


@dataclass(frozen=True)
class FieldConfig:
    dim: int
    width: int
    depth: int
    batch: int
    sparsity: float
    block: int


@dataclass
class Record:
    bench: str
    provider: str
    config: dict
    ms: float
    extra: dict = field(default_factory=dict)


def layer_configs(args) -> list[LayerConfig]:
    return [LayerConfig(w, b, d, args.block)
            for w, b, d in itertools.product(args.widths, args.batches, args.densities) if w % args.block == 0]


def field_configs(args) -> list[FieldConfig]:
    return [FieldConfig(args.field_dim, w, args.field_depth, b, args.field_sparsity, args.block)
            for w, b in itertools.product(args.field_widths, args.field_batches) if w <= 512 and w % args.block == 0]


def solve_configs(args) -> list[FieldConfig]:
    """One config per field width at the largest field batch (the solve and end-to-end stages)."""
    return [FieldConfig(args.field_dim, w, args.field_depth, max(args.field_batches), args.field_sparsity, args.block)
            for w in sorted({c.width for c in field_configs(args)})]


def check_targets(records) -> dict:
    """The GPU goals, from the layer and field records (None where the run has no data)."""
    by = {}
    for r in records:
        by.setdefault((r["bench"], r["config"].get("width"), r["config"].get("batch"), r["config"].get("density"),
                       r["config"].get("sparsity")), {})[r["provider"]] = r["ms"]
    fused, wide = [], []
    for (bench, width, batch, density, _sparsity), ms in by.items():
        if bench == "field" and width <= 512 and "dense_eager" in ms and "ours_fused" in ms:
            fused.append(dict(width=width, batch=batch, speedup=ms["dense_eager"] / ms["ours_fused"],
                              cuda_speedup=(ms["dense_eager"] / ms["ours_cuda_fused"]
                                            if "ours_cuda_fused" in ms else None)))
        if bench == "layer_fwd" and width >= 2048 and abs(density - 0.1) < 1e-9:
            for prec, ours, bsr, dense in (("fp32", "ours_fp32", "torch_bsr_fp32", "cublas_fp32"),
                                           ("tf32", "ours_tf32", "torch_bsr_fp32", "cublas_tf32"),
                                           ("bf16", "ours_bf16", "torch_bsr_bf16", "cublas_bf16")):
                if ours in ms:
                    wide.append(dict(width=width, batch=batch, precision=prec,
                                     vs_torch_bsr=ms[bsr] / ms[ours] if bsr in ms else None,
                                     vs_cublas=ms[dense] / ms[ours] if dense in ms else None))
    return dict(
        fused_field_ge_5x_eager=None if not fused else all(f["speedup"] >= 5 for f in fused),
        fused_field_cuda_ge_5x_eager=(None if not any(f["cuda_speedup"] for f in fused)
                                      else all((f["cuda_speedup"] or 0) >= 5 for f in fused)),
        fused_field=fused,
        wide_ge_1_5x_torch_bsr=None if not wide else all((w["vs_torch_bsr"] or 0) >= 1.5 for w in wide),
        wide_ahead_of_cublas=None if not wide else all((w["vs_cublas"] or 0) > 1 for w in wide),
        wide=wide,
    )
