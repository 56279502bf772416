"""Block-sparse backward primitives (Triton): transposed product ``g W`` and kept-block ``g^T x``.

Transposed (block-column) table, built once with the plan (``jsp_fast.sparse.plan``):
``col_ptr [K/bk + 1]`` (CSC over block columns), ``t_row [nnzb]`` (block row of each block, in column
order) and ``t_perm [nnzb]`` (its index into ``values``); int32 or int64.

Two parts: private kernels and launchers over plain tensors (autograd is in ``jsp_fast/sparse/_ops.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, _tile_dot_nn, acc_dtype, check_device, check_dtype, configs, dot_precision,
                      next_pow2, num_sms, torch_acc_dtype, use_dot)

__all__ = ["bsr_t_matmul", "bsr_weight_grad"]


# ---- kernels -------------------------------------------------------------------------------------
# Input gradient, one program per (block column c, batch tile):
#   dx[b, c*bk : +bk] = sum_{q in col_ptr[c]..col_ptr[c+1]} g[b, t_row[q]*bm : +bm] @ values[t_perm[q]]
# Block columns with no kept block store zeros.
@triton.autotune(configs=configs(), key=["B", "N", "K", "bm", "bk"])
@triton.jit
def _bsr_t_matmul_kernel(g_ptr, v_ptr, col_ptr, t_row_ptr, t_perm_ptr, dx_ptr,
                         B, N, K, stride_gb, stride_xb,
                         bm: tl.constexpr, bk: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    c = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    mask_b = offs_b < B
    mask_m = offs_m < bm
    mask_k = offs_k < bk
    b64 = offs_b.to(tl.int64)
    rows_g = g_ptr + b64[:, None] * stride_gb
    w_off = offs_m[:, None] * bk + offs_k[None, :]
    w_mask = mask_m[:, None] & mask_k[None, :]

    acc = tl.zeros([BLOCK_B, BK], dtype=ACC)
    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    for q in range(start, end):
        r = tl.load(t_row_ptr + q)
        p = tl.load(t_perm_ptr + q).to(tl.int64)
        gt = tl.load(rows_g + (r * bm + offs_m)[None, :], mask=mask_b[:, None] & mask_m[None, :], other=0.0)
        w = tl.load(v_ptr + p * (bm * bk) + w_off, mask=w_mask, other=0.0)
        acc = _tile_dot_nn(gt, w, acc, USE_DOT, PRECISION)
    tl.store(dx_ptr + b64[:, None] * stride_xb + (c * bk + offs_k)[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_k[None, :])


# Weight gradient on kept blocks only, one program per (block p, batch split s):
#   part[s, p] = sum_{b in split s} g[b, row(p)*bm : +bm]^T (x) x[b, col(p)*bk : +bk]     [bm, bk]
# Splits over the batch give narrow layers (few blocks, huge batch) enough programs; the launcher
# sums the partials (deterministic, no atomics).
@triton.autotune(configs=configs(block_b=(32, 64, 128), warps=(4,), stages=(2, 3)), key=["B", "N", "K", "bm", "bk"])
@triton.jit
def _bsr_weight_grad_kernel(g_ptr, x_ptr, row_idx_ptr, col_idx_ptr, part_ptr,
                            B, N, K, nnzb, CHUNK, stride_gb, stride_xb,
                            bm: tl.constexpr, bk: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                            USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_B: tl.constexpr):
    p = tl.program_id(0)
    s = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < bm
    mask_k = offs_k < bk
    r = tl.load(row_idx_ptr + p)
    c = tl.load(col_idx_ptr + p)
    cols_g = r * bm + offs_m
    cols_x = c * bk + offs_k
    acc = tl.zeros([BM, BK], dtype=ACC)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, B)
    for b0 in range(lo, hi, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < hi
        b64 = offs_b.to(tl.int64)
        gt = tl.load(g_ptr + b64[None, :] * stride_gb + cols_g[:, None], mask=mask_m[:, None] & mask_b[None, :],
                     other=0.0)                                                   # [BM, BLOCK_B]
        xt = tl.load(x_ptr + b64[:, None] * stride_xb + cols_x[None, :], mask=mask_b[:, None] & mask_k[None, :],
                     other=0.0)                                                   # [BLOCK_B, BK]
        acc = _tile_dot_nn(gt, xt, acc, USE_DOT, PRECISION)
    out = part_ptr + (s.to(tl.int64) * nnzb + p) * (bm * bk) + offs_m[:, None] * bk + offs_k[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_k[None, :])


# ---- launchers -----------------------------------------------------------------------------------
def _flat(t, width, name):
    check_device(t, name), check_dtype(t, name)
    if t.shape[-1] != width:
        raise ValueError(f"{name} has {t.shape[-1]} features, expected {width}")
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def bsr_t_matmul(g, values, col_ptr, t_row, t_perm, shape, tf32: bool | None = None):
    """``g @ W`` (``[..., N] -> [..., K]``) through the transposed (block-column) table."""
    n, k = (int(s) for s in shape)
    bm, bk = int(values.shape[1]), int(values.shape[2])
    if col_ptr.numel() != k // bk + 1:
        raise ValueError(f"col_ptr must have K/bk + 1 = {k // bk + 1} entries, got {col_ptr.numel()}")
    lead = g.shape[:-1]
    g2 = _flat(g, n, "g")
    B = g2.shape[0]
    dx = torch.empty(B, k, device=g.device, dtype=g.dtype)
    if B and k:
        vals = values.contiguous().to(g.dtype) if values.numel() else g.new_zeros(1)
        grid = lambda meta: (k // bk, triton.cdiv(B, meta["BLOCK_B"]))  # noqa: E731
        _bsr_t_matmul_kernel[grid](
            g2, vals, col_ptr, t_row, t_perm, dx, B, n, k, g2.stride(0), dx.stride(0),
            bm=bm, bk=bk, BM=next_pow2(bm), BK=next_pow2(bk), USE_DOT=use_dot(bm, bk),
            PRECISION=dot_precision(g.dtype, tf32), ACC=acc_dtype(g.dtype))
    return dx.reshape(*lead, k)


def _splits(nnzb: int, B: int, device) -> int:
    """Batch splits so that about 4 programs per SM run (1 under the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 1 if B <= 64 else 2
    want = max(1, (4 * num_sms(device)) // max(nnzb, 1))
    return int(max(1, min(want, triton.cdiv(B, 512))))


def bsr_weight_grad(g, x, row_idx, col_idx, block, tf32: bool | None = None, out_dtype=None):
    """``g^T x`` on the kept blocks: ``[nnzb, bm, bk]`` with ``out[p] = g[:, rows(p)]^T x[:, cols(p)]``.

    ``g [..., N]``, ``x [..., K]`` (same leading dims, summed over), ``row_idx``/``col_idx`` the block
    row and column of every kept block."""
    bm, bk = (int(b) for b in block)
    nnzb = int(col_idx.numel())
    if row_idx.numel() != nnzb:
        raise ValueError("row_idx and col_idx must have one entry per kept block")
    N, K = g.shape[-1], x.shape[-1]
    g2, x2 = _flat(g, N, "g"), _flat(x, K, "x").to(g.dtype)
    if g2.shape[0] != x2.shape[0]:
        raise ValueError(f"g and x must share leading dims, got {tuple(g.shape)} and {tuple(x.shape)}")
    B = g2.shape[0]
    out_dtype = out_dtype or g.dtype
    if nnzb == 0 or B == 0:
        return torch.zeros(nnzb, bm, bk, device=g.device, dtype=out_dtype)
    S = _splits(nnzb, B, g.device)
    chunk = triton.cdiv(triton.cdiv(B, S), 128) * 128
    S = triton.cdiv(B, chunk)
    part = torch.empty(S, nnzb, bm, bk, device=g.device, dtype=torch_acc_dtype(g.dtype))
    _bsr_weight_grad_kernel[(nnzb, S)](
        g2, x2, row_idx, col_idx, part, B, N, K, nnzb, chunk, g2.stride(0), x2.stride(0),
        bm=bm, bk=bk, BM=next_pow2(bm), BK=next_pow2(bk), USE_DOT=use_dot(bm, bk),
        PRECISION=dot_precision(g.dtype, tf32), ACC=acc_dtype(g.dtype))
    return (part[0] if S == 1 else part.sum(0)).to(out_dtype)
