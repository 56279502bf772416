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

Three parts: the private kernel, ``FusedFieldPlan`` (packs weights and tables once; its ``__call__``
is the launcher) with the functional ``fused_field``, and no autograd (inference / Hutchinson trace
evaluation; training goes through the per-layer ``bsr_linear`` primitives).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, _act, _act_grad, _tile_dot, acc_dtype, act_code, check_device, check_dtype,
                      dot_precision, next_pow2, num_sms, torch_acc_dtype)

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


# ---- plan + launcher -------------------------------------------------------------------------------
def _pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = w.new_zeros(rows, cols)
    out[: w.shape[0], : w.shape[1]] = w
    return out


class FusedFieldPlan:
    """Packed weights and tables of a whole field, built once (the weights are fixed for a solve).

    ``weights``: per layer a dense ``[N_l, K_l]`` tensor (zeros outside kept blocks: all-zero blocks are
    skipped), chaining ``D -> ... -> D``. ``masks`` (optional, bool like each weight) marks the kept
    entries explicitly. ``block``: the kernel's block (int or pair; each side >= 16 uses tensor-core
    dots; 32 suits 32x32-pruned layers). ``hyper`` (optional): per layer
    ``(gate_weight [N], gate_bias [N], shift_weight [N], bias [N] or None)`` of the concatsquash
    hyper-layers, enabling ``plan(z, eps, t=t_tensor)`` with the time gate computed in the kernel.
    """

    def __init__(self, weights: Sequence[torch.Tensor], block=32, masks=None, hyper=None,
                 activation: str = "tanh", max_tangents: int = 4):
        if not weights:
            raise ValueError("need at least one layer")
        self.block = (block, block) if isinstance(block, int) else tuple(int(b) for b in block)
        BM, BK = self.block
        if BM & (BM - 1) or BK & (BK - 1):
            raise ValueError(f"block sides must be powers of two, got {self.block}")
        self.activation = activation
        self.act = act_code(activation)
        self.max_tangents = next_pow2(max_tangents)
        dev = weights[0].device
        self.device = dev
        self.dim = int(weights[0].shape[1])
        self.widths = [int(w.shape[0]) for w in weights]
        if self.widths[-1] != self.dim:
            raise ValueError(f"the last layer must map back to dim {self.dim}, got {self.widths[-1]}")
        for i, (a, b) in enumerate(zip(weights[:-1], weights[1:])):
            if a.shape[0] != b.shape[1]:
                raise ValueError(f"layer {i} output {a.shape[0]} does not feed layer {i + 1} input {b.shape[1]}")
        meta, rp, cols, vals, self.offsets = [], [], [], [], []
        nnz = rp_off = sb_off = hmax = 0
        self.nnzb = []
        for i, w in enumerate(weights):
            n, k = w.shape
            nbr, nbc = -(-n // BM), -(-k // BK)
            hmax = max(hmax, nbr * BM, nbc * BK)
            wp = _pad_to(w.detach(), nbr * BM, nbc * BK)
            keep = wp != 0 if masks is None or masks[i] is None else _pad_to(masks[i].to(wp.dtype), nbr * BM, nbc * BK) != 0
            grid = keep.reshape(nbr, BM, nbc, BK).any(dim=3).any(dim=1)
            rr, cc = grid.nonzero(as_tuple=True)
            vals.append(wp.reshape(nbr, BM, nbc, BK).permute(0, 2, 1, 3)[rr, cc])
            row_ptr = torch.zeros(nbr + 1, dtype=torch.int64, device=dev)
            row_ptr[1:] = torch.cumsum(grid.sum(1), 0)
            rp.append(row_ptr + nnz)
            cols.append(cc)
            meta.append([n, k, nbr, rp_off, sb_off, int(i < len(weights) - 1), 0, 0])
            self.offsets.append((sb_off, n))
            self.nnzb.append(int(rr.numel()))
            nnz += int(rr.numel())
            rp_off += nbr + 1
            sb_off += nbr * BM
        self.hmax = hmax
        self.vec_len = sb_off
        self.num_layers = len(weights)
        self.meta = torch.tensor(meta, dtype=torch.int32, device=dev).reshape(-1)
        self.row_ptr = torch.cat(rp).to(torch.int32)
        self.col_idx = torch.cat(cols).to(torch.int32) if nnz else torch.zeros(1, dtype=torch.int32, device=dev)
        self.values = torch.cat(vals).contiguous() if nnz else weights[0].new_zeros(1, BM, BK)
        self.hyper = None
        if hyper is not None:
            gw, gb, sw, b = zip(*hyper)
            zeros = [torch.zeros(n, dtype=self.values.dtype, device=dev) for n in self.widths]
            b = [bi if bi is not None else z for bi, z in zip(b, zeros)]
            self.hyper = tuple(self.pack(v) for v in (gw, gb, sw, b))
        self._scratch = {}

    @classmethod
    def from_specs(cls, specs, activation: str = "tanh", block=32, **kw) -> "FusedFieldPlan":
        """From ``(weight, mask, gate_w, gate_b, shift_w, bias)`` per layer (``SparseODEnet`` layers'
        ``fused_spec()``; for an ``ODEnet`` layer: ``effective_weight()``, ``mask``, the hyper-layers)."""
        weights, masks, hyper = [], [], []
        for w, m, gw, gb, sw, b in specs:
            weights.append(w.detach())
            masks.append(m)
            hyper.append(tuple(None if v is None else v.detach().reshape(-1) for v in (gw, gb, sw, b)))
        return cls(weights, block=block, masks=masks, hyper=hyper, activation=activation, **kw)

    def pack(self, vectors) -> torch.Tensor:
        """Per-layer ``[N_l]`` vectors -> the kernel's packed ``[sum_l padded N_l]`` vector."""
        if len(vectors) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} per-layer vectors, got {len(vectors)}")
        out = torch.zeros(self.vec_len, dtype=self.values.dtype, device=self.device)
        for (off, n), v in zip(self.offsets, vectors):
            if v is not None:
                out[off: off + n] = v.reshape(-1).to(out.dtype)
        return out

    def _scratch_for(self, device, dtype, nprog, block_b, tt):
        key = (device, dtype, nprog, block_b, tt)
        if key not in self._scratch:
            self._scratch = {key: torch.empty(nprog * 2 * (1 + tt) * block_b * self.hmax, device=device, dtype=dtype)}
        return self._scratch[key]

    def __call__(self, z, eps=None, scales=None, biases=None, t=None, tf32: bool | None = None,
                 max_programs: int | None = None):
        """``(f, J eps)``; ``eps`` ``[B, D]`` or ``[T, B, D]`` (or None: ``(f, None)``).

        ``scales``/``biases``: per-layer lists of ``[N_l]`` (or None) or pre-packed vectors
        (``plan.pack``); or ``t`` (a tensor) with the plan's ``hyper`` to gate in the kernel."""
        check_device(z, "z"), check_dtype(z, "z")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be [B, {self.dim}], got {tuple(z.shape)}")
        z = z if z.stride(-1) == 1 else z.contiguous()
        B, D = z.shape
        squeeze = eps is not None and eps.dim() == 2
        if eps is not None:
            e = eps[None] if squeeze else eps
            if e.dim() != 3 or e.shape[1:] != z.shape:
                raise ValueError(f"eps must be [B, D] or [T, B, D] matching z {tuple(z.shape)}, got {tuple(eps.shape)}")
            e = e.to(z.dtype)
            e = e if e.stride(-1) == 1 else e.contiguous()
        hyper = t is not None
        if hyper and self.hyper is None:
            raise ValueError("t given but the plan has no hyper-layers (build it with hyper= or from_specs)")
        if hyper and (scales is not None or biases is not None):
            raise ValueError("give either t (in-kernel time gate) or scales/biases, not both")
        pk = lambda v: None if v is None else (v if torch.is_tensor(v) and v.dim() == 1 and v.numel() == self.vec_len  # noqa: E731
                                               else self.pack(v))
        scale, bias = pk(scales), pk(biases)
        f = torch.empty(B, D, device=z.device, dtype=z.dtype)
        T = 0 if eps is None else e.shape[0]
        je = None if eps is None else torch.empty(T, B, D, device=z.device, dtype=z.dtype)
        if B == 0:
            return f, (je[0] if squeeze else je)
        TT = min(next_pow2(max(T, 1)), self.max_tangents)
        cap = max_programs or (4 if INTERPRET else 2 * num_sms(z.device))
        acc = torch_acc_dtype(z.dtype)
        scr = self._scratch_for(z.device, acc, cap, BLOCK_B_MAX, TT)
        grid = lambda meta: (min(triton.cdiv(B, meta["BLOCK_B"]), cap),)  # noqa: E731
        vals = self.values if self.values.dtype == acc else self.values.to(acc)
        dummy = f
        if hyper:
            t = t.reshape(1).to(device=z.device, dtype=acc)
            gw, gb, sw, hb = (h.to(acc) for h in self.hyper)
        for t0 in range(0, max(T, 1), TT):
            Tc = min(TT, T - t0) if T else 0
            ec = e[t0: t0 + Tc] if T else dummy
            jc = je[t0: t0 + Tc] if T else dummy
            _fused_field_kernel[grid](
                z, ec, f, jc, scr, self.meta, self.row_ptr, self.col_idx, vals,
                scale if scale is not None else dummy,
                hb if hyper else (bias if bias is not None else dummy),
                gw if hyper else dummy, gb if hyper else dummy, sw if hyper else dummy, t if hyper else dummy,
                B, D, Tc, self.num_layers, self.hmax,
                z.stride(0), ec.stride(0) if T else 0, ec.stride(1) if T else 0, f.stride(0),
                jc.stride(0) if T else 0, jc.stride(1) if T else 0,
                BM=self.block[0], BK=self.block[1], BLOCK_B_MAX=BLOCK_B_MAX, TT=TT, HAS_T=T > 0,
                HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HYPER=hyper, ACT=self.act,
                USE_DOT=min(self.block) >= 16, PRECISION=dot_precision(acc, tf32),
                ACC=acc_dtype(z.dtype))
        return f, (None if je is None else (je[0] if squeeze else je))


def fused_field(z, eps, layers, activation: str = "tanh", block=32, **kw):
    """One-shot ``(f, J eps)`` for ``layers`` = per-layer ``(weight [N, K], scale [N] | None,
    bias [N] | None)``; builds a ``FusedFieldPlan`` (reuse one across solver steps instead)."""
    weights = [w for w, _, _ in layers]
    plan = FusedFieldPlan(weights, block=block, activation=activation)
    scales = [s for _, s, _ in layers]
    biases = [b for _, _, b in layers]
    return plan(z, eps, None if all(s is None for s in scales) else scales,
                None if all(b is None for b in biases) else biases, **kw)
