// Portable SIMD vectors (GCC/Clang vector extensions) and vectorised activations for the CPU kernels.
//
// One source serves AVX-512, AVX2 and plain SSE builds: the vector width follows the compiler flags
// (-march=native), and every kernel is written over Vec<T> so the same code is correct at any width.
// Header-only so other kernels (e.g. a fused field) can include it; everything lives in
// jsp_fast::cpu::simd to stay clear of other translation units' helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// Relative, so this directory compiles with any include path.
#include "../common/act.h"

namespace jsp_fast {
namespace cpu {
namespace simd {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// Activations are jsp_fast::Act (csrc/common/act.h, the project's one list of codes); their
// vectorised math is below.

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes), aligned(alignof(T))));
  static constexpr int L = kVecBytes / int(sizeof(T));
};
using vf = Vec<float>::type;
using vd = Vec<double>::type;
typedef int32_t vi32 __attribute__((vector_size(kVecBytes)));

// The vector types above carry the element alignment only, so loads/stores through them may be
// unaligned (the packed buffers are aligned, the user's tensors need not be).
template <typename T>
inline typename Vec<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}
// Non-temporal store of a whole vector when p is vector-aligned (plain store otherwise): large outputs
// written once skip the read-for-ownership of each line. Call fence() before other threads read them.
template <typename T>
inline void stream(T* p, typename Vec<T>::type v) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(p) & uintptr_t(kVecBytes - 1)) == 0) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
    else _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
#elif defined(__AVX__)
    if constexpr (sizeof(T) == 4) _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
    else _mm256_stream_pd(reinterpret_cast<double*>(p), (__m256d)v);
#else
    if constexpr (sizeof(T) == 4) _mm_stream_ps(reinterpret_cast<float*>(p), (__m128)v);
    else _mm_stream_pd(reinterpret_cast<double*>(p), (__m128d)v);
#endif
    return;
  }
#endif
  store<T>(p, v);
}
inline void fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Stores the first n lanes of v (n <= L). AVX-512: one masked store; elsewhere a copy of n lanes.
template <typename T>
inline void store_first(T* p, typename Vec<T>::type v, int n) {
  if (n >= Vec<T>::L) return store<T>(p, v);
#if defined(__AVX512F__)
  const __mmask16 m = __mmask16((1u << n) - 1u);
  if constexpr (sizeof(T) == 4) _mm512_mask_storeu_ps(p, m, (__m512)v);
  else _mm512_mask_storeu_pd(p, __mmask8(m), (__m512d)v);
#else
  std::memcpy(p, &v, size_t(n) * sizeof(T));
#endif
}

// In-register transpose of an L x L tile held as L row vectors: afterwards v[j][i] is the old v[i][j].
// log2(L) rounds of the perfect shuffle (row j interleaved with row j + L/2); each round moves one bit
// of the row index into the lane index, so after log2(L) rounds rows and lanes have swapped.
// lane i of interleave(a, b): a[i/2] or b[i/2] (lo), a[L/2 + i/2] or b[L/2 + i/2] (hi), alternating;
// __builtin_shuffle is GCC's spelling of the two-input shuffle (GCC has __builtin_shufflevector only
// from 12 on), __builtin_shufflevector clang's.
template <bool Hi, typename V, size_t... I>
inline V interleave(V a, V b, std::index_sequence<I...>) {
  constexpr int L = int(sizeof...(I));
  constexpr int h = Hi ? L / 2 : 0;
#if defined(__clang__)
  return __builtin_shufflevector(a, b, ((I % 2) ? L + h + int(I / 2) : h + int(I / 2))...);
#else
  using E = std::remove_cv_t<std::remove_reference_t<decltype(a[0])>>;
  using I_t = std::conditional_t<sizeof(E) == 4, int32_t, int64_t>;
  typedef I_t M __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(a, b, M{((I % 2) ? L + h + I_t(I / 2) : h + I_t(I / 2))...});
#endif
}
template <typename T>
inline void transpose(typename Vec<T>::type (&v)[Vec<T>::L]) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  constexpr auto idx = std::make_index_sequence<L>{};
  for (int round = 1; round < L; round *= 2) {
    V t[L];
#pragma GCC unroll 16
    for (int j = 0; j < L / 2; ++j) {
      t[2 * j] = interleave<false>(v[j], v[j + L / 2], idx);
      t[2 * j + 1] = interleave<true>(v[j], v[j + L / 2], idx);
    }
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) v[j] = t[j];
  }
}

template <typename T>
inline typename Vec<T>::type splat(T x) {
  return typename Vec<T>::type{} + x;
}

// ---- scalar reference (float64 everywhere; float lanes that need exact libm) -----------------------
template <typename T>
inline T act_scalar(Act a, T p) {
  switch (a) {
    case Act::Tanh: return std::tanh(p);
    case Act::Sigmoid: return T(1) / (T(1) + std::exp(-p));
    case Act::Softplus: return std::max(p, T(0)) + std::log1p(std::exp(-std::fabs(p)));
    case Act::Elu: return p > 0 ? p : std::expm1(p);
    case Act::Relu: return p > 0 ? p : (p != p ? p : T(0));
    default: return p;
  }
}
// d act / d pre, given pre and y = act(pre).
template <typename T>
inline T dact_scalar(Act a, T p, T y) {
  switch (a) {
    case Act::Tanh: return T(1) - y * y;
    case Act::Sigmoid: return y * (T(1) - y);
    case Act::Softplus: return T(1) / (T(1) + std::exp(-p));
    case Act::Elu: return p > 0 ? T(1) : y + T(1);
    case Act::Relu: return p > 0 ? T(1) : (p != p ? p : T(0));
    default: return T(1);
  }
}

// ---- float32 vector math ---------------------------------------------------------------------------
// Comparisons of NaN are false, so the clamps below would turn NaN into a finite number; every
// activation restores NaN from its input at the end (NaN in, NaN out, like torch).
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf keep_nan(vf pre, vf y) { return pre == pre ? y : pre; }

// exp: Cephes range reduction x = n ln2 + r, degree-6 polynomial, 2^n through the exponent bits
// (~1 ulp on the clamped range; below -87 it flushes to ~1e-38 instead of denormals).
inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi32 n = __builtin_convertvector(fx, vi32);
  vf nf = __builtin_convertvector(n, vf);
  n -= nf > fx ? vi32{} + 1 : vi32{};  // truncation toward zero -> floor
  nf = __builtin_convertvector(n, vf);
  x = x - nf * 0.693359375f;
  x = x + nf * 2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  vi32 e = (n + 127) << 23;
  vf s;
  std::memcpy(&s, &e, sizeof(s));
  return y * s;
}

// log for x > 0 (finite): Cephes logf, mantissa in [sqrt(.5), sqrt(2)), degree-8 polynomial.
inline vf vlog(vf x) {
  vi32 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  vi32 e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  vf m;
  std::memcpy(&m, &bits, sizeof(m));
  const vi32 small = m < 0.707106781186547524f ? vi32{} - 1 : vi32{};
  e += small;  // -1 where small
  vf ef = __builtin_convertvector(e, vf);
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += ef * -2.12194440e-4f;
  y += z * -0.5f;
  return m + y + ef * 0.693359375f;
}

// log1p(z) for z >= 0 without losing the small-z digits: log(u) * z / (u - 1), u = 1 + z (Goldberg).
inline vf vlog1p(vf z) {
  const vf u = z + 1.0f;
  const vf d = u - 1.0f;
  return d == 0.0f ? z : vlog(u) * (z / d);
}

// expm1 with the same trick (Kahan): (u - 1) * x / log(u), u = exp(x); exact near 0.
inline vf vexpm1(vf x) {
  const vf u = vexp(x);
  const vf d = u - 1.0f;
  const vf r = (d == 0.0f) ? x : d * (x / vlog(u));
  return (u == 1.0f) ? x : (d == -1.0f ? d : r);
}

// tanh: odd rational minimax approximation on [-7.9, 7.9] (the one Eigen uses for float), a few ulp;
// small |x| goes straight to x (the rational form loses relative accuracy below ~4e-4).
inline vf vtanh(vf x) {
  const vf c = splat(7.90531110763549805f);
  const vf xc = vmin(vmax(x, -c), c);
  const vf x2 = xc * xc;
  vf p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  vf q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const vf ax = x < 0.0f ? -x : x;
  return keep_nan(x, ax < 0.0004f ? x : p / q);
}

inline vf vsigmoid(vf x) { return keep_nan(x, 1.0f / (1.0f + vexp(-x))); }

// Vectorised act(pre) and, when wanted, act'(pre). float64 goes lane by lane through libm: there the
// product dominates less and exactness matters more (the fp64 path is the accuracy reference).
template <typename T>
struct VecAct {
  using V = typename Vec<T>::type;
  static inline V y(Act a, V pre) {
    V out;
    for (int i = 0; i < Vec<T>::L; ++i) out[i] = act_scalar<T>(a, pre[i]);
    return out;
  }
  static inline V yd(Act a, V pre, V& d) {
    V out;
    for (int i = 0; i < Vec<T>::L; ++i) {
      out[i] = act_scalar<T>(a, pre[i]);
      d[i] = dact_scalar<T>(a, pre[i], out[i]);
    }
    return out;
  }
};

template <>
struct VecAct<float> {
  static inline vf y(Act a, vf p) {
    switch (a) {
      case Act::Tanh: return vtanh(p);
      case Act::Sigmoid: return vsigmoid(p);
      case Act::Relu: return p > 0.0f ? p : (p == p ? vf{} : p);
      case Act::Elu: return p > 0.0f ? p : keep_nan(p, vexpm1(vmin(p, vf{})));
      case Act::Softplus: {
        const vf ap = p < 0.0f ? -p : p;
        return keep_nan(p, vmax(p, vf{}) + vlog1p(vexp(-ap)));
      }
      default: return p;
    }
  }
  static inline vf yd(Act a, vf p, vf& d) {
    switch (a) {
      case Act::Tanh: {
        const vf y = vtanh(p);
        d = 1.0f - y * y;
        return y;
      }
      case Act::Sigmoid: {
        const vf y = vsigmoid(p);
        d = y * (1.0f - y);
        return y;
      }
      case Act::Relu:
        d = p > 0.0f ? splat(1.0f) : (p == p ? vf{} : p);
        return p > 0.0f ? p : (p == p ? vf{} : p);
      case Act::Elu: {
        const vf y = p > 0.0f ? p : keep_nan(p, vexpm1(vmin(p, vf{})));
        d = p > 0.0f ? splat(1.0f) : y + 1.0f;
        return y;
      }
      case Act::Softplus: {
        const vf ap = p < 0.0f ? -p : p;
        const vf e = vexp(-ap);  // in (0, 1]
        d = keep_nan(p, p > 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e));
        return keep_nan(p, vmax(p, vf{}) + vlog1p(e));
      }
      default: d = splat(1.0f); return p;
    }
  }
};

}  // namespace simd
}  // namespace cpu
}  // namespace jsp_fast
