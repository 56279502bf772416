"""The whole concatsquash field (value + one Hutchinson tangent) at widths <= 512, and a fixed-step
RK4 solve of the CNF state through it.

Field providers: torch eager dense ``ODEnet.jvp`` (and ``torch.compile`` of it with ``--compile``)
against our one-launch fused fields, reached the way a user reaches them:
``SparseODEnet.from_odenet(net, fused="triton" | "cuda")`` (the CUDA C++ engine when ``jsp_fast._C``
was built with ``JSP_FAST_CUDA=ON``). Solve: the Triton-fused field eagerly and with the whole solve
captured in one CUDA graph, against the eager dense solve.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from jsp_fast import _ext
from jsp_fast.sparse import SparseODEnet
from jsp_fast.sparse.backends._device_solve import capture

from gpu_common import make_field, max_abs_err, time_providers, to_records, with_tf32
from gpu_config import Record, field_configs, solve_configs


def fused(net, engine: str, z: torch.Tensor, v: torch.Tensor) -> SparseODEnet:
    """``net`` as a SparseODEnet that evaluates through the ``engine`` fused field on these inputs; an
    error (never a silent fall-back to another engine) when it would not."""
    # backend: the per-layer ops of the same family, for the inputs the fused engine refuses
    fast = SparseODEnet.from_odenet(net, backend="triton" if engine == "triton" else "auto", fused=engine)
    with torch.no_grad():
        got = fast.fused_engine(z, v)
    if got != engine:
        raise RuntimeError(f"SparseODEnet.from_odenet(net, fused={engine!r}) runs {got!r} on {z.device} {z.dtype}")
    return fast


def bench_fields(args, device) -> list[Record]:
    records = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    for cfg in field_configs(args):
        net = make_field(cfg, args.activation, device, gen)
        z = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        eps = torch.randn(1, cfg.batch, cfg.dim, generator=gen).to(device)
        t = torch.tensor(0.5, device=device)
        conf = asdict(cfg)

        def dense(net=net, z=z, eps=eps, t=t):
            return net.jvp(t, z, eps)

        provs, errors = {"dense_eager": dense}, {}
        if args.compile and device.type == "cuda":
            provs["dense_compile"] = torch.compile(dense)
        engines = {"ours_fused": "triton"}
        if device.type == "cuda" and _ext.has("cuda_fused_mlp"):
            engines["ours_cuda_fused"] = "cuda"
        for name, engine in engines.items():
            try:
                fast = fused(net, engine, z, eps)
            except Exception as e:  # noqa: BLE001 - recorded, the other providers go on
                errors[name] = repr(e)[:300]
                continue
            provs[name] = lambda fast=fast, z=z, eps=eps, t=t: fast.jvp(t, z, eps)
            if engine == "triton":
                provs["ours_fused_tf32"] = with_tf32(True, provs[name])
        with torch.no_grad():
            ref = dense()
            errs = {name: max_abs_err(fn(), ref) for name, fn in provs.items() if name.startswith("ours")}
            timed = time_providers(provs, args.repeats, device)
        for name, err in errors.items():
            records.append(Record("field", name, conf, float("nan"), {"error": err}))
        records += to_records("field", conf, timed, {k: {"max_abs_err_vs_dense": e} for k, e in errs.items()},
                              label=f"W={cfg.width:4d} B={cfg.batch:6d}")
    return records


def rk4_solve(field_fn, z, logp, eps, ts):
    """Fixed-step RK4 of d(z, logp)/dt = (f, -eps^T J eps) with ``ts`` a device tensor of stage times
    ``[steps, 3]`` (t, t + h/2, t + h); no host synchronisation, so it can be graph-captured."""
    for i in range(ts.shape[0]):
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


def _graph(solve, z0, lp0):
    """The whole solve captured in one CUDA graph: (replay, its static output)."""
    graph, out = capture(solve, [z0.clone(), lp0.clone()])
    return graph.replay, out


def bench_solves(args, device) -> list[Record]:
    records = []
    gen = torch.Generator().manual_seed(args.seed + 2)
    for cfg in solve_configs(args):
        net = make_field(cfg, args.activation, device, gen)
        z0 = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        eps = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)
        lp0 = torch.zeros(cfg.batch, device=device)
        grid = torch.linspace(0, 1, args.steps + 1, device=device)
        ts = torch.stack([grid[:-1], (grid[:-1] + grid[1:]) / 2, grid[1:]], 1).contiguous()
        fast = fused(net, "triton", z0, eps[None])

        def dense_field(t, zz, e, net=net):
            f, je = net.jvp(t, zz, e[None])
            return f, je[0]

        def fused_field(t, zz, e, fast=fast):
            f, je = fast.jvp(t, zz, e[None])
            return f, je[0]

        conf = dict(asdict(cfg), steps=args.steps, evaluations=4 * args.steps)
        with torch.no_grad():
            runs = {"dense_eager": lambda: rk4_solve(dense_field, z0, lp0, eps, ts),
                    "ours_eager": lambda: rk4_solve(fused_field, z0, lp0, eps, ts)}
            ref = runs["dense_eager"]()
            errs = {"ours_eager": max_abs_err(runs["ours_eager"](), ref)}  # also autotunes before a capture
            if device.type == "cuda":
                replay, out = _graph(lambda z, lp: rk4_solve(fused_field, z, lp, eps, ts), z0, lp0)
                replay()
                errs["ours_cuda_graph"] = max_abs_err(out, ref)
                runs["ours_cuda_graph"] = replay
            timed = time_providers(runs, args.repeats, device)
        records += to_records("solve", conf, timed, {k: {"max_abs_err_vs_dense": e} for k, e in errs.items()},
                              label=f"W={cfg.width:4d} B={cfg.batch:6d}")
    return records
