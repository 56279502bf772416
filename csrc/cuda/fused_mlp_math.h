// The fused MLP's per-element math and the CTA program, written once as __host__ __device__ code.
//
// The kernel (fused_mlp.cu) runs cta_program() with one thread per `tid` and __syncthreads() between
// phases; the host check driver (host_check.cpp, used by tests/test_cuda_fused.py) runs the very same
// cta_program() with a sequential executor that calls each phase for every tid in turn — a valid
// schedule because threads never race inside a phase. So activations, derivatives, the scale/shift
// epilogue, the BSR traversal (vectorised and generic), the tile plan, tangent chunking and ragged
// batch tiles are all checked on a machine without a GPU; only the CUDA-specific parts (launch,
// shared memory, __ldg, real concurrency) need a device.
//
// CTA layout (shared memory, floats): buf[2][(1 + nt) * tb][stride], scale[width], shift[width].
// Rows [0, tb) hold the tile's values, rows [tb * (1 + i), tb * (2 + i)) tangent i of the CTA's chunk.
// Per layer: scale/shift -> sync -> value rows (acc, act) -> sync -> tangent rows (acc, act'(y) read
// back from the value rows just written) -> sync -> swap buffers.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_mlp.h"

#if defined(__CUDACC__)
#define JSP_HD __host__ __device__ __forceinline__
#else
#define JSP_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define JSP_UNROLL _Pragma("unroll")
#else
#define JSP_UNROLL
#endif

namespace jsp_fast {
namespace cuda {
namespace fused {

// ---- activations ---------------------------------------------------------------------------------
// act(p) and act'(p) written as a function of y = act(p) (exact for all six: tanh 1 - y², sigmoid
// y(1 - y), softplus sigmoid(p) = 1 - e^{-y}, elu y + 1 for p <= 0, relu [y > 0]); so tangent rows
// need only the value rows' outputs. Softplus follows torch (beta 1, threshold 20).
JSP_HD float act_fwd(int a, float p) {
  switch (a) {
    case int(Act::Tanh): return tanhf(p);
    case int(Act::Softplus): return p > 20.f ? p : log1pf(expf(p));
    case int(Act::Elu): return p > 0.f ? p : expm1f(p);
    case int(Act::Relu): return p > 0.f ? p : 0.f;
    case int(Act::Sigmoid): return 1.f / (1.f + expf(-p));
    default: return p;
  }
}

JSP_HD float act_grad_from_out(int a, float y) {
  switch (a) {
    case int(Act::Tanh): return 1.f - y * y;
    case int(Act::Softplus): return -expm1f(-y);
    case int(Act::Elu): return y > 0.f ? 1.f : y + 1.f;
    case int(Act::Relu): return y > 0.f ? 1.f : 0.f;
    case int(Act::Sigmoid): return y * (1.f - y);
    default: return 1.f;
  }
}

// A: the kernel's activation code (compile time). Layers with act == none skip it; kActDynamic
// switches on the layer's code at run time.
template <int A>
JSP_HD float apply_act(int layer_act, float p) {
  if constexpr (A == kActDynamic) return act_fwd(layer_act, p);
  else if constexpr (A == int(Act::None)) return p;
  else return layer_act == 0 ? p : act_fwd(A, p);
}

template <int A>
JSP_HD float apply_grad(int layer_act, float y) {
  if constexpr (A == kActDynamic) return act_grad_from_out(layer_act, y);
  else if constexpr (A == int(Act::None)) return 1.f;
  else return layer_act == 0 ? 1.f : act_grad_from_out(A, y);
}

// ---- per-output scale and shift --------------------------------------------------------------------
JSP_HD void layer_scale_shift(const LayerParams& L, int n, float t, float& scale, float& shift) {
  if (L.gate_w) {
    const float g = 1.f / (1.f + expf(-(L.gate_w[n] * t + (L.gate_b ? L.gate_b[n] : 0.f))));
    scale = g;
    shift = (L.bias ? L.bias[n] * g : 0.f) + (L.shift_w ? L.shift_w[n] * t : 0.f);
  } else {
    scale = L.scale ? L.scale[n] : 1.f;
    shift = L.bias ? L.bias[n] : 0.f;
  }
}

// ---- loads ---------------------------------------------------------------------------------------
struct V4 {
  float x, y, z, w;
};

JSP_HD V4 load4_global(const float* p) {  // read-only weights: through the non-coherent cache
#if defined(__CUDA_ARCH__)
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  return {v.x, v.y, v.z, v.w};
#else
  return {p[0], p[1], p[2], p[3]};
#endif
}

JSP_HD V4 load4_shared(const float* p) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(p);
  return {v.x, v.y, v.z, v.w};
#else
  return {p[0], p[1], p[2], p[3]};
#endif
}

JSP_HD void store4_shared(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
#else
  p[0] = a, p[1] = b, p[2] = c, p[3] = d;
#endif
}

JSP_HD float load_global(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

JSP_HD int load_global(const int* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// ---- block traversal -----------------------------------------------------------------------------
// The kept blocks [j0, j1) of block row br, clamped to [0, nnzb].
JSP_HD void block_range(const LayerParams& L, int br, int& j0, int& j1) {
  j0 = load_global(L.row_ptr + br);
  j1 = load_global(L.row_ptr + br + 1);
  j0 = j0 < 0 ? 0 : (j0 > L.nnzb ? L.nnzb : j0);
  j1 = j1 < j0 ? j0 : (j1 > L.nnzb ? L.nnzb : j1);
}

// acc[i][c] += Σ_k in[r0 + i][k] W[n0 + c][k] over the kept blocks of n0's block row. Vectorised path:
// RC outputs in one block row (bm % RC == 0), k in steps of 4 (bk % 4 == 0), values 16-byte aligned.
template <int RR, int RC>
JSP_HD void tile_vec(const LayerParams& L, const float* in, int stride, int r0, int n0, float (&acc)[RR][RC]) {
  const int bm = L.bm, bk = L.bk, kb = L.k / L.bk;
  const int br = n0 / bm, nl = n0 - br * bm;
  int j0, j1;
  block_range(L, br, j0, j1);
  const float* arow = in + r0 * stride;
  for (int j = j0; j < j1; ++j) {
    const int cb = load_global(L.col_idx + j);
    if (unsigned(cb) >= unsigned(kb)) continue;
    const float* w = L.values + (int64_t(j) * bm + nl) * bk;
    const float* a = arow + cb * bk;
    for (int kk = 0; kk < bk; kk += 4) {
      V4 wv[RC];
      JSP_UNROLL
      for (int c = 0; c < RC; ++c) wv[c] = load4_global(w + c * bk + kk);
      JSP_UNROLL
      for (int i = 0; i < RR; ++i) {
        const V4 av = load4_shared(a + i * stride + kk);
        JSP_UNROLL
        for (int c = 0; c < RC; ++c) {
          float s = acc[i][c];
          s = fmaf(av.x, wv[c].x, s);
          s = fmaf(av.y, wv[c].y, s);
          s = fmaf(av.z, wv[c].z, s);
          s = fmaf(av.w, wv[c].w, s);
          acc[i][c] = s;
        }
      }
    }
  }
}

// Generic path: any bm, bk; RR rows x one output n.
template <int RR>
JSP_HD void tile_scalar(const LayerParams& L, const float* in, int stride, int r0, int n, float (&acc)[RR]) {
  const int bm = L.bm, bk = L.bk, kb = L.k / L.bk;
  const int br = n / bm, nl = n - br * bm;
  int j0, j1;
  block_range(L, br, j0, j1);
  const float* arow = in + r0 * stride;
  for (int j = j0; j < j1; ++j) {
    const int cb = load_global(L.col_idx + j);
    if (unsigned(cb) >= unsigned(kb)) continue;
    const float* w = L.values + (int64_t(j) * bm + nl) * bk;
    const float* a = arow + cb * bk;
    for (int kk = 0; kk < bk; ++kk) {
      const float wk = load_global(w + kk);
      JSP_UNROLL
      for (int i = 0; i < RR; ++i) acc[i] = fmaf(a[i * stride + kk], wk, acc[i]);
    }
  }
}

// ---- the CTA -------------------------------------------------------------------------------------
struct Cta {
  float* in;     // this layer's input rows
  float* out;    // this layer's output rows
  float* scale;  // [width]
  float* shift;  // [width]
  int stride;    // floats per row
  int tb;        // batch rows per tile
  int nt;        // tangents in this CTA's chunk (<= plan.tc)
  int t0;        // first tangent of the chunk
  int rows;      // (1 + nt) * tb
  int64_t b0;    // first batch row of the tile
  bool write_value;  // chunk 0 writes y
};

JSP_HD Cta make_cta(const FusedMlpParams& p, const TilePlan& pl, int64_t bx, int by, float* smem) {
  Cta c;
  c.stride = pl.stride;
  c.tb = pl.tb;
  c.t0 = by * pl.tc;
  const int left = p.ntan - c.t0;
  c.nt = left < pl.tc ? left : pl.tc;
  if (c.nt < 0) c.nt = 0;
  c.rows = (1 + c.nt) * c.tb;
  c.b0 = bx * pl.tb;
  c.write_value = by == 0;
  const int64_t buf = int64_t(1 + pl.tc) * pl.tb * pl.stride;
  c.in = smem;
  c.out = smem + buf;
  c.scale = smem + 2 * buf;
  c.shift = c.scale + pl.width;
  return c;
}

JSP_HD void swap_buffers(Cta& c) {
  float* t = c.in;
  c.in = c.out;
  c.out = t;
}

// Load x and the chunk's tangents into `in` (zeros past the batch).
JSP_HD void phase_load(const FusedMlpParams& p, const Cta& c, int tid, int nth) {
  const int k0 = p.layers[0].k;
  const int total = c.rows * k0;
  for (int e = tid; e < total; e += nth) {
    const int r = e / k0, col = e - r * k0;
    const int kind = r / c.tb;
    const int64_t b = c.b0 + (r - kind * c.tb);
    float v = 0.f;
    if (b < p.batch)
      v = kind == 0 ? p.x[b * k0 + col] : p.x_dot[(int64_t(c.t0 + kind - 1) * p.batch + b) * k0 + col];
    c.in[r * c.stride + col] = v;
  }
}

JSP_HD void phase_scale_shift(const FusedMlpParams& p, const Cta& c, int l, int tid, int nth) {
  const LayerParams& L = p.layers[l];
  const float t = p.t_dev ? load_global(p.t_dev) : p.t;
  for (int n = tid; n < L.n; n += nth) layer_scale_shift(L, n, t, c.scale[n], c.shift[n]);
}

// One pass of layer l over the value rows (tangent == false) or the tangent rows. Work items are
// (row group of RR rows) x (column group), row groups fastest so a warp shares weight columns.
template <int A, int RR, int RC>
JSP_HD void phase_layer(const FusedMlpParams& p, const Cta& c, int l, bool tangent, int tid, int nth) {
  const LayerParams& L = p.layers[l];
  const int row_begin = tangent ? c.tb : 0;
  const int nrg = (tangent ? c.nt * c.tb : c.tb) / RR;
  const int S = c.stride;
  if (L.vec) {
    const int items = nrg * (L.n / RC);
    for (int it = tid; it < items; it += nth) {
      const int cg = it / nrg, rg = it - cg * nrg;
      const int r0 = row_begin + rg * RR, n0 = cg * RC;
      float acc[RR][RC];
      JSP_UNROLL
      for (int i = 0; i < RR; ++i) {
        JSP_UNROLL
        for (int j = 0; j < RC; ++j) acc[i][j] = 0.f;
      }
      tile_vec<RR, RC>(L, c.in, S, r0, n0, acc);
      float sc[RC], sh[RC];
      JSP_UNROLL
      for (int j = 0; j < RC; ++j) sc[j] = c.scale[n0 + j], sh[j] = c.shift[n0 + j];
      JSP_UNROLL
      for (int i = 0; i < RR; ++i) {
        float o[RC];
        if (!tangent) {
          JSP_UNROLL
          for (int j = 0; j < RC; ++j) o[j] = apply_act<A>(L.act, fmaf(sc[j], acc[i][j], sh[j]));
        } else {
          const float* yv = c.out + ((r0 + i) % c.tb) * S + n0;  // the value row of this batch row
          JSP_UNROLL
          for (int j = 0; j < RC; ++j) o[j] = apply_grad<A>(L.act, yv[j]) * sc[j] * acc[i][j];
        }
        float* dst = c.out + (r0 + i) * S + n0;
        if constexpr (RC == 4) {
          store4_shared(dst, o[0], o[1], o[2], o[3]);
        } else {
          JSP_UNROLL
          for (int j = 0; j < RC; ++j) dst[j] = o[j];
        }
      }
    }
  } else {
    const int items = nrg * L.n;
    for (int it = tid; it < items; it += nth) {
      const int n = it / nrg, rg = it - n * nrg;
      const int r0 = row_begin + rg * RR;
      float acc[RR];
      JSP_UNROLL
      for (int i = 0; i < RR; ++i) acc[i] = 0.f;
      tile_scalar<RR>(L, c.in, S, r0, n, acc);
      const float sc = c.scale[n], sh = c.shift[n];
      JSP_UNROLL
      for (int i = 0; i < RR; ++i) {
        float o;
        if (!tangent) o = apply_act<A>(L.act, fmaf(sc, acc[i], sh));
        else o = apply_grad<A>(L.act, c.out[((r0 + i) % c.tb) * S + n]) * sc * acc[i];
        c.out[(r0 + i) * S + n] = o;
      }
    }
  }
}

// Write the last layer's rows (in `in` after the final swap) to y and y_dot.
JSP_HD void phase_store(const FusedMlpParams& p, const Cta& c, int tid, int nth) {
  const int nl = p.layers[p.num_layers - 1].n;
  const int total = c.rows * nl;
  for (int e = tid; e < total; e += nth) {
    const int r = e / nl, col = e - r * nl;
    const int kind = r / c.tb;
    const int64_t b = c.b0 + (r - kind * c.tb);
    if (b >= p.batch) continue;
    const float v = c.in[r * c.stride + col];
    if (kind == 0) {
      if (c.write_value) p.y[b * nl + col] = v;
    } else {
      p.y_dot[(int64_t(c.t0 + kind - 1) * p.batch + b) * nl + col] = v;
    }
  }
}

// The whole CTA: Exec runs a phase for every thread (exec(f) calls f(tid, nth)) and exec.sync() is
// the barrier. Device: one thread each + __syncthreads(); host: a loop over tid + nothing.
template <int A, class Exec>
JSP_HD void cta_program(const FusedMlpParams& p, Cta& c, Exec& exec) {
  exec([&](int tid, int nth) { phase_load(p, c, tid, nth); });
  for (int l = 0; l < p.num_layers; ++l) {
    exec([&](int tid, int nth) { phase_scale_shift(p, c, l, tid, nth); });
    exec.sync();  // input rows (layer 0) and scale/shift visible
    exec([&](int tid, int nth) { phase_layer<A, kTileRows, kTileCols>(p, c, l, false, tid, nth); });
    exec.sync();  // value rows written: the tangent pass reads act'(y) from them
    if (c.nt > 0) {
      exec([&](int tid, int nth) { phase_layer<A, kTileRows, kTileCols>(p, c, l, true, tid, nth); });
      exec.sync();
    }
    swap_buffers(c);
  }
  exec([&](int tid, int nth) { phase_store(p, c, tid, nth); });
}

}  // namespace fused
}  // namespace cuda
}  // namespace jsp_fast
