"""The user's path end to end: ``jf.sparsify(cnf)`` of a pruned CNF, ``sample`` and ``log_prob``
(dopri5, Hutchinson) under ``no_grad`` against the same model dense, with the fused engine that
``jf.sparsify``'s ``"auto"`` picked recorded. ``ours_*`` is the default path (the device-resident solve,
``sparse/backends/_device_solve.py``); ``stepped_log_prob`` the same field under torchdiffeq
(``net.native = False``); ``ours_rk4_graph_log_prob`` a fixed-step RK4 solve (20 steps) replayed from
one CUDA graph."""
from __future__ import annotations

from dataclasses import asdict

import torch

import jsp_fast as jf

from gpu_common import make_field, max_abs_err, time_providers, to_records
from gpu_config import Record, solve_configs


def bench_e2e(args, device) -> list[Record]:
    records = []
    gen = torch.Generator().manual_seed(args.seed + 3)
    for cfg in solve_configs(args):
        net = make_field(cfg, args.activation, device, gen)
        model = jf.CNF(dim=cfg.dim, trace="hutchinson", rtol=1e-5, atol=1e-5, net=net).to(device)
        model.eval()
        fast = jf.sparsify(model)
        stepped = jf.sparsify(model)
        stepped.net.native = False
        rk4 = jf.sparsify(model)
        rk4.solver, rk4.options = "rk4", {"step_size": float(model.T) / 20}
        x = torch.randn(cfg.batch, cfg.dim, generator=gen).to(device)

        def log_prob(m):
            torch.manual_seed(0)  # the same Hutchinson noise for every provider
            return m.log_prob(x)

        with torch.no_grad():
            engine = fast.net.fused_engine(x, x[None])
            err = max_abs_err(log_prob(fast), log_prob(model))
            log_prob(fast)
            native = bool(fast.last_solve.get("native"))
            timed = time_providers({"dense_log_prob": lambda: log_prob(model), "ours_log_prob": lambda: log_prob(fast),
                                    "stepped_log_prob": lambda: log_prob(stepped),
                                    "ours_rk4_graph_log_prob": lambda: log_prob(rk4),
                                    "dense_sample": lambda: model.sample(cfg.batch, seed=0),
                                    "ours_sample": lambda: fast.sample(cfg.batch, seed=0)}, args.repeats, device)
        records += to_records("e2e", dict(asdict(cfg), engine=engine, device_solve=native), timed,
                              {name: {"max_abs_logp_err": err} for name in timed},
                              label=f"W={cfg.width:4d} B={cfg.batch:6d} engine {engine}")
    return records
