"""Block-sparse linear layer with a fused epilogue: forward and forward+JVP (Triton).

Weight format (plain tensors, no plan object): the kept ``bm x bk`` blocks of an ``N x K`` weight ``W``
as ``values [nnzb, bm, bk]`` (``values[p] = W[r*bm:(r+1)*bm, c*bk:(c+1)*bk]``), ordered by block row;
``row_ptr [N/bm + 1]`` (CSR over block rows) and ``col_idx [nnzb]`` (block column of each block),
int32 or int64, as built by ``jsp_fast.sparse.plan``. The transposed (block-column) table used by the
input gradient is read by ``bsr_grad.py``.

Two parts: private ``@triton.jit`` kernels and launchers over plain tensors. Autograd lives above,
in the ``jsp_fast::bsr_*`` custom ops (``jsp_fast/sparse/_ops.py``), which call these launchers
through the "triton" backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (_act, _act_grad, _tile_dot, acc_dtype, act_code, check_device, check_dtype, configs,
                      dot_precision, next_pow2, use_dot)

__all__ = ["bsr_linear_fwd", "bsr_linear_jvp"]


# ---- kernels -------------------------------------------------------------------------------------
# One program per (block row r, batch tile):
#   acc[b, :]  = sum_{p in row_ptr[r]..row_ptr[r+1]} x[b, col_idx[p]*bk : +bk] @ values[p]^T
#   pre        = scale[r*bm : +bm] * acc + bias[r*bm : +bm]
#   y[b, r*bm : +bm] = act(pre)          (prod = acc stored when STORE_PROD, for d/dscale)
# Block rows are the fast grid axis so programs sharing a batch tile of x run together (L2 reuse).
@triton.autotune(configs=configs(), key=["B", "N", "K", "bm", "bk"])
@triton.jit
def _bsr_fwd_kernel(x_ptr, v_ptr, row_ptr, col_ptr, scale_ptr, bias_ptr, y_ptr, prod_ptr,
                    B, N, K, stride_xb, stride_yb,
                    bm: tl.constexpr, bk: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    STORE_PROD: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    r = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    mask_b = offs_b < B
    mask_m = offs_m < bm
    mask_k = offs_k < bk
    rows_x = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    w_off = offs_m[:, None] * bk + offs_k[None, :]
    w_mask = mask_m[:, None] & mask_k[None, :]

    acc = tl.zeros([BLOCK_B, BM], dtype=ACC)
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    for p in range(start, end):
        c = tl.load(col_ptr + p)
        xt = tl.load(rows_x + (c * bk + offs_k)[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(v_ptr + p * (bm * bk) + w_off, mask=w_mask, other=0.0)
        acc = _tile_dot(xt, w, acc, USE_DOT, PRECISION)

    offs_n = r * bm + offs_m
    pre = acc
    if HAS_SCALE:
        pre = pre * tl.load(scale_ptr + offs_n, mask=mask_m, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        pre = pre + tl.load(bias_ptr + offs_n, mask=mask_m, other=0.0).to(ACC)[None, :]
    y = _act(pre, ACT)
    out_off = offs_b.to(tl.int64)[:, None] * stride_yb + offs_n[None, :]
    out_mask = mask_b[:, None] & mask_m[None, :]
    tl.store(y_ptr + out_off, y.to(y_ptr.dtype.element_ty), mask=out_mask)
    if STORE_PROD:
        tl.store(prod_ptr + out_off, acc.to(prod_ptr.dtype.element_ty), mask=out_mask)


# Forward + JVP, weights read once per (block row, batch tile, tangent chunk):
#   acc  = x Wr^T,  acc_t[i] = x_dot[i] Wr^T   (i in this program's chunk of TT tangents)
#   pre  = scale * acc + bias;  y = act(pre);  y_dot[i] = act'(pre) * scale * acc_t[i]
# The TT tangent tiles are stacked into one [TT*BLOCK_B, BK] operand, so each weight block feeds one
# value dot and one tangent dot. Chunk 0 also stores y (other chunks recompute it for act').
@triton.autotune(configs=configs(block_b=(16, 32, 64), warps=(4, 8), stages=(2,)),
                 key=["B", "N", "K", "T", "bm", "bk", "TT"])
@triton.jit
def _bsr_jvp_kernel(x_ptr, xd_ptr, v_ptr, row_ptr, col_ptr, scale_ptr, bias_ptr, y_ptr, yd_ptr,
                    B, N, K, T, stride_xb, stride_xdt, stride_xdb, stride_yb, stride_ydt, stride_ydb,
                    bm: tl.constexpr, bk: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, TT: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    r = tl.program_id(0)
    pid_b = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_t = chunk * TT + tl.arange(0, TT)
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    mask_b = offs_b < B
    mask_t = offs_t < T
    mask_m = offs_m < bm
    mask_k = offs_k < bk
    b64 = offs_b.to(tl.int64)
    rows_x = x_ptr + b64[:, None] * stride_xb
    rows_xd = xd_ptr + offs_t.to(tl.int64)[:, None, None] * stride_xdt + b64[None, :, None] * stride_xdb
    mask_xd = mask_t[:, None, None] & mask_b[None, :, None] & mask_k[None, None, :]
    w_off = offs_m[:, None] * bk + offs_k[None, :]
    w_mask = mask_m[:, None] & mask_k[None, :]

    acc = tl.zeros([BLOCK_B, BM], dtype=ACC)
    acc_t = tl.zeros([TT * BLOCK_B, BM], dtype=ACC)
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    for p in range(start, end):
        c = tl.load(col_ptr + p)
        cols = c * bk + offs_k
        xt = tl.load(rows_x + cols[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        xdt = tl.load(rows_xd + cols[None, None, :], mask=mask_xd, other=0.0)
        w = tl.load(v_ptr + p * (bm * bk) + w_off, mask=w_mask, other=0.0)
        acc = _tile_dot(xt, w, acc, USE_DOT, PRECISION)
        acc_t = _tile_dot(tl.reshape(xdt, [TT * BLOCK_B, BK]), w, acc_t, USE_DOT, PRECISION)

    offs_n = r * bm + offs_m
    pre = acc
    gain = tl.full([BLOCK_B, BM], 1.0, ACC)
    if HAS_SCALE:
        s = tl.load(scale_ptr + offs_n, mask=mask_m, other=0.0).to(ACC)[None, :]
        pre = pre * s
        gain = gain * s
    if HAS_BIAS:
        pre = pre + tl.load(bias_ptr + offs_n, mask=mask_m, other=0.0).to(ACC)[None, :]
    y = _act(pre, ACT)
    gain = gain * _act_grad(pre, y, ACT)
    out_mask = mask_b[:, None] & mask_m[None, :]
    if chunk == 0:
        tl.store(y_ptr + b64[:, None] * stride_yb + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)
    yd = tl.reshape(acc_t, [TT, BLOCK_B, BM]) * gain[None, :, :]
    yd_off = offs_t.to(tl.int64)[:, None, None] * stride_ydt + b64[None, :, None] * stride_ydb + offs_n[None, None, :]
    tl.store(yd_ptr + yd_off, yd.to(yd_ptr.dtype.element_ty), mask=mask_t[:, None, None] & out_mask[None, :, :])


# ---- launchers -----------------------------------------------------------------------------------
def _check_weight(values, row_ptr, col_idx, shape):
    if values.dim() != 3:
        raise ValueError(f"values must be [nnzb, bm, bk], got {tuple(values.shape)}")
    n, k = (int(s) for s in shape)
    bm, bk = int(values.shape[1]), int(values.shape[2])
    if n % bm or k % bk:
        raise ValueError(f"weight shape {(n, k)} does not tile into {bm}x{bk} blocks")
    if row_ptr.numel() != n // bm + 1:
        raise ValueError(f"row_ptr must have N/bm + 1 = {n // bm + 1} entries, got {row_ptr.numel()}")
    if col_idx.numel() != values.shape[0]:
        raise ValueError(f"col_idx has {col_idx.numel()} entries for {values.shape[0]} blocks")
    return n, k, bm, bk


def _vec(v, n, like, name):
    if v is None:
        return None
    v = v.reshape(-1)
    if v.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {v.numel()}")
    check_device(v, name)
    return v.contiguous()


def _nonempty(values):
    """Triton wants a valid pointer even when no block is kept."""
    return values if values.numel() else values.new_zeros(1)


def bsr_linear_fwd(x, values, row_ptr, col_idx, shape, scale=None, bias=None, activation=None,
                   store_prod: bool = False, tf32: bool | None = None):
    """``act(scale * (x @ W^T) + bias)`` for ``x [..., K]``; returns ``y`` or ``(y, x @ W^T)``."""
    n, k, bm, bk = _check_weight(values, row_ptr, col_idx, shape)
    check_device(x), check_dtype(x)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    B = x2.shape[0]
    y = torch.empty(B, n, device=x.device, dtype=x.dtype)
    prod = torch.empty_like(y) if store_prod else y
    scale, bias = _vec(scale, n, x, "scale"), _vec(bias, n, x, "bias")
    if B and n:
        grid = lambda meta: (n // bm, triton.cdiv(B, meta["BLOCK_B"]))  # noqa: E731
        _bsr_fwd_kernel[grid](
            x2, _nonempty(values.contiguous()), row_ptr, col_idx,
            scale if scale is not None else y, bias if bias is not None else y, y, prod,
            B, n, k, x2.stride(0), y.stride(0),
            bm=bm, bk=bk, BM=next_pow2(bm), BK=next_pow2(bk),
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=act_code(activation),
            STORE_PROD=store_prod, USE_DOT=use_dot(bm, bk), PRECISION=dot_precision(x.dtype, tf32),
            ACC=acc_dtype(x.dtype))
    y = y.reshape(*lead, n)
    return (y, prod.reshape(*lead, n)) if store_prod else y


def bsr_linear_jvp(x, x_dot, values, row_ptr, col_idx, shape, scale=None, bias=None, activation=None,
                   tf32: bool | None = None, max_chunk: int = 4):
    """Value and T tangents in one pass: ``y = act(scale*(x W^T)+bias)``,
    ``y_dot[i] = act'(pre) * scale * (x_dot[i] W^T)``. ``x [B, K]``, ``x_dot [T, B, K]``."""
    n, k, bm, bk = _check_weight(values, row_ptr, col_idx, shape)
    check_device(x), check_dtype(x)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [B, {k}], got {tuple(x.shape)}")
    if x_dot.dim() != 3 or x_dot.shape[1:] != x.shape:
        raise ValueError(f"x_dot must be [T, {x.shape[0]}, {k}], got {tuple(x_dot.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    x_dot = x_dot.to(x.dtype)
    x_dot = x_dot if x_dot.stride(-1) == 1 else x_dot.contiguous()
    T, B = x_dot.shape[0], x.shape[0]
    y = torch.empty(B, n, device=x.device, dtype=x.dtype)
    yd = torch.empty(T, B, n, device=x.device, dtype=x.dtype)
    if T == 0:
        return bsr_linear_fwd(x, values, row_ptr, col_idx, shape, scale, bias, activation, tf32=tf32), yd
    scale, bias = _vec(scale, n, x, "scale"), _vec(bias, n, x, "bias")
    TT = min(next_pow2(T), max_chunk)
    if B and n:
        grid = lambda meta: (n // bm, triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(T, TT))  # noqa: E731
        _bsr_jvp_kernel[grid](
            x, x_dot, _nonempty(values.contiguous()), row_ptr, col_idx,
            scale if scale is not None else y, bias if bias is not None else y, y, yd,
            B, n, k, T, x.stride(0), x_dot.stride(0), x_dot.stride(1), y.stride(0), yd.stride(0), yd.stride(1),
            bm=bm, bk=bk, BM=next_pow2(bm), BK=next_pow2(bk), TT=TT,
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=act_code(activation),
            USE_DOT=use_dot(bm, bk), PRECISION=dot_precision(x.dtype, tf32), ACC=acc_dtype(x.dtype))
    return y, yd
