"""One block-sparse layer ``act(scale * (x W^T) + bias)`` and its forward+JVP on the GPU.

Square, width H, batch B, square blocks, block density d. Providers: ours (``jf.ops.bsr_linear`` /
``bsr_linear_jvp`` on the triton backend; fp32 IEEE, fp32 TF32, bf16) against cuBLAS dense eager
(``F.linear`` + the same epilogue; TF32 off, TF32 on, bf16) and torch's Triton BSR
(``torch.sparse._triton_ops.bsr_dense_mm`` on ``W.to_sparse_bsr``; fp32 and bf16; forward only).
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

import jsp_fast as jf
from jsp_fast import _act

from gpu_common import random_grid, time_providers, to_records, with_tf32
from gpu_config import Record, layer_configs


def _torch_bsr_mm():
    try:  # a private torch module: absent or renamed in some versions, then the provider is skipped
        from torch.sparse._triton_ops import bsr_dense_mm  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        return None
    return bsr_dense_mm


def _providers(args, device, H, bs, grid, W32, x32, xd32, s32, b32) -> dict:
    """``{(bench, provider): fn}`` for one config."""
    act = args.activation
    bsr_dense_mm = _torch_bsr_mm() if device.type == "cuda" else None
    fns = {}
    for prov in args.providers:
        dt = torch.bfloat16 if prov.endswith("bf16") else torch.float32
        if device.type == "cpu" and dt == torch.bfloat16:
            continue  # the interpreter has no bfloat16
        W, x, xd, s, b = (t.to(dt) for t in (W32, x32, xd32, s32, b32))
        tf32 = prov.endswith("tf32")
        fwd = jvp = None
        if prov.startswith("cublas"):
            def fwd(W=W, x=x, s=s, b=b):
                return _act.apply(act, F.linear(x, W) * s + b)

            def jvp(W=W, x=x, xd=xd, s=s, b=b):
                pre = F.linear(x, W) * s + b
                y = _act.apply(act, pre)
                return y, _act.derivative(act, pre, y) * s * F.linear(xd, W)
        elif prov.startswith("torch_bsr"):
            if bsr_dense_mm is None:
                continue
            Wb = W.to_sparse_bsr((bs, bs))

            def fwd(Wb=Wb, x=x, s=s, b=b):  # torch's Triton kernel computes W x^T: transpose around it
                return _act.apply(act, bsr_dense_mm(Wb, x.t()).t() * s + b)
        else:
            w = jf.sparse.BlockSparseWeight.from_dense(W, grid.to(device), (bs, bs))

            def fwd(w=w, x=x, s=s, b=b):
                return jf.ops.bsr_linear(x, w, s, b, act, backend="triton")

            def jvp(w=w, x=x, xd=xd, s=s, b=b):
                return jf.ops.bsr_linear_jvp(x, xd, w, s, b, act, backend="triton")
        fns[("layer_fwd", prov)] = with_tf32(tf32, fwd)
        if jvp is not None and not args.no_jvp:
            fns[("layer_jvp", prov)] = with_tf32(tf32, jvp)
    return fns


def bench_layers(args, device) -> list[Record]:
    records = []
    gen = torch.Generator().manual_seed(args.seed)
    for cfg in layer_configs(args):
        H, B, bs = cfg.width, cfg.batch, cfg.block
        grid = random_grid(H // bs, H // bs, cfg.kept, gen)
        mask = grid.repeat_interleave(bs, 0).repeat_interleave(bs, 1).to(device)
        W32 = (torch.randn(H, H, generator=gen) / H ** 0.5).to(device) * mask
        x32 = torch.randn(B, H, generator=gen).to(device)
        xd32 = torch.randn(1, B, H, generator=gen).to(device)
        s32 = (torch.rand(H, generator=gen) + 0.5).to(device)
        b32 = torch.randn(H, generator=gen).to(device)
        conf = dict(asdict(cfg), density_actual=cfg.kept / cfg.n_blocks)
        fns = _providers(args, device, H, bs, grid, W32, x32, xd32, s32, b32)
        with torch.no_grad():
            for bench in ("layer_fwd", "layer_jvp"):
                timed = time_providers({p: f for (bn, p), f in fns.items() if bn == bench}, args.repeats, device)
                records += to_records(bench, conf, timed, label=f"H={H:5d} B={B:6d} d={cfg.density:4.2f}")
    return records
