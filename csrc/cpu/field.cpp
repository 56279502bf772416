// Fused concatsquash field: see field.h for the math and the packed layout.
#include "cpu/field.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>

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

// ---- activations ---------------------------------------------------------------------------------
// act(pre) and act'(pre) on one vector. float: vectorised (rational tanh, polynomial exp); double and
// softplus: element by element with <cmath> (exactness over speed there).

template <typename T>
inline void act_scalar(Act a, T p, T& y, T& d) {
  switch (a) {
    case Act::Tanh: y = std::tanh(p); d = T(1) - y * y; break;
    case Act::Sigmoid: y = T(1) / (T(1) + std::exp(-p)); d = y * (T(1) - y); break;
    case Act::Softplus: {
      y = std::max(p, T(0)) + std::log1p(std::exp(-std::fabs(p)));
      d = T(1) / (T(1) + std::exp(-p));
      break;
    }
    case Act::Elu: y = p > 0 ? p : std::expm1(p); d = p > 0 ? T(1) : y + T(1); break;
    case Act::Relu: y = p > 0 ? p : T(0); d = p > 0 ? T(1) : T(0); break;
    default: y = p; d = T(1); break;
  }
}

using vf = Simd<float>::vec;
using vi = int __attribute__((vector_size(kVecBytes)));

inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// tanh: odd rational minimax approximation on [-7.9, 7.9] (the one Eigen uses for float), a few ulp.
inline vf vtanh(vf x) {
  const vf c = vf{} + 7.90531110763549805f;
  x = vmin(vmax(x, -c), c);
  const vf x2 = x * x;
  vf p = vf{} - 2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  vf q = vf{} + 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

// exp: Cephes range reduction x = n ln2 + r, degree-6 polynomial, 2^n through the exponent bits.
inline vf vexp(vf x) {
  x = vmin(vmax(x, vf{} - 87.3f), vf{} + 88.3f);
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);
  vf nf = __builtin_convertvector(n, vf);
  const vi adj = nf > fx ? vi{} + 1 : vi{};  // truncation -> floor
  n -= adj;
  nf = __builtin_convertvector(n, vf);
  x = x - nf * 0.693359375f;
  x = x + nf * 2.12194440e-4f;
  vf y = vf{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  vi e = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y * scale;
}

template <typename T>
struct VecAct {
  using vec = typename Simd<T>::vec;
  static inline void apply(Act a, vec pre, vec& y, vec& d) {
    for (int i = 0; i < Simd<T>::L; ++i) {
      T yy, dd;
      act_scalar<T>(a, pre[i], yy, dd);
      y[i] = yy;
      d[i] = dd;
    }
  }
};

template <>
struct VecAct<float> {
  static inline void apply(Act a, vf pre, vf& y, vf& d) {
    switch (a) {
      case Act::None: y = pre; d = vf{} + 1.0f; return;
      case Act::Tanh: y = vtanh(pre); d = 1.0f - y * y; return;
      case Act::Sigmoid: y = 0.5f * vtanh(0.5f * pre) + 0.5f; d = y * (1.0f - y); return;
      case Act::Relu: y = pre > 0.0f ? pre : vf{}; d = pre > 0.0f ? vf{} + 1.0f : vf{}; return;
      case Act::Elu: {
        const vf em1 = vexp(vmin(pre, vf{})) - 1.0f;
        y = pre > 0.0f ? pre : em1;
        d = pre > 0.0f ? vf{} + 1.0f : em1 + 1.0f;
        return;
      }
      default: {
        for (int i = 0; i < Simd<float>::L; ++i) {
          float yy, dd;
          act_scalar<float>(a, pre[i], yy, dd);
          y[i] = yy;
          d[i] = dd;
        }
      }
    }
  }
};

// ---- the micro-kernel ----------------------------------------------------------------------------
// acc[R][PV] = x[R rows, needed columns of panel] · W_panel, broadcast-FMA over each segment's k.
template <typename T>
inline void micro(const T* x, int64_t ldx, const Layer<T>& lay, int64_t p,
                  typename Simd<T>::vec (&acc)[Simd<T>::R][Simd<T>::PV]) {
  using S = Simd<T>;
  using vec = typename S::vec;
  constexpr int R = S::R, PV = S::PV, L = S::L, P = S::P;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < PV; ++j) acc[r][j] = vec{};
  const T* wbase = lay.w.data();
  for (int64_t s = lay.panel_seg[p]; s < lay.panel_seg[p + 1]; ++s) {
    const T* xs = x + lay.seg_k0[s];
    const T* ws = wbase + lay.seg_off[s];
    const int64_t len = lay.seg_len[s];
    for (int64_t kk = 0; kk < len; ++kk) {
      vec w[PV];
#pragma GCC unroll 4
      for (int j = 0; j < PV; ++j) w[j] = *reinterpret_cast<const vec*>(ws + kk * P + j * L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const T xv = xs[r * ldx + kk];
#pragma GCC unroll 4
        for (int j = 0; j < PV; ++j) acc[r][j] += xv * w[j];
      }
    }
  }
}

// One layer over a tile: `in` holds G = 1 + ntan groups of TB rows (values first), `out` the same.
// dbuf [TB, n_pad] keeps act'(pre) ⊙ scale of the value rows for the tangent rows.
template <typename T>
void run_layer(const Layer<T>& lay, const T* scale, const T* shift, const T* in, int64_t ld_in,
               T* out, T* dbuf, int64_t TB, int64_t G) {
  using S = Simd<T>;
  using vec = typename S::vec;
  constexpr int R = S::R, PV = S::PV, L = S::L, P = S::P;
  const int64_t ld = lay.n_pad;
  const int64_t rows = G * TB;
  const int64_t npanels = lay.n_pad / P;
  const bool need_d = G > 1;
  for (int64_t p = 0; p < npanels; ++p) {
    const int64_t c0 = p * P;
    vec sc[PV], sh[PV];
    for (int j = 0; j < PV; ++j) {
      sc[j] = *reinterpret_cast<const vec*>(scale + c0 + j * L);
      sh[j] = *reinterpret_cast<const vec*>(shift + c0 + j * L);
    }
    for (int64_t g0 = 0; g0 < rows; g0 += R) {
      vec acc[R][PV];
      micro<T>(in + g0 * ld_in, ld_in, lay, p, acc);
      if (g0 < TB) {
        for (int r = 0; r < R; ++r) {
          T* o = out + (g0 + r) * ld + c0;
          T* dd = dbuf + (g0 + r) * ld + c0;
          for (int j = 0; j < PV; ++j) {
            const vec pre = acc[r][j] * sc[j] + sh[j];
            vec y, d;
            VecAct<T>::apply(lay.act, pre, y, d);
            *reinterpret_cast<vec*>(o + j * L) = y;
            if (need_d) *reinterpret_cast<vec*>(dd + j * L) = d * sc[j];
          }
        }
      } else {
        const int64_t rv = (g0 - TB) % TB;  // the value row these tangent rows belong to
        for (int r = 0; r < R; ++r) {
          T* o = out + (g0 + r) * ld + c0;
          const T* dd = dbuf + (rv + r) * ld + c0;
          for (int j = 0; j < PV; ++j)
            *reinterpret_cast<vec*>(o + j * L) = acc[r][j] * *reinterpret_cast<const vec*>(dd + j * L);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void FieldPlan<T>::add_layer(int64_t n, int64_t k, Act act, const T* w, const uint8_t* needed,
                             const T* gate_w, const T* gate_b, const T* shift_w, const T* bias) {
  constexpr int P = Simd<T>::P;
  if (n <= 0 || k <= 0) throw std::invalid_argument("layer sizes must be positive");
  if (!layers_.empty() && layers_.back().n != k)
    throw std::invalid_argument("layer input width does not match the previous layer's output width");
  Layer<T> lay;
  lay.n = n;
  lay.k = k;
  lay.act = act;
  lay.n_pad = (n + P - 1) / P * P;
  const int64_t npanels = lay.n_pad / P;
  lay.panel_seg.assign(1, 0);
  int64_t off = 0;
  for (int64_t p = 0; p < npanels; ++p) {
    const uint8_t* need = needed + p * k;
    int64_t c = 0;
    while (c < k) {
      while (c < k && !need[c]) ++c;
      if (c == k) break;
      const int64_t c0 = c;
      while (c < k && need[c]) ++c;
      lay.seg_k0.push_back(c0);
      lay.seg_len.push_back(c - c0);
      lay.seg_off.push_back(off);
      off += (c - c0) * P;
      lay.kept_cols += c - c0;
    }
    lay.panel_seg.push_back(int64_t(lay.seg_k0.size()));
  }
  lay.w.resize(off);
  for (int64_t p = 0; p < npanels; ++p) {
    for (int64_t s = lay.panel_seg[p]; s < lay.panel_seg[p + 1]; ++s) {
      T* dst = lay.w.data() + lay.seg_off[s];
      for (int64_t kk = 0; kk < lay.seg_len[s]; ++kk)
        for (int o = 0; o < P; ++o) {
          const int64_t row = p * P + o;
          dst[kk * P + o] = row < n ? w[row * k + lay.seg_k0[s] + kk] : T(0);
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
    kept += double(l.kept_cols) * Simd<T>::P;
    dense += double(l.n) * double(l.k);
  }
  return dense > 0 ? kept / dense : 0.0;
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
  const int64_t d_in = layers_.front().k, d_out = layers_.back().n;
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
        const T* src = g == 0 ? z + b0 * d_in : v + (g - 1) * B * d_in + b0 * d_in;
        T* dst = in + g * TB * d_in;
        std::memcpy(dst, src, size_t(nb * d_in) * sizeof(T));
        if (nb < TB) std::memset(dst + nb * d_in, 0, size_t((TB - nb) * d_in) * sizeof(T));
      }
      int64_t ld_in = d_in;
      T* cur = a.data();
      T* nxt = b.data();
      for (int64_t l = 0; l < nl; ++l) {
        run_layer<T>(layers_[l], scale[l].data(), shift[l].data(), cur, ld_in, nxt, d.data(), TB, G);
        ld_in = layers_[l].n_pad;
        std::swap(cur, nxt);
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst = g == 0 ? f + b0 * d_out : jv + (g - 1) * B * d_out + b0 * d_out;
        const T* src = cur + g * TB * ld_in;
        for (int64_t r = 0; r < nb; ++r)
          std::memcpy(dst + r * d_out, src + r * ld_in, size_t(d_out) * sizeof(T));
      }
    }
  }
}

template class FieldPlan<float>;
template class FieldPlan<double>;

}  // namespace field
}  // namespace cpu
}  // namespace jsp_fast
