// Block-sparse (BSR) CPU kernels: the four primitives of docs/architecture.md, torch-free.
//
// A weight W [n, k] keeps nnzb blocks of bm x bk. `values` is [nnzb][bm][bk] row-major, blocks in
// block-row-major (CSR) order; the forward table is (row_ptr, col_idx), the transposed one
// (col_ptr, row_idx, perm) lists the blocks of each block column (perm: index into values).
//
//   fwd:         y  = act(scale ⊙ (x Wᵀ) + bias)                         x [B, k] -> y [B, n]
//   jvp:         y as fwd, y_dot[t] = act'(pre) ⊙ scale ⊙ (x_dot[t] Wᵀ)   x_dot [T, B, k]
//   t_matmul:    gx = g W                                                g [B, n] -> gx [B, k]
//   weight_grad: gv[j] = g[:, rows of j]ᵀ x[:, cols of j]                -> gv [nnzb][bm][bk]
//
// and the elementwise work of their backward in one pass (bwd_epilogue, below): the gradients w.r.t.
// the pre-activation and the tangent products, their scaled copies and the bias gradient.
//
// Scheme (all four share one micro-kernel): the reduction operand is packed per batch tile into
// panels of R rows stored k-major ([k][R]), so the micro-kernel's R broadcasts per step read one
// cache line; the weight blocks are re-packed per call (O(weights), negligible next to the
// O(B·weights) product) with the output index contiguous and padded to the vector width. The
// micro-kernel keeps R rows x NV vectors of accumulators in registers and runs broadcast-FMA over
// the kept blocks of one block row; the epilogue (scale, bias, activation, derivative) is applied
// to those registers before they are stored. OpenMP splits the batch tiles (and, for small
// batches, the block rows).
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace jsp_fast {
namespace cpu {
namespace bsr {

// Rows of the register tile: enough accumulators to hide FMA latency without spilling
// (AVX-512: 32 registers -> 12 x 2; AVX2: 16 registers -> 6 x 2, perf.md's calibrated shape).
constexpr int kRows = simd::kVecBytes == 64 ? 12 : (simd::kVecBytes == 32 ? 6 : 4);
constexpr int kMaxNV = 2;  // vectors of outputs per micro-tile

struct Layout {
  int64_t n = 0, k = 0, bm = 0, bk = 0, nnzb = 0;
  const int64_t* row_ptr = nullptr;    // [n/bm + 1]
  const int64_t* col_idx = nullptr;    // [nnzb]
  const int64_t* block_row = nullptr;  // [nnzb]
  const int64_t* col_ptr = nullptr;    // [k/bk + 1]
  const int64_t* row_idx = nullptr;    // [nnzb], block row of the i-th block in column order
  const int64_t* perm = nullptr;       // [nnzb], its index into values
  int64_t n_brows() const { return n / bm; }
  int64_t n_bcols() const { return k / bk; }
};

// acc[r][v] (+)= Σ_kk x[r·rs + kk·ks] · w[kk·ldw + v·L] over len steps: R rows of the reduction
// operand times NV vectors of one packed block. The building block of every kernel here. Packed
// operand (pack_rows' panels, [len][R]): rs = 1, ks = R, so the R broadcasts of a step read one line;
// read in place: rs = the row stride, ks = 1. Callers pass the constant strides as literals: inlined,
// every caller compiles to the same instructions as with the former separate packed / in-place copies
// (checked by disassembly, function by function).
template <typename T, int R, int NV>
inline void micro_accumulate(const T* __restrict x, int64_t rs, int64_t ks, const T* __restrict w, int64_t len,
                             int64_t ldw, typename simd::Vec<T>::type (&acc)[R][NV]) {
  using V = typename simd::Vec<T>::type;
  constexpr int L = simd::Vec<T>::L;
  for (int64_t kk = 0; kk < len; ++kk) {
    V wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = simd::load<T>(w + kk * ldw + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T xv = x[r * rs + kk * ks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += xv * wv[v];
    }
  }
}

// Packs rows [r0, r0 + nrows) of a row-major [*, ld] matrix into ceil(nrows / R) panels of [ld][R]
// (rows past nrows are zero), so micro_accumulate reads R rows with one contiguous load per step.
template <typename T>
void pack_rows(const T* src, int64_t ld, int64_t nrows, T* dst);

// ---- the four primitives ------------------------------------------------------------------------
// num_threads <= 0: OpenMP's default. All pointers are dense row-major, no aliasing between inputs
// and outputs. scale and bias may be null.
template <typename T>
void fwd(const Layout& lay, const T* values, const T* x, int64_t B, const T* scale, const T* bias,
         Act act, T* y, int num_threads);

// ud (may be null): also writes the tangents before the epilogue, ud[t] = x_dot[t] Wᵀ ([ntan, B, n]),
// which the backward of a tanh/softplus/elu/sigmoid layer needs (saved here instead of recomputed).
template <typename T>
void jvp(const Layout& lay, const T* values, const T* x, const T* x_dot, int64_t ntan, int64_t B,
         const T* scale, const T* bias, Act act, T* y, T* y_dot, int num_threads, T* ud = nullptr);

template <typename T>
void t_matmul(const Layout& lay, const T* values, const T* g, int64_t B, T* gx, int num_threads);

// g [B, n]; the rows of the input are x's first B1 rows then x2's B - B1 rows (x2 null: B1 = B), so a
// backward over [x; x_dot] stacked needs no copy of the two.
template <typename T>
void weight_grad(const Layout& lay, const T* g, const T* x, int64_t B, T* gv, int num_threads,
                 const T* x2 = nullptr, int64_t B1 = -1);

// The backward of fwd / jvp between the output gradients and the two products (t_matmul,
// weight_grad), in one pass over [B, n] (vectorised over n, OpenMP over the batch). With y = act(pre),
// d = act'(pre) and dd = d act'/dy, both read off y:
//   gdu[t] = gyd[t] ⊙ d                                           t < ntan   (jvp only)
//   gpre   = (gy + dd ⊙ scale ⊙ Σ_t gyd[t] ⊙ ud[t]) ⊙ d           ud[t] = x_dot[t] Wᵀ (jvp only)
//   G      = [gpre; gdu[0]; ...; gdu[ntan-1]]                      [(1 + ntan)·B, n]
//   GU     = G ⊙ scale (broadcast over rows; null: not written)   the input of t_matmul
//   gbias  = Σ_b gpre                                              [n] (null: not computed)
// gy and gyd may be null (zero). ud is read only when ntan > 0 and dd is not zero for act (tanh,
// softplus, elu, sigmoid): the caller must pass it then. The bias sum is reduced in a fixed order for a
// given thread count (deterministic).
template <typename T>
void bwd_epilogue(int64_t B, int64_t n, int64_t ntan, const T* gy, const T* gyd, const T* y, const T* ud,
                  const T* scale, Act act, T* G, T* GU, T* gbias, int num_threads);

// True when the second derivative d act'/dy is not identically zero (bwd_epilogue then needs ud).
inline bool act_has_second(Act a) { return a == Act::Tanh || a == Act::Softplus || a == Act::Elu || a == Act::Sigmoid; }

}  // namespace bsr
}  // namespace cpu
}  // namespace jsp_fast
