// Fused concatsquash field: see field.h for the math and the packed layout.
#include "cpu/field.h"
#include "cpu/bsr_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <utility>

#ifdef JSP_FAST_OPENMP
#include <omp.h>
#endif

namespace jsp_fast {
namespace cpu {
namespace field {

template <typename T>
void AlignedBuf<T>::resize(int64_t n) {
  if (n == size && ptr) return;
  const size_t bytes = ((size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  ptr.reset(static_cast<T*>(p));
  size = n;
}

namespace {

// ---- the micro-kernel ----------------------------------------------------------------------------
// acc[R][PV] = x[R rows, needed columns of panel] · W_panel, broadcast-FMA over each segment's k.
template <typename T, int PV>
inline void micro(const T* x, int64_t ldx, const Layer<T>& lay, int64_t p,
                  typename Simd<T>::vec (&acc)[Simd<T>::R][PV]) {
  using S = Simd<T>;
  using vec = typename S::vec;
  constexpr int R = S::R, L = S::L, P = PV * L;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < PV; ++j) acc[r][j] = vec{};
  const T* wbase = lay.w.data();
  for (int64_t s = lay.panel_seg[p]; s < lay.panel_seg[p + 1]; ++s)
    bsr::micro_accumulate<T, R, PV>(x + lay.seg_k0[s], ldx, 1, wbase + lay.seg_off[s], lay.seg_len[s], P, acc);
}

// One layer over a tile: `in` holds G = 1 + ntan groups of TB rows (values first), `out` the same.
// dbuf [TB, n_pad] keeps act'(pre) ⊙ scale of the value rows for the tangent rows.
template <typename T, int PV, Act A>
void run_layer(const Layer<T>& lay, const T* scale, const T* shift, const T* in, int64_t ld_in,
               T* out, T* dbuf, int64_t TB, int64_t G) {
  using S = Simd<T>;
  using vec = typename S::vec;
  constexpr int R = S::R, L = S::L, P = PV * L;
  const int64_t ld = lay.n_pad;
  const int64_t rows = G * TB;
  const int64_t npanels = lay.n_pad / P;
  const bool need_d = G > 1;
  for (int64_t p = 0; p < npanels; ++p) {
    const int64_t c0 = p * P;
    vec sc[PV], sh[PV];
    for (int j = 0; j < PV; ++j) {
      sc[j] = simd::load<T>(scale + c0 + j * L);
      sh[j] = simd::load<T>(shift + c0 + j * L);
    }
    for (int64_t g0 = 0; g0 < rows; g0 += R) {
      vec acc[R][PV];
      micro<T, PV>(in + g0 * ld_in, ld_in, lay, p, acc);
      if (g0 < TB) {
        for (int r = 0; r < R; ++r) {
          T* o = out + (g0 + r) * ld + c0;
          T* dd = dbuf + (g0 + r) * ld + c0;
          for (int j = 0; j < PV; ++j) {
            const vec pre = acc[r][j] * sc[j] + sh[j];
            vec d;
            simd::store<T>(o + j * L, simd::VecAct<T>::yd(A, pre, d));
            if (need_d) simd::store<T>(dd + j * L, d * sc[j]);
          }
        }
      } else {
        const int64_t rv = (g0 - TB) % TB;  // the value row these tangent rows belong to
        for (int r = 0; r < R; ++r) {
          T* o = out + (g0 + r) * ld + c0;
          const T* dd = dbuf + (rv + r) * ld + c0;
          for (int j = 0; j < PV; ++j) simd::store<T>(o + j * L, acc[r][j] * simd::load<T>(dd + j * L));
        }
      }
    }
  }
}

// A layer with few outputs (n < L): one dot product per output and row, vectorised over k.
template <typename T>
void run_narrow(const Layer<T>& lay, const T* scale, const T* shift, const T* in, int64_t ld_in,
                T* out, T* dbuf, int64_t TB, int64_t G) {
  using vec = typename Simd<T>::vec;
  constexpr int L = Simd<T>::L;
  const int64_t n = lay.n, k = lay.k, kv = k / L * L, ld = lay.n_pad, rows = G * TB;
  const T* w = lay.w.data();
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = in + row * ld_in;
    T* o = out + row * ld;
    for (int64_t j = 0; j < n; ++j) {
      const T* wj = w + j * k;
      vec acc0{}, acc1{};
      int64_t kk = 0;
      for (; kk + 2 * L <= kv; kk += 2 * L) {
        acc0 += simd::load<T>(x + kk) * simd::load<T>(wj + kk);
        acc1 += simd::load<T>(x + kk + L) * simd::load<T>(wj + kk + L);
      }
      for (; kk < kv; kk += L) acc0 += simd::load<T>(x + kk) * simd::load<T>(wj + kk);
      acc0 += acc1;
      T s = 0;
      for (int i = 0; i < L; ++i) s += acc0[i];
      for (; kk < k; ++kk) s += x[kk] * wj[kk];
      if (row < TB) {
        const T pre = s * scale[j] + shift[j];
        const T y = simd::act_scalar<T>(lay.act, pre);
        o[j] = y;
        if (G > 1) dbuf[row * ld + j] = simd::dact_scalar<T>(lay.act, pre, y) * scale[j];
      } else {
        o[j] = s * dbuf[((row - TB) % TB) * ld + j];
      }
    }
  }
}

// The activation and the panel width become template parameters (one switch per layer, not per
// vector), so the epilogue inlines to straight-line code the compiler can interleave.
template <typename T, int PV>
void run_act(const Layer<T>& lay, const T* scale, const T* shift, const T* in, int64_t ld_in, T* out,
             T* dbuf, int64_t TB, int64_t G) {
  switch (lay.act) {
    case Act::Tanh: return run_layer<T, PV, Act::Tanh>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
    case Act::Softplus: return run_layer<T, PV, Act::Softplus>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
    case Act::Elu: return run_layer<T, PV, Act::Elu>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
    case Act::Relu: return run_layer<T, PV, Act::Relu>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
    case Act::Sigmoid: return run_layer<T, PV, Act::Sigmoid>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
    default: return run_layer<T, PV, Act::None>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
  }
}

template <typename T>
void run_any(const Layer<T>& lay, const T* scale, const T* shift, const T* in, int64_t ld_in, T* out,
             T* dbuf, int64_t TB, int64_t G) {
  if (lay.narrow) return run_narrow<T>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
  if (lay.pv == 1) return run_act<T, 1>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
  return run_act<T, 2>(lay, scale, shift, in, ld_in, out, dbuf, TB, G);
}

// Columns of a panel of outputs [r0, r1) that keep some weight, as runs (k0, len).
std::vector<std::pair<int64_t, int64_t>> runs(const uint8_t* mask, int64_t n, int64_t k, int64_t r0,
                                              int64_t r1) {
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t c = 0;
  auto need = [&](int64_t col) {
    if (!mask) return true;
    for (int64_t r = r0; r < std::min(r1, n); ++r)
      if (mask[r * k + col]) return true;
    return false;
  };
  while (c < k) {
    while (c < k && !need(c)) ++c;
    if (c == k) break;
    const int64_t c0 = c;
    while (c < k && need(c)) ++c;
    out.emplace_back(c0, c - c0);
  }
  return out;
}

}  // namespace

template <typename T>
void FieldPlan<T>::add_layer(int64_t n, int64_t k, Act act, const T* w, const uint8_t* mask, const T* gate_w,
                             const T* gate_b, const T* shift_w, const T* bias) {
  constexpr int L = Simd<T>::L;
  if (n <= 0 || k <= 0) throw std::invalid_argument("layer sizes must be positive");
  if (!layers_.empty() && layers_.back().n != k)
    throw std::invalid_argument("layer input width does not match the previous layer's output width");
  Layer<T> lay;
  lay.n = n;
  lay.k = k;
  lay.act = act;
  lay.narrow = 2 * n <= L;
  if (lay.narrow) {
    lay.pv = 1;
    lay.n_pad = (n + L - 1) / L * L;
    lay.w.resize(n * k);
    std::memcpy(lay.w.data(), w, size_t(n * k) * sizeof(T));
    lay.kept_cols = k;  // per output (density() counts n·k)
    lay.panel_seg.assign(1, 0);
  } else {
    // Panel width: the one with the least padded work; one-vector panels read the activations
    // twice as often per FMA, so they must save more than ~15% to win.
    int64_t work[3] = {0, 0, 0};
    for (int pv = 1; pv <= 2; ++pv) {
      const int64_t P = pv * L;
      for (int64_t r0 = 0; r0 < n; r0 += P)
        for (auto& rl : runs(mask, n, k, r0, r0 + P)) work[pv] += rl.second * P;
    }
    lay.pv = (double(work[1]) * 1.15 < double(work[2])) ? 1 : 2;
    const int64_t P = lay.pv * L;
    lay.n_pad = (n + P - 1) / P * P;
    lay.panel_seg.assign(1, 0);
    int64_t off = 0;
    for (int64_t r0 = 0; r0 < lay.n_pad; r0 += P) {
      for (auto& rl : runs(mask, n, k, r0, r0 + P)) {
        lay.seg_k0.push_back(rl.first);
        lay.seg_len.push_back(rl.second);
        lay.seg_off.push_back(off);
        off += rl.second * P;
        lay.kept_cols += rl.second;
      }
      lay.panel_seg.push_back(int64_t(lay.seg_k0.size()));
    }
    lay.w.resize(off);
    const int64_t npanels = lay.n_pad / P;
    for (int64_t p = 0; p < npanels; ++p) {
      for (int64_t s = lay.panel_seg[p]; s < lay.panel_seg[p + 1]; ++s) {
        T* dst = lay.w.data() + lay.seg_off[s];
        for (int64_t kk = 0; kk < lay.seg_len[s]; ++kk)
          for (int64_t o = 0; o < P; ++o) {
            const int64_t row = p * P + o;
            dst[kk * P + o] = row < n ? w[row * k + lay.seg_k0[s] + kk] : T(0);
          }
      }
    }
  }
  auto pad = [&](AlignedBuf<T>& dst, const T* src) {
    dst.resize(lay.n_pad);
    for (int64_t i = 0; i < lay.n_pad; ++i) dst.data()[i] = (src && i < n) ? src[i] : T(0);
  };
  pad(lay.gate_w, gate_w);
  pad(lay.gate_b, gate_b);
  pad(lay.shift_w, shift_w);
  pad(lay.bias, bias);
  max_width_ = std::max({max_width_, lay.n_pad, k});
  layers_.push_back(std::move(lay));
}

template <typename T>
double FieldPlan<T>::density() const {
  double kept = 0, dense = 0;
  for (const auto& l : layers_) {
    kept += l.narrow ? double(l.n) * double(l.k) : double(l.kept_cols) * l.pv * Simd<T>::L;
    dense += double(l.n) * double(l.k);
  }
  return dense > 0 ? kept / dense : 0.0;
}

template <typename T>
std::vector<std::string> FieldPlan<T>::layer_kinds() const {
  std::vector<std::string> out;
  for (const auto& l : layers_)
    out.push_back(l.narrow ? std::string("narrow") : "panel" + std::to_string(l.pv * Simd<T>::L));
  return out;
}

template <typename T>
int64_t FieldPlan<T>::tile_rows(int64_t B, int64_t ntan, int num_threads) const {
  constexpr int R = Simd<T>::R;
  const int64_t G = 1 + ntan;
  // Two activation buffers of G·TB rows of the widest layer, each about 128 KiB (L2-resident).
  const int64_t budget = int64_t(128 * 1024) / (std::max<int64_t>(max_width_, 1) * int64_t(sizeof(T)));
  int64_t tb = std::max<int64_t>(R, budget / G / R * R);
  tb = std::min<int64_t>(tb, 256 / R * R);
  // Enough tiles to keep every thread busy (two per thread) when the batch allows.
  const int64_t per = (B + 2 * num_threads - 1) / (2 * int64_t(num_threads));
  tb = std::min(tb, std::max<int64_t>(R, (per + R - 1) / R * R));
  return tb;
}

template <typename T>
void FieldPlan<T>::eval(T t, const T* z, int64_t B, const T* v, int64_t ntan, T* f, T* jv,
                        int num_threads) const {
  struct Ctx {
    const T* z;
    T* f;
    T* jv;
    int64_t B, din, dout, ntan;
  } c{z, f, jv, B, dim_in(), dim_out(), ntan};
  Hooks h;
  h.ctx = &c;
  h.in = [](void* p, int64_t b0, int64_t nb, T* dst) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    std::memcpy(dst, c.z + b0 * c.din, size_t(nb * c.din) * sizeof(T));
  };
  h.out = [](void* p, int64_t b0, int64_t nb, const T* res, int64_t ld, int64_t TB) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    for (int64_t g = 0; g <= c.ntan; ++g) {
      T* dst = g == 0 ? c.f + b0 * c.dout : c.jv + (g - 1) * c.B * c.dout + b0 * c.dout;
      const T* src = res + g * TB * ld;
      for (int64_t r = 0; r < nb; ++r) std::memcpy(dst + r * c.dout, src + r * ld, size_t(c.dout) * sizeof(T));
    }
  };
  eval_hooked(t, B, v, ntan, h, num_threads);
}

template <typename T>
void FieldPlan<T>::eval_hooked(T t, int64_t B, const T* v, int64_t ntan, const Hooks& hooks,
                               int num_threads) const {
  if (layers_.empty()) throw std::runtime_error("empty field plan");
  if (B <= 0) return;
#ifdef JSP_FAST_OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#else
  num_threads = 1;
#endif
  const int64_t nl = int64_t(layers_.size());
  // Time gate: per-layer scale and shift at t (O(Σ widths), once per call).
  std::vector<AlignedBuf<T>> scale(nl), shift(nl);
  for (int64_t l = 0; l < nl; ++l) {
    const auto& lay = layers_[l];
    scale[l].resize(lay.n_pad);
    shift[l].resize(lay.n_pad);
    for (int64_t i = 0; i < lay.n_pad; ++i) {
      const T g = T(1) / (T(1) + std::exp(-(lay.gate_w.data()[i] * t + lay.gate_b.data()[i])));
      scale[l].data()[i] = g;
      shift[l].data()[i] = lay.bias.data()[i] * g + lay.shift_w.data()[i] * t;
    }
  }
  const int64_t d_in = layers_.front().k;
  const int64_t G = 1 + ntan;
  const int64_t TB = tile_rows(B, ntan, num_threads);
  const int64_t rows = G * TB;
  const int64_t ntiles = (B + TB - 1) / TB;
  const int nth = int(std::min<int64_t>(num_threads, ntiles));
  const int64_t bufsize = rows * max_width_;

#ifdef JSP_FAST_OPENMP
#pragma omp parallel num_threads(nth)
#endif
  {
    AlignedBuf<T> a, b, d;
    a.resize(bufsize);
    b.resize(bufsize);
    d.resize(TB * max_width_);
#ifdef JSP_FAST_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t b0 = tile * TB;
      const int64_t nb = std::min(TB, B - b0);
      // Stack the value rows and each tangent's rows; zero the rows past the batch.
      T* in = a.data();
      for (int64_t g = 0; g < G; ++g) {
        T* dst = in + g * TB * d_in;
        if (g == 0)
          hooks.in(hooks.ctx, b0, nb, dst);
        else
          std::memcpy(dst, v + (g - 1) * B * d_in + b0 * d_in, size_t(nb * d_in) * sizeof(T));
        if (nb < TB) std::memset(dst + nb * d_in, 0, size_t((TB - nb) * d_in) * sizeof(T));
      }
      int64_t ld_in = d_in;
      T* cur = a.data();
      T* nxt = b.data();
      for (int64_t l = 0; l < nl; ++l) {
        run_any<T>(layers_[l], scale[l].data(), shift[l].data(), cur, ld_in, nxt, d.data(), TB, G);
        ld_in = layers_[l].n_pad;
        std::swap(cur, nxt);
      }
      hooks.out(hooks.ctx, b0, nb, cur, ld_in, TB);
    }
  }
}

template class FieldPlan<float>;
template class FieldPlan<double>;

}  // namespace field
}  // namespace cpu
}  // namespace jsp_fast
