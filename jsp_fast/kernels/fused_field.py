"""The whole concatsquash ODEnet in ONE Triton launch per evaluation: value and tangents (J v).

For narrow fields (widths <= 512) a layer's work is about the size of a kernel launch, and the
activations cost more memory traffic than the weights; so every layer, its per-output scale/bias
epilogue, the activation and the forward-mode tangent run in one persistent kernel that keeps a
batch tile's activations in a small per-program scratch (L1/L2-resident: Triton exposes no explicit
shared memory, and a register tile cannot be sliced by block column) and never writes the hidden
activations to DRAM-sized buffers.

Math, per layer l with block-sparse ``W_l`` (``N_l x K_l``), activation ``act`` on all but the last:
    pre_l = s_l * (h_{l-1} W_l^T) + b_l          h_l  = act(pre_l)          (h_0 = z)
    hd_l  = act'(pre_l) * s_l * (hd_{l-1} W_l^T)                              (hd_0 = eps)
with ``s_l``, ``b_l`` either given per call (packed vectors) or computed in the kernel from the
concatsquash hyper-layers and a 1-element time tensor (``s = sigmoid(W_g t + b_g)``,
``b = s * bias + W_b t``), so one solver step's field evaluation is exactly one launch (CUDA-graph
friendly: ``t`` is read from device memory).

Layers are re-blocked on one ``BM x BK`` grid (zero blocks skipped, partial blocks zero-padded), so
dense and block-sparse layers, and the narrow first/last layers, share one code path.

Two parts: the private kernel and its launcher ``fused_field`` over plain tensors (the packed layout
of ``jsp_fast.sparse.plan.stack_field``); the packing object that owns them between calls is
``jsp_fast.sparse.backends.triton.FusedFieldPlan``. No autograd (inference / Hutchinson trace
evaluation; training goes through the per-layer ``bsr_linear`` primitives).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, _act, _act_grad, _tile_dot, acc_dtype, act_code, check_device, check_dtype,
                      dot_precision, next_pow2, num_sms, torch_acc_dtype)

__all__ = ["META", "BLOCK_B_MAX", "encode_meta", "fused_field"]

META = 8  # per-layer int32 record: N, K, block rows, row_ptr offset, vector offset, apply act, -, -


BLOCK_B_MAX = 64  # the scratch is sized for the largest batch tile of the configs


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_B": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_B": b}, num_warps=w, num_stages=1) for b in (16, 32, 64) for w in (4, 8)]


# One persistent program per slot; it walks batch tiles tile = pid, pid + P, ... For each tile:
#   stage z (and eps) into buffer 0 of the program's scratch [2 buffers][1 + TT slots][BLOCK_B][HMAX]
#   for l in layers: for each block row r of W_l: acc = h W_r^T, acc_t = hd W_r^T over the kept
#     blocks of the row (one weight load feeds both dots), epilogue, store into the other buffer;
#     barrier between layers (the next layer reads columns other warps wrote)
#   copy the first D columns of the last buffer to f (and J v).
@triton.autotune(configs=_configs(), key=["B", "D", "T", "L", "HMAX"])
@triton.jit
def _fused_field_kernel(z_ptr, e_ptr, f_ptr, je_ptr, scr_ptr, meta_ptr, rp_ptr, col_ptr, val_ptr,
                        scale_ptr, bias_ptr, gw_ptr, gb_ptr, sw_ptr, t_ptr,
                        B, D, T, L, HMAX,
                        stride_zb, stride_et, stride_eb, stride_fb, stride_jt, stride_jb,
                        BM: tl.constexpr, BK: tl.constexpr, BLOCK_B_MAX: tl.constexpr, TT: tl.constexpr,
                        HAS_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HYPER: tl.constexpr, ACT: tl.constexpr, USE_DOT: tl.constexpr,
                        PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = tl.cdiv(B, BLOCK_B)
    offs_b = tl.arange(0, BLOCK_B)
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    offs_t = tl.arange(0, TT)
    mask_t = offs_t < T
    buf = (1 + TT) * BLOCK_B * HMAX
    scr = scr_ptr + pid.to(tl.int64) * (2 * (1 + TT) * BLOCK_B_MAX * HMAX)
    val_rows = offs_b[:, None] * HMAX                                                   # [BB, 1]
    tan_rows = (1 + offs_t)[:, None, None] * (BLOCK_B * HMAX) + offs_b[None, :, None] * HMAX  # [TT, BB, 1]
    w_off = offs_m[:, None] * BK + offs_k[None, :]
    tval = 0.0
    if HYPER:
        tval = tl.load(t_ptr).to(ACC)

    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_B + offs_b
        mb = rows < B
        r64 = rows.to(tl.int64)
        # -- stage the inputs ------------------------------------------------------------------------
        for j0 in range(0, D, BK):
            cols = j0 + offs_k
            mk = cols < D
            zt = tl.load(z_ptr + r64[:, None] * stride_zb + cols[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
            tl.store(scr + val_rows + cols[None, :], zt.to(ACC), mask=mk[None, :])
            if HAS_T:
                m3 = mask_t[:, None, None] & mb[None, :, None] & mk[None, None, :]
                et = tl.load(e_ptr + offs_t[:, None, None].to(tl.int64) * stride_et + r64[None, :, None] * stride_eb
                             + cols[None, None, :], mask=m3, other=0.0)
                tl.store(scr + tan_rows + cols[None, None, :], et.to(ACC), mask=mask_t[:, None, None] & mk[None, None, :])
        tl.debug_barrier()
        # -- layers ----------------------------------------------------------------------------------
        for l in range(L):
            n_l = tl.load(meta_ptr + l * 8 + 0)
            k_l = tl.load(meta_ptr + l * 8 + 1)
            nbr = tl.load(meta_ptr + l * 8 + 2)
            rp_off = tl.load(meta_ptr + l * 8 + 3)
            sb_off = tl.load(meta_ptr + l * 8 + 4)
            use_act = tl.load(meta_ptr + l * 8 + 5)
            src = scr + (l % 2) * buf
            dst = scr + ((l + 1) % 2) * buf
            for r in range(nbr):
                acc = tl.zeros([BLOCK_B, BM], dtype=ACC)
                acc_t = tl.zeros([TT * BLOCK_B, BM], dtype=ACC)
                lo = tl.load(rp_ptr + rp_off + r)
                hi = tl.load(rp_ptr + rp_off + r + 1)
                for p in range(lo, hi):
                    c = tl.load(col_ptr + p)
                    cols = c * BK + offs_k
                    mk = cols < k_l
                    w = tl.load(val_ptr + p * (BM * BK) + w_off)
                    ht = tl.load(src + val_rows + cols[None, :], mask=mk[None, :], other=0.0)
                    acc = _tile_dot(ht, w.to(ACC), acc, USE_DOT, PRECISION)
                    if HAS_T:
                        htt = tl.load(src + tan_rows + cols[None, None, :],
                                      mask=mask_t[:, None, None] & mk[None, None, :], other=0.0)
                        acc_t = _tile_dot(tl.reshape(htt, [TT * BLOCK_B, BK]), w.to(ACC), acc_t, USE_DOT, PRECISION)
                outs = r * BM + offs_m
                mn = outs < n_l
                vo = sb_off + r * BM + offs_m
                s = tl.full([BM], 1.0, ACC)
                bb = tl.zeros([BM], dtype=ACC)
                if HYPER:
                    s = 1.0 / (1.0 + tl.exp(-(tl.load(gw_ptr + vo).to(ACC) * tval + tl.load(gb_ptr + vo).to(ACC))))
                    bb = s * tl.load(bias_ptr + vo).to(ACC) + tl.load(sw_ptr + vo).to(ACC) * tval
                else:
                    if HAS_SCALE:
                        s = tl.load(scale_ptr + vo).to(ACC)
                    if HAS_BIAS:
                        bb = tl.load(bias_ptr + vo).to(ACC)
                pre = acc * s[None, :] + bb[None, :]
                y = _act(pre, ACT)
                on = tl.zeros([BLOCK_B, BM], dtype=tl.int32) + use_act
                y = tl.where(on != 0, y, pre)
                tl.store(dst + val_rows + outs[None, :], y, mask=mn[None, :])
                if HAS_T:
                    d = tl.where(on != 0, _act_grad(pre, y, ACT), 1.0) * s[None, :]
                    yd = tl.reshape(acc_t, [TT, BLOCK_B, BM]) * d[None, :, :]
                    tl.store(dst + tan_rows + outs[None, None, :], yd, mask=mask_t[:, None, None] & mn[None, None, :])
            tl.debug_barrier()
        # -- outputs ---------------------------------------------------------------------------------
        fin = scr + (L % 2) * buf
        for j0 in range(0, D, BK):
            cols = j0 + offs_k
            mk = cols < D
            m2 = mb[:, None] & mk[None, :]
            ft = tl.load(fin + val_rows + cols[None, :], mask=mk[None, :], other=0.0)
            tl.store(f_ptr + r64[:, None] * stride_fb + cols[None, :], ft.to(f_ptr.dtype.element_ty), mask=m2)
            if HAS_T:
                m3 = mask_t[:, None, None] & m2[None, :, :]
                jt = tl.load(fin + tan_rows + cols[None, None, :], mask=mask_t[:, None, None] & mk[None, None, :],
                             other=0.0)
                tl.store(je_ptr + offs_t[:, None, None].to(tl.int64) * stride_jt + r64[None, :, None] * stride_jb
                         + cols[None, None, :], jt.to(je_ptr.dtype.element_ty), mask=m3)
        tl.debug_barrier()


# ---- launcher --------------------------------------------------------------------------------------
def encode_meta(shapes: Sequence[tuple[int, int]], block_rows: Sequence[int], row_ptr_offsets: Sequence[int],
                vector_offsets: Sequence[int], device) -> torch.Tensor:
    """The kernel's per-layer int32 records (``META`` ints each; the last layer gets no activation)."""
    last = len(shapes) - 1
    rec = [[n, k, nbr, rp, vo, int(i < last), 0, 0]
           for i, ((n, k), nbr, rp, vo) in enumerate(zip(shapes, block_rows, row_ptr_offsets, vector_offsets))]
    return torch.tensor(rec, dtype=torch.int32, device=device).reshape(-1)


def fused_field(z, eps, meta, row_ptr, col_idx, values, block, hmax: int, activation, scale=None, bias=None,
                hyper=None, t=None, scratch: dict | None = None, tf32: bool | None = None,
                max_programs: int | None = None, max_tangents: int = 4):
    """``(f, J eps)`` of a packed field; ``z [B, D]``, ``eps [T, B, D]`` or None (``J eps`` None then).

    ``meta`` from :func:`encode_meta`; ``row_ptr``/``col_idx`` int32 and ``values [nnz, BM, BK]`` of the
    whole field; ``scale``/``bias`` packed per-output vectors (or None), or ``hyper`` =
    ``(gate_w, gate_b, shift_w, bias)`` packed with ``t`` a 1-element tensor (the time gate computed in
    the kernel). ``scratch``: a dict the caller keeps between calls (the per-program scratch buffer).
    """
    check_device(z, "z"), check_dtype(z, "z")
    B, D = z.shape
    f = torch.empty(B, D, device=z.device, dtype=z.dtype)
    T = 0 if eps is None else eps.shape[0]
    je = None if eps is None else torch.empty(T, B, D, device=z.device, dtype=z.dtype)
    if B == 0:
        return f, je
    BM, BK = block
    TT = min(next_pow2(max(T, 1)), next_pow2(max_tangents))
    cap = max_programs or (4 if INTERPRET else 2 * num_sms(z.device))
    acc = torch_acc_dtype(z.dtype)
    scratch = {} if scratch is None else scratch
    key = (z.device, acc, cap, BLOCK_B_MAX, TT)
    if key not in scratch:
        scratch.clear()
        scratch[key] = torch.empty(cap * 2 * (1 + TT) * BLOCK_B_MAX * hmax, device=z.device, dtype=acc)
    scr = scratch[key]
    grid = lambda meta_: (min(triton.cdiv(B, meta_["BLOCK_B"]), cap),)  # noqa: E731
    vals = values if values.dtype == acc else values.to(acc)
    dummy = f
    if hyper is not None:
        t = t.reshape(1).to(device=z.device, dtype=acc)
        gw, gb, sw, hb = (h.to(acc) for h in hyper)
    for t0 in range(0, max(T, 1), TT):
        Tc = min(TT, T - t0) if T else 0
        ec = eps[t0: t0 + Tc] if T else dummy
        jc = je[t0: t0 + Tc] if T else dummy
        _fused_field_kernel[grid](
            z, ec, f, jc, scr, meta, row_ptr, col_idx, vals,
            scale if scale is not None else dummy,
            hb if hyper is not None else (bias if bias is not None else dummy),
            *((gw, gb, sw, t) if hyper is not None else (dummy,) * 4),
            B, D, Tc, meta.numel() // META, hmax,
            z.stride(0), ec.stride(0) if T else 0, ec.stride(1) if T else 0, f.stride(0),
            jc.stride(0) if T else 0, jc.stride(1) if T else 0,
            BM=BM, BK=BK, BLOCK_B_MAX=BLOCK_B_MAX, TT=TT, HAS_T=T > 0,
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HYPER=hyper is not None,
            ACT=act_code(activation), USE_DOT=min(BM, BK) >= 16, PRECISION=dot_precision(acc, tf32),
            ACC=acc_dtype(z.dtype))
    return f, je
