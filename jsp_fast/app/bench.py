"""``jsp-fast bench e2e``: a pruned CNF, dense against sparsified, end to end.

For each dataset setup and block sparsity: build a CNF, prune it with ``jf.prune`` (JSP by default,
block granularity), then time ``sample(n)`` and ``log_prob(x)`` (under ``torch.no_grad()``, same
solver, tolerances and Hutchinson noise) for

- ``dense``: the masked dense model (plain torchdiffeq FFJORD, the field in eager PyTorch);
- ``compiled``: the same dense model with its field's ``forward``/``jvp`` under ``torch.compile``;
- ``sparse``: ``jf.sparsify(model)`` with its native solve off: torchdiffeq steps around the one-call
  fused C++ field;
- ``native``: ``jf.sparsify(model)`` as it runs by default: the whole solve in one native call
  (``SparseODEnet.native_solve``).

Every row gives the median time, throughput, the NFE of the solve and the largest log-density
difference from the dense model. ``run`` writes a markdown table (with the machine and the command)
into the "End to end" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import replace_markdown_section
from .._timing import round_robin
from ..cnf import CNF
from ..data import digits
from ..data import get as get_data
from ..prune import METHODS, prune
from . import _common
from ._args import UsageError, names, nonneg_int, pos_float, pos_int, sparsities

__all__ = ["SECTION", "SETUPS", "PROVIDERS", "Setup", "load_data", "build_models", "compile_like", "load_weights_",
           "measure_interleaved", "run_e2e", "machine_info", "format_markdown", "write_section", "add_arguments",
           "run"]

SECTION = "## End to end"


@dataclass(frozen=True)
class Setup:
    name: str
    dataset: str
    dim: int
    hidden: tuple
    trace: str
    block: tuple
    n: int


SETUPS = {
    "digits": Setup("digits", "digits", 64, (512, 512, 512), "hutchinson", (32, 32), 1000),
    # 64-wide layers cut into 8x8 blocks: at 95% the whole field keeps ~420 weights, fewer than one
    # 32x32 (or 16x16) block per layer, which jf.prune's per-layer floor refuses.
    "toy": Setup("toy", "8gaussians", 2, (64, 64, 64), "exact", (8, 8), 10_000),
}
PROVIDERS = ("dense", "compiled", "sparse", "native")


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def load_data(setup: Setup, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the setup's data (repeated when the set is smaller)."""
    if setup.dataset == "digits":
        ds = digits(seed=seed)
        x = torch.cat([ds.train, ds.val, ds.test])
    else:
        x = get_data(setup.dataset, n=max(n, 512), seed=seed).train
    reps = -(-n // x.shape[0])
    return x.repeat(reps, 1)[:n].contiguous()


def build_models(setup: Setup, sparsity: float, data: torch.Tensor, solver: str = "dopri5",
                 tol: float = 1e-5, prune_method: str = "jsp", seed: int = 0):
    """(dense masked CNF, jf.sparsify of it, PruneResult)."""
    from ..sparse import sparsify  # the compiled core: imported when benchmarking, not for --help

    torch.manual_seed(seed)
    model = CNF(dim=setup.dim, hidden=setup.hidden, trace=setup.trace, solver=solver, rtol=tol, atol=tol)
    res = prune(model, prune_method, sparsity, data=data[:256], granularity="block", block=setup.block,
                   seed=seed)
    model.eval()
    return model, sparsify(model), res


def compile_like(model):
    """A copy of ``model`` whose field's forward and jvp run under ``torch.compile``."""
    comp = copy.deepcopy(model)
    net = comp.net
    net.forward = torch.compile(net.forward, dynamic=False)
    net.jvp = torch.compile(net.jvp, dynamic=False)
    return comp


def load_weights_(dst, src) -> None:
    """Copy ``src``'s weights and masks into ``dst`` in place (keeps compiled code valid)."""
    with torch.no_grad():
        for a, b in zip(dst.state_dict().values(), src.state_dict().values()):
            a.copy_(b)


def _call(model, op: str, x: torch.Tensor, n: int, noise_seed: int = 1):
    with torch.no_grad():
        if op == "sample":
            return model.sample(n, seed=0)
        torch.manual_seed(noise_seed)  # the same Hutchinson noise for every provider
        return model.log_prob(x)


def measure_interleaved(models: dict, op: str, x: torch.Tensor, n: int, repeats: int) -> dict:
    """{provider: (median seconds, NFE, output)}, the providers timed round-robin (``_timing``); the
    first, untimed call of each gives its NFE and output."""
    outs, nfes = {}, {}
    for prov, model in models.items():
        outs[prov] = _call(model, op, x, n)
        nfes[prov] = model.nfe["forward"]
    times = round_robin({p: (lambda m=m: _call(m, op, x, n)) for p, m in models.items()}, repeats, warmup=0)
    return {p: (statistics.median(times[p]), nfes[p], outs[p]) for p in models}


def run_e2e(datasets=("digits", "toy"), sparsities=(0.8, 0.9, 0.95), providers=PROVIDERS, repeats: int = 5,
            n: int | None = None, solver: str = "dopri5", tol: float = 1e-5, prune_method: str = "jsp",
            seed: int = 0, quiet: bool = False) -> list[dict]:
    rows = []
    for name in datasets:
        setup = SETUPS[name]
        bs = n or setup.n
        x = load_data(setup, bs, seed)
        compiled = None
        for sp in sparsities:
            t0 = time.perf_counter()
            dense, fast, res = build_models(setup, sp, x, solver, tol, prune_method, seed)
            _log(f"[{name} {sp:.0%}] pruned ({prune_method}, {time.perf_counter() - t0:.1f} s); "
                 f"dense layers in the sparse model: {fast.net.dense_layers or 'none'}", quiet)
            stepped = copy.deepcopy(fast)
            stepped.net.native = False
            models = {"dense": dense, "sparse": stepped, "native": fast}
            if "compiled" in providers:
                if compiled is None:
                    t0 = time.perf_counter()
                    compiled = compile_like(dense)
                    _call(compiled, "log_prob", x, bs)
                    _call(compiled, "sample", x, bs)
                    _log(f"[{name}] torch.compile warm-up {time.perf_counter() - t0:.1f} s", quiet)
                load_weights_(compiled, dense)
                models["compiled"] = compiled
            for op in ("sample", "log_prob"):
                res_op = measure_interleaved({p: models[p] for p in providers}, op, x, bs, repeats)
                ref = res_op["dense"][2] if "dense" in res_op else None
                for prov in providers:
                    sec, nfe, out = res_op[prov]
                    diff = float((out - ref).abs().max()) if ref is not None else float("nan")
                    row = dict(dataset=name, sparsity=sp, op=op, provider=prov, seconds=sec, nfe=nfe,
                               throughput=bs / sec, n=bs, max_abs_diff=diff,
                               density=res.overall_density, trace=setup.trace,
                               hidden=setup.hidden, block=setup.block)
                    rows.append(row)
                    _log(f"[{name} {sp:.0%}] {op:8s} {prov:8s} {sec * 1e3:9.1f} ms  NFE {nfe:4d}  "
                         f"{bs / sec:10.0f}/s  max|diff| {diff:.2e}", quiet)
    return rows


def machine_info() -> dict:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .._ext import _C

    info = _C.build_info() if _C is not None else {}
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "simd": info.get("simd", "?"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}


def format_markdown(rows: list[dict], command: str, solver: str, tol: float, prune_method: str) -> str:
    m = machine_info()
    lines = [
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu']} ({m['cores']} cores, "
        f"{m['threads']} torch threads, kernels built for {m['simd']}, OMP_WAIT_POLICY={m['omp_wait_policy']}), "
        f"torch {m['torch']}; float32; solver {solver}, rtol = atol = {tol}; masks from "
        f"`jf.prune(method={prune_method!r}, granularity='block')` on an untrained model; times are medians "
        f"under `torch.no_grad()`, the providers timed round-robin within each repeat.",
        "",
        f"Command: `{command}`",
        "",
        "`dense`: the masked dense CNF (eager torchdiffeq FFJORD). `compiled`: the same with the field's "
        "forward/jvp under `torch.compile`. `sparse`: `jf.sparsify(model)` with `net.native = False` "
        "(torchdiffeq steps around one fused C++ call per field evaluation). `native`: `jf.sparsify(model)` "
        "as it runs by default (the whole solve in one native call). Speed-ups of `native` are against "
        "`dense` / `compiled` in the same run; `max|Δ|` is the largest difference of `native` from the "
        "dense output (log-density in nats, or sample coordinates).",
        "",
        "| data | field | trace | sparsity (density) | op | n | NFE | dense ms | compiled ms | sparse ms "
        "| native ms | native /s | × dense | × compiled | native × sparse | max\\|Δ\\| |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = []
    for r in rows:
        k = (r["dataset"], r["sparsity"], r["op"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        by = {r["provider"]: r for r in rows if (r["dataset"], r["sparsity"], r["op"]) == k}
        any_r = next(iter(by.values()))
        d, c, sp, s = by.get("dense"), by.get("compiled"), by.get("sparse"), by.get("native")

        def ms(r):
            return f"{r['seconds'] * 1e3:.1f}" if r else "–"

        def ratio(a, b):
            return f"{a['seconds'] / b['seconds']:.1f}×" if a and b else "–"

        hidden = "x".join(str(h) for h in any_r["hidden"])
        lines.append(
            f"| {k[0]} | {hidden}, {any_r['block'][0]}×{any_r['block'][1]} blocks | {any_r['trace']} | "
            f"{k[1]:.0%} ({any_r['density']:.3f}) | {k[2]} | {any_r['n']} | {any_r['nfe']} | {ms(d)} | {ms(c)} | "
            f"{ms(sp)} | {ms(s)} | {s['throughput']:.0f} | {ratio(d, s)} | {ratio(c, s)} | {ratio(sp, s)} | "
            f"{s['max_abs_diff']:.1e} |" if s else
            f"| {k[0]} | | | {k[1]} | {k[2]} | | | {ms(d)} | {ms(c)} | {ms(sp)} | – | | | | | |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, append: bool = False, heading: str = SECTION) -> None:
    """Replace (or create) the ``heading`` section ("End to end" by default) of ``bench/RESULTS.md``;
    ``append`` keeps its earlier runs (``jsp_fast._io.replace_markdown_section``)."""
    replace_markdown_section(path, section, heading, append=append)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", default="e2e", choices=["e2e"],
                        help="which benchmark (e2e: dense vs compiled vs sparsified CNF, sample and log_prob)")
    parser.add_argument("--datasets", type=names(tuple(SETUPS)), default=tuple(SETUPS),
                        help="comma-separated: digits (64-d, 512x3, Hutchinson), toy (2-d, 64x3, exact trace)")
    parser.add_argument("--sparsities", type=sparsities, default=(0.8, 0.9, 0.95), help="block sparsities (default 0.8,0.9,0.95)")
    parser.add_argument("--providers", type=names(PROVIDERS), default=PROVIDERS,
                        help="comma-separated subset of dense,compiled,sparse")
    parser.add_argument("--n", type=pos_int, default=None, help="batch size (default: 1000 digits, 10000 toy)")
    parser.add_argument("--repeats", type=pos_int, default=5,
                        help="timed repetitions, providers interleaved (median reported; default 5)")
    parser.add_argument("--solver", default="dopri5", help="torchdiffeq solver")
    parser.add_argument("--tol", type=pos_float, default=1e-5, help="rtol = atol")
    parser.add_argument("--prune", default="jsp", choices=METHODS, help="jf.prune method for the block masks (default jsp)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="model init and pruning seed")
    parser.add_argument("--threads", type=pos_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--results", default="bench/RESULTS.md", help="markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing it")
    parser.add_argument("--append", action="store_true",
                        help="add this run to the End to end section instead of replacing the section")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    _common.set_threads(args.threads)
    if not args.no_write:  # before the benchmark, not after it
        try:
            _common.check_out_file(args.results, "--results", (".md",))
        except UsageError as exc:
            raise UsageError(f"{exc} (run from the repository root, pass --results FILE or --no-write)") from None
    rows = run_e2e(args.datasets, args.sparsities, args.providers, args.repeats, args.n, args.solver, args.tol,
                   args.prune, args.seed, args.quiet)
    command = _common.command_line(args)
    if os.environ.get("OMP_WAIT_POLICY"):
        command = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} {command}"
    md = format_markdown(rows, command, args.solver, args.tol, args.prune)
    if args.no_write:
        print(md)
    else:
        write_section(Path(args.results), md, append=args.append)
        print(md)
        print(f"wrote the '{SECTION[3:]}' section of {args.results}", file=sys.stderr)
    return 0
