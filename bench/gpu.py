"""GPU benchmark of the Triton kernels: correctness at scale, then timings against cuBLAS and torch BSR.

    python bench/gpu.py --out gpu.json            # full run (a few minutes on an H100)
    python bench/gpu.py --quick --out gpu.json    # a reduced grid
    python bench/gpu.py --skip-tests ...          # timings only

Steps (each timed with triton.testing.do_bench: synchronised, median of repeated launches):
1. the Triton tests (tests/test_triton_*.py) with their CUDA parametrisation (larger shapes);
2. one block-sparse layer ``act(scale * (x W^T) + bias)`` (square, width H, batch B, 32x32 blocks,
   density d) and its forward+JVP: ours (fp32 IEEE, fp32 TF32, bf16) against cuBLAS dense eager
   (``F.linear`` + the same epilogue; TF32 off, TF32 on, bf16) and torch's Triton BSR
   (``torch.sparse._triton_ops.bsr_dense_mm`` on ``W.to_sparse_bsr``; fp32 and bf16);
3. the whole concatsquash field (value + Hutchinson tangent) at widths <= 512 and 90% block sparsity:
   our one-launch fused kernel against torch eager dense ``ODEnet.jvp`` (and ``torch.compile`` of it
   with ``--compile``);
   and, when ``jsp_fast._C`` was built with ``JSP_FAST_CUDA=ON``, the CUDA C++ fused MLP;
4. a full fixed-step RK4 solve of the CNF state (z, log-density via Hutchinson) with the field
   captured in a CUDA graph (the whole solve is one graph replay), against the eager dense solve;
5. the user's path end to end: ``jf.sparsify(cnf)`` of a pruned CNF, ``sample`` and ``log_prob``
   (torchdiffeq dopri5, Hutchinson) under ``no_grad`` against the same model dense, with the fused
   engine that ``SparseODEnet.fused_engine`` picked recorded.

The timed stages run in the order 3, 4, 5, 2 (the narrow-field target first) and the JSON is rewritten
after each, so a run stopped by a time limit keeps what it measured.

Prints a table and writes JSON (``--out``) with every record and the targets checked:
fused field >= 5x torch eager dense at widths <= 512 and 90% sparsity; layers of width >= 2048 at 10%
density >= 1.5x torch's Triton BSR and ahead of cuBLAS, each in the same precision.

Without CUDA it exits with a message (``--smoke`` runs the code paths on the CPU under the Triton
interpreter with tiny shapes, for testing this script).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(widths=(64, 256, 512, 1024, 2048, 4096), batches=(4096, 16384, 65536),
            densities=(0.5, 0.25, 0.1, 0.05), field_widths=(64, 128, 256, 512), field_batches=(16384, 65536))
QUICK = dict(widths=(256, 1024, 4096), batches=(16384,), densities=(0.5, 0.1, 0.05),
             field_widths=(128, 512), field_batches=(16384,))
SMOKE = dict(widths=(32,), batches=(19,), densities=(0.5,), field_widths=(32,), field_batches=(19,))

LAYER_PROVIDERS = ("cublas_fp32", "cublas_tf32", "cublas_bf16", "torch_bsr_fp32", "torch_bsr_bf16",
                   "ours_fp32", "ours_tf32", "ours_bf16")
FIELD_PROVIDERS = ("dense_eager", "dense_compile", "ours_fused", "ours_fused_tf32", "ours_cuda_fused")


# ---- configuration (importable and tested on the CPU) ----------------------------------------------
def _ints(s):
    return tuple(int(v) for v in s.split(",") if v)


def _floats(s):
    return tuple(float(v) for v in s.split(",") if v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    p.add_argument("--quick", action="store_true", help="a reduced grid")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    p.add_argument("--skip-tests", action="store_true", help="do not run the correctness tests first")
    p.add_argument("--widths", type=_ints, default=None, help="comma list of layer widths")
    p.add_argument("--batches", type=_ints, default=None, help="comma list of batch sizes")
    p.add_argument("--densities", type=_floats, default=None, help="comma list of block densities")
    p.add_argument("--field-widths", type=_ints, default=None, help="hidden widths of the fused-field runs")
    p.add_argument("--field-batches", type=_ints, default=None)
    p.add_argument("--field-depth", type=int, default=3, help="hidden layers of the field")
    p.add_argument("--field-dim", type=int, default=2, help="data dimension of the field")
    p.add_argument("--field-sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=32, help="square block side")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--steps", type=int, default=20, help="RK4 steps of the solve benchmark")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the dense field")
    p.add_argument("--providers", default=None, help="comma list restricting the layer providers")
    p.add_argument("--no-jvp", action="store_true", help="skip the forward+JVP layer timings")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else (QUICK if args.quick else FULL)
    for key, val in base.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.smoke:
        args.block = min(args.block, 16)
        args.steps = min(args.steps, 2)
    for d in args.densities:
        if not 0 < d <= 1:
            raise SystemExit(f"densities must be in (0, 1], got {d}")
    if not 0 <= args.field_sparsity < 1:
        raise SystemExit(f"--field-sparsity must be in [0, 1), got {args.field_sparsity}")
    args.providers = LAYER_PROVIDERS if args.providers is None else tuple(args.providers.split(","))
    bad = set(args.providers) - set(LAYER_PROVIDERS)
    if bad:
        raise SystemExit(f"unknown providers {sorted(bad)}; expected some of {LAYER_PROVIDERS}")
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


def layer_configs(args) -> list[LayerConfig]:
    out = []
    for w, b, d in itertools.product(args.widths, args.batches, args.densities):
        if w % args.block:
            continue
        out.append(LayerConfig(w, b, d, args.block))
    return out


def field_configs(args) -> list[FieldConfig]:
    return [FieldConfig(args.field_dim, w, args.field_depth, b, args.field_sparsity, args.block)
            for w, b in itertools.product(args.field_widths, args.field_batches) if w <= 512 and w % args.block == 0]


def check_targets(records) -> dict:
    """The GPU goals, from the layer and field records (None where the run has no data)."""
    by = {}
    for r in records:
        by.setdefault((r["bench"], r["config"].get("width"), r["config"].get("batch"), r["config"].get("density"),
                       r["config"].get("sparsity")), {})[r["provider"]] = r["ms"]
    fused, wide = [], []
    for (bench, width, batch, density, sparsity), ms in by.items():
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


# ---- helpers ---------------------------------------------------------------------------------------
@dataclass
class Record:
    bench: str
    provider: str
    config: dict
    ms: float
    extra: dict = field(default_factory=dict)


def require_cuda(smoke: bool):
    import torch  # noqa: PLC0415

    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or use --smoke to exercise it on the CPU")
    return torch.device("cuda")


def timer(device):
    """median milliseconds of fn (synchronised); one timed call under --smoke on the CPU."""
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu


def _random_grid(nb_r, nb_c, kept, gen):
    import torch  # noqa: PLC0415

    idx = torch.randperm(nb_r * nb_c, generator=gen)[:kept]
    g = torch.zeros(nb_r * nb_c, dtype=torch.bool)
    g[idx] = True
    return g.reshape(nb_r, nb_c)


def run_tests(smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_triton_bsr.py", "tests/test_triton_fused.py",
           "tests/test_triton_backend.py", "tests/test_field_engines.py", "tests/test_cuda_fused.py"]
    if not smoke:
        cmd += ["-k", "cuda or gpu or registered or rejects or engine"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    print("\n".join(tail))
    return dict(command=" ".join(cmd), returncode=proc.returncode, seconds=time.perf_counter() - t, tail=tail)


# ---- layer benchmarks ------------------------------------------------------------------------------
def bench_layers(args, device, measure) -> list[Record]:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from jsp_fast.kernels import bsr_linear as K  # noqa: PLC0415
    from jsp_fast.cnf._layers import activation_derivative  # noqa: PLC0415
    from jsp_fast.kernels import lut  # noqa: PLC0415

    try:
        from torch.sparse._triton_ops import bsr_dense_mm  # noqa: PLC0415
    except Exception:  # pragma: no cover
        bsr_dense_mm = None
    acts = {"tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu, "relu": F.relu, "sigmoid": torch.sigmoid,
            "none": lambda v: v}
    act = acts[args.activation]
    records = []
    gen = torch.Generator().manual_seed(args.seed)
    for cfg in layer_configs(args):
        H, B, bs = cfg.width, cfg.batch, cfg.block
        grid = _random_grid(H // bs, H // bs, cfg.kept, gen)
        tabs = lut.block_luts(grid.to(device))
        mask = grid.repeat_interleave(bs, 0).repeat_interleave(bs, 1).to(device)
        W32 = (torch.randn(H, H, generator=gen) / H ** 0.5).to(device) * mask
        x32 = torch.randn(B, H, generator=gen).to(device)
        xd32 = torch.randn(1, B, H, generator=gen).to(device)
        s32 = (torch.rand(H, generator=gen) + 0.5).to(device)
        b32 = torch.randn(H, generator=gen).to(device)
        conf = dict(asdict(cfg), density_actual=cfg.kept / cfg.n_blocks)
        tf32_default = torch.backends.cuda.matmul.allow_tf32
        for prov in args.providers:
            dt = torch.bfloat16 if prov.endswith("bf16") else torch.float32
            if device.type == "cpu" and dt == torch.bfloat16:
                continue  # the interpreter has no bfloat16
            W, x, xd, s, b = (t.to(dt) for t in (W32, x32, xd32, s32, b32))
            tf32 = prov.endswith("tf32")
            fwd = jvp = None
            if prov.startswith("cublas"):
                def fwd(W=W, x=x, s=s, b=b):
                    return act(F.linear(x, W) * s + b)

                def jvp(W=W, x=x, xd=xd, s=s, b=b):
                    pre = F.linear(x, W) * s + b
                    y = act(pre)
                    return y, activation_derivative(args.activation, pre, y) * s * F.linear(xd, W)
            elif prov.startswith("torch_bsr"):
                if device.type != "cuda" or bsr_dense_mm is None:
                    continue
                Wb = W.to_sparse_bsr((bs, bs))

                def fwd(Wb=Wb, x=x, s=s, b=b):  # torch's Triton kernel computes W x^T: transpose around it
                    return act(bsr_dense_mm(Wb, x.t()).t() * s + b)
            else:
                vals = lut.dense_to_blocks(W, grid.to(device), (bs, bs))

                def fwd(vals=vals, x=x, s=s, b=b, tf32=tf32):
                    return K.bsr_linear_fwd(x, vals, tabs.row_ptr, tabs.col_idx, (H, H), s, b, args.activation,
                                            tf32=tf32)

                def jvp(vals=vals, x=x, xd=xd, s=s, b=b, tf32=tf32):
                    return K.bsr_linear_jvp(x, xd, vals, tabs.row_ptr, tabs.col_idx, (H, H), s, b,
                                            args.activation, tf32=tf32)
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32
            for bench, fn in (("layer_fwd", fwd), ("layer_jvp", None if args.no_jvp else jvp)):
                if fn is None:
                    continue
                try:
                    records.append(Record(bench, prov, conf, measure(fn)))
                except Exception as e:  # keep going: one provider failing (e.g. OOM) must not lose the run
                    records.append(Record(bench, prov, conf, float("nan"), dict(error=repr(e)[:300])))
                print(f"  {bench} H={H:5d} B={B:6d} d={cfg.density:4.2f} {prov:15s} {records[-1].ms:9.4f} ms",
                      flush=True)
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32_default
    return records


# ---- field benchmarks ------------------------------------------------------------------------------
def _make_field(cfg: FieldConfig, activation, device, gen):
    import torch  # noqa: PLC0415

    from jsp_fast.cnf import ODEnet  # noqa: PLC0415

    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    net = ODEnet(cfg.dim, (cfg.width,) * cfg.depth, activation)
    bs = cfg.block
    for layer in net.layers[1:-1]:
        n, k = layer.linear.weight.shape
        nb = (n // bs) * (k // bs)
        kept = max(1, round((1 - cfg.sparsity) * nb))
        g = _random_grid(n // bs, k // bs, kept, gen)
        layer.set_mask(g.repeat_interleave(bs, 0).repeat_interleave(bs, 1))
    return net.to(device)


def bench_fields(args, device, measure) -> list[Record]:
    import torch  # noqa: PLC0415

    from jsp_fast.sparse import _cuda  # noqa: PLC0415
    from jsp_fast.sparse._triton import field_plan  # noqa: PLC0415

    records = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    for cfg in field_configs(args):
        net = _make_field(cfg, args.activation, device, gen)
        z = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        eps = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        t = torch.tensor(0.5, device=device)
        plan = field_plan(net, block=cfg.block)
        conf = asdict(cfg)

        def dense(net=net, z=z, eps=eps, t=t):
            with torch.no_grad():
                return net.jvp(t, z, eps[None])

        provs = {"dense_eager": dense,
                 "ours_fused": lambda plan=plan, z=z, eps=eps, t=t: plan(z, eps, t=t, tf32=False),
                 "ours_fused_tf32": lambda plan=plan, z=z, eps=eps, t=t: plan(z, eps, t=t, tf32=True)}
        if args.compile and device.type == "cuda":
            provs["dense_compile"] = torch.compile(dense)
        errs = {}
        with torch.no_grad():  # correctness of each fused field on this config before timing it
            f_ref, je_ref = net.jvp(t, z, eps[None])
            f, je = plan(z, eps, t=t, tf32=False)
            errs["ours_fused"] = errs["ours_fused_tf32"] = max((f - f_ref).abs().max().item(),
                                                               (je - je_ref[0]).abs().max().item())
            if _cuda.available() and device.type == "cuda":
                layers = _cuda.field_layers(net, device)
                provs["ours_cuda_fused"] = lambda layers=layers, z=z, eps=eps, t=t: _cuda.fused_mlp(z, layers, eps[None], t)
                f, je = provs["ours_cuda_fused"]()
                errs["ours_cuda_fused"] = max((f - f_ref).abs().max().item(), (je - je_ref).abs().max().item())
        for name, fn in provs.items():
            try:
                ms = measure(fn)
            except Exception as e:
                records.append(Record("field", name, conf, float("nan"), dict(error=repr(e)[:300])))
                continue
            records.append(Record("field", name, conf, ms, dict(max_abs_err_vs_dense=errs[name]) if name in errs else {}))
            print(f"  field W={cfg.width:4d} B={cfg.batch:6d} {name:16s} {ms:9.4f} ms", flush=True)
    return records


def rk4_solve(field_fn, z, logp, eps, ts):
    """Fixed-step RK4 of d(z, logp)/dt = (f, -eps^T J eps) with ``ts`` a device tensor of stage times
    ``[steps, 3]`` (t, t + h/2, t + h); no host synchronisation, so it can be graph-captured."""
    steps = ts.shape[0]
    for i in range(steps):
        t0, tm, t1 = ts[i, 0], ts[i, 1], ts[i, 2]
        h = t1 - t0

        def rhs(t, zz):
            f, je = field_fn(t, zz, eps)
            return f, -(je * eps).sum(-1)

        k1, l1 = rhs(t0, z)
        k2, l2 = rhs(tm, z + 0.5 * h * k1)
        k3, l3 = rhs(tm, z + 0.5 * h * k2)
        k4, l4 = rhs(t1, z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        logp = logp + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    return z, logp


def bench_solves(args, device, measure) -> list[Record]:
    import torch  # noqa: PLC0415

    from jsp_fast.sparse._triton import field_plan  # noqa: PLC0415

    records = []
    gen = torch.Generator().manual_seed(args.seed + 2)
    widths = sorted({c.width for c in field_configs(args)})
    for width in widths:
        cfg = FieldConfig(args.field_dim, width, args.field_depth, max(args.field_batches), args.field_sparsity,
                          args.block)
        net = _make_field(cfg, args.activation, device, gen)
        plan = field_plan(net, block=cfg.block)
        z0 = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        eps = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        lp0 = torch.zeros(cfg.batch, device=device)
        grid = torch.linspace(0, 1, args.steps + 1, device=device)
        ts = torch.stack([grid[:-1], (grid[:-1] + grid[1:]) / 2, grid[1:]], 1).contiguous()

        def dense_field(t, zz, e, net=net):
            f, je = net.jvp(t, zz, e[None])
            return f, je[0]

        def fused_field(t, zz, e, plan=plan):
            return plan(zz, e, t=t)

        conf = dict(asdict(cfg), steps=args.steps, evaluations=4 * args.steps)
        with torch.no_grad():
            z_ref, lp_ref = rk4_solve(dense_field, z0, lp0, eps, ts)
            z_f, lp_f = rk4_solve(fused_field, z0, lp0, eps, ts)  # also warms up (autotunes) before capture
            err = max((z_f - z_ref).abs().max().item(), (lp_f - lp_ref).abs().max().item())
            runs = {"dense_eager": lambda: rk4_solve(dense_field, z0, lp0, eps, ts),
                    "ours_eager": lambda: rk4_solve(fused_field, z0, lp0, eps, ts)}
            if device.type == "cuda":
                static = [z0.clone(), lp0.clone()]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    rk4_solve(fused_field, *static, eps, ts)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = rk4_solve(fused_field, *static, eps, ts)
                graph.replay()
                torch.cuda.synchronize()
                err = max(err, (out[0] - z_ref).abs().max().item())
                runs["ours_cuda_graph"] = graph.replay
            for name, fn in runs.items():
                ms = measure(fn)
                records.append(Record("solve", name, conf, ms, dict(max_abs_err_vs_dense=err)))
                print(f"  solve W={width:4d} B={cfg.batch:6d} {name:16s} {ms:9.3f} ms", flush=True)
    return records


def bench_e2e(args, device, measure) -> list[Record]:
    """``jf.sparsify`` of a pruned CNF against the dense model: sample and log_prob, torchdiffeq dopri5."""
    import torch  # noqa: PLC0415

    import jsp_fast as jf  # noqa: PLC0415

    records = []
    gen = torch.Generator().manual_seed(args.seed + 3)
    for width in sorted({c.width for c in field_configs(args)}):
        cfg = FieldConfig(args.field_dim, width, args.field_depth, max(args.field_batches), args.field_sparsity,
                          args.block)
        net = _make_field(cfg, args.activation, device, gen)
        model = jf.CNF(dim=cfg.dim, trace="hutchinson", rtol=1e-5, atol=1e-5, net=net).to(device)
        model.eval()
        fast = jf.sparsify(model)
        x = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        with torch.no_grad():
            engine = fast.net.fused_engine(x, x[None])
            torch.manual_seed(0)  # the same Hutchinson noise for both
            lp_d = model.log_prob(x)
            torch.manual_seed(0)
            lp_s = fast.log_prob(x)
            err = (lp_d - lp_s).abs().max().item()
        conf = dict(asdict(cfg), engine=engine)
        for name, fn in (("dense_log_prob", lambda: model.log_prob(x)), ("ours_log_prob", lambda: fast.log_prob(x)),
                         ("dense_sample", lambda: model.sample(cfg.batch, seed=0)),
                         ("ours_sample", lambda: fast.sample(cfg.batch, seed=0))):
            with torch.no_grad():
                ms = measure(fn)
            records.append(Record("e2e", name, conf, ms, dict(max_abs_logp_err=err)))
            print(f"  e2e W={width:4d} B={cfg.batch:6d} {name:16s} {ms:9.3f} ms  (engine {engine})", flush=True)
    return records


# ---- report ----------------------------------------------------------------------------------------
def table(records) -> str:
    rows = {}
    for r in records:
        c = r.config
        key = (r.bench, c.get("width"), c.get("batch"), c.get("density", c.get("sparsity")))
        rows.setdefault(key, {})[r.provider] = r.ms
    lines = []
    for bench in ("layer_fwd", "layer_jvp", "field", "solve", "e2e"):
        keys = [k for k in rows if k[0] == bench]
        if not keys:
            continue
        provs = sorted({p for k in keys for p in rows[k]})
        lines.append(f"\n## {bench} (median ms; lower is better)")
        lines.append(f"{'width':>6} {'batch':>7} {'dens/sp':>7} " + " ".join(f"{p:>16}" for p in provs))
        for k in sorted(keys, key=lambda k: (k[1], k[2], -(k[3] or 0))):
            lines.append(f"{k[1]:>6} {k[2]:>7} {k[3]:>7.2f} " + " ".join(f"{rows[k].get(p, float('nan')):>16.4f}" for p in provs))
    return "\n".join(lines)


def environment(device) -> dict:
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               device=str(device), interpreter=os.environ.get("TRITON_INTERPRET", "0"))
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    device = require_cuda(args.smoke)
    measure = timer(device)
    out = dict(environment=environment(device), args={k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()})
    if not args.skip_tests:
        print("# correctness (Triton tests)")
        out["tests"] = run_tests(args.smoke)
        if out["tests"]["returncode"] != 0:
            print("correctness tests FAILED; timings follow but are suspect", file=sys.stderr)
    records = []

    def save():  # after every stage, atomically: a run cut off by a time limit keeps what it measured
        out["records"] = [asdict(r) for r in records]
        out["targets"] = check_targets(out["records"])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(args.out.suffix + ".tmp")
            tmp.write_text(json.dumps(out, indent=1, default=str))
            tmp.replace(args.out)

    # the narrow-field stages first: they hold the first target and take the least time
    for title, stage in (("fused field", bench_fields), ("RK4 solve", bench_solves),
                         ("end to end (jf.sparsify)", bench_e2e), ("layers", bench_layers)):
        print(f"# {title}", flush=True)
        records += stage(args, device, measure)
        save()
    print(table(records))
    print("\n# targets")
    print(json.dumps({k: v for k, v in out["targets"].items() if not isinstance(v, list)}, indent=1))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
