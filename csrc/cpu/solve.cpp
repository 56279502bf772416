// Native CNF solves: see solve.h for what is computed and how it follows torchdiffeq.
//
// The state is one contiguous vector y = [z (B·D) | logp (B)], so every Runge-Kutta combination is
// one pass over N = B·(D+1) elements, and the field writes its value straight into the z part of a
// stage buffer. All buffers are allocated once per solve; a step allocates nothing. Vector passes
// over large states are split into one contiguous range per thread; norms add per-range partial
// sums in a fixed order, so results do not depend on scheduling.
#include "cpu/solve.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

#ifdef JSP_FAST_OPENMP
#include <omp.h>
#endif

namespace jsp_fast {
namespace cpu {
namespace solve {

using field::AlignedBuf;
using field::FieldPlan;

const char* method_name(Method m) {
  switch (m) {
    case Method::Dopri5: return "dopri5";
    case Method::Euler: return "euler";
    case Method::Midpoint: return "midpoint";
    case Method::Rk4: return "rk4";
  }
  return "?";
}

const char* trace_name(Trace t) {
  switch (t) {
    case Trace::None: return "none";
    case Trace::Exact: return "exact";
    case Trace::Hutchinson: return "hutchinson";
  }
  return "?";
}

namespace {

// Below this many elements a vector pass stays on one thread. A pass is memory-bound and small next
// to a field evaluation (B·(D+1) elements against B·(1+T) rows through every layer), while each
// OpenMP region adds a barrier: on a loaded 2-core machine (log_prob, 64-d, 512x3 at 90%, B = 1000,
// 2 threads) splitting 65K-element passes made the solve 20% slower than its bare field calls,
// one thread per pass 1.5%.
constexpr int64_t kParMin = int64_t(1) << 15;

int default_threads() {
#ifdef JSP_FAST_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// f(lo, hi, part) over contiguous ranges of [0, n), one per thread (part < threads); `work` elements
// in all decide whether threads pay (default n).
template <class F>
void ranges(int64_t n, int threads, F&& f, int64_t work = -1) {
#ifdef JSP_FAST_OPENMP
  if (threads > 1 && (work < 0 ? n : work) >= kParMin) {
#pragma omp parallel num_threads(threads)
    {
      const int p = omp_get_thread_num(), np = omp_get_num_threads();
      f(n * p / np, n * (p + 1) / np, p);
    }
    return;
  }
#endif
  (void)threads;
  (void)work;
  f(int64_t(0), n, 0);
}

// ---- Dormand-Prince 5(4), torchdiffeq's _DORMAND_PRINCE_SHAMPINE_TABLEAU and DPS_C_MID ----------
// Written as the same float64 expressions so the values (then rounded to T) are identical.
constexpr double kAlpha[6] = {1. / 5, 3. / 10, 4. / 5, 8. / 9, 1., 1.};
constexpr double kBeta[6][6] = {
    {1. / 5},
    {3. / 40, 9. / 40},
    {44. / 45, -56. / 15, 32. / 9},
    {19372. / 6561, -25360. / 2187, 64448. / 6561, -212. / 729},
    {9017. / 3168, -355. / 33, 46732. / 5247, 49. / 176, -5103. / 18656},
    {35. / 384, 0, 500. / 1113, 125. / 192, -2187. / 6784, 11. / 84},
};
constexpr double kErr[7] = {35. / 384 - 1951. / 21600, 0, 500. / 1113 - 22642. / 50085,
                            125. / 192 - 451. / 720, -2187. / 6784 - -12231. / 42400,
                            11. / 84 - 649. / 6300, -1. / 60.};
constexpr double kMid[7] = {6025192743. / 30085553152. / 2, 0, 51252292925. / 65400821598. / 2,
                            -2691868925. / 45128329728. / 2, 187940372067. / 1594534317056. / 2,
                            -1776094331. / 19743644256. / 2, 11237099. / 235043384. / 2};
constexpr int kOrder = 5;

// dst[e - off] = y[e] + Σ_j k_j[e] c_j (torchdiffeq: y0 + sum(k[..., :n] * c, dim=-1)), e in [lo, hi).
// One definition for both uses (a whole-state pass, off = 0, and a field tile's input rows), so the
// two round identically.
template <typename T, int NK>
void combo(T* __restrict dst, const T* y, T* const* K, const T* c, int64_t lo, int64_t hi, int64_t off) {
  const T* k[NK];
  T cc[NK];
  for (int j = 0; j < NK; ++j) k[j] = K[j], cc[j] = c[j];
  for (int64_t e = lo; e < hi; ++e) {
    T acc = k[0][e] * cc[0];
#pragma GCC unroll 8
    for (int j = 1; j < NK; ++j) acc += k[j][e] * cc[j];
    dst[e - off] = y[e] + acc;
  }
}

// nk <= 5: dopri5's stages 1-5 and the one-term steps of euler/midpoint (stage 6 has its own pass,
// solution_and_error_head).
template <typename T>
void combo_n(int nk, T* dst, const T* y, T* const* K, const T* c, int64_t lo, int64_t hi, int64_t off = 0) {
  switch (nk) {
    case 1: return combo<T, 1>(dst, y, K, c, lo, hi, off);
    case 2: return combo<T, 2>(dst, y, K, c, lo, hi, off);
    case 3: return combo<T, 3>(dst, y, K, c, lo, hi, off);
    case 4: return combo<T, 4>(dst, y, K, c, lo, hi, off);
    case 5: return combo<T, 5>(dst, y, K, c, lo, hi, off);
    default: throw std::logic_error("combo_n: " + std::to_string(nk) + " stages (1-5 expected)");
  }
}

std::string fmt(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

// One solve over B rows (the whole batch, or one chunk of it).
template <typename T>
class Integrator {
 public:
  Integrator(const FieldPlan<T>& plan, int64_t B, const T* noise, const Options& opt, double t0,
             double t1, int threads)
      : plan_(plan), B_(B), D_(plan.dim_in()), noise_(noise), opt_(opt), t0_(t0), t1_(t1),
        rev_(t1 < t0), threads_(std::max(threads, 1)) {
    nz_ = B_ * D_;
    n_ = nz_ + (opt_.trace == Trace::None ? 0 : B_);
    part_.assign(size_t(2 * threads_), 0.0);
    if (opt_.trace == Trace::Exact) {
      // Tangent i is e_i for every row: v[i, b, :] = e_i.
      v_.resize(D_ * nz_);
      std::memset(v_.data(), 0, size_t(D_ * nz_) * sizeof(T));
      for (int64_t i = 0; i < D_; ++i)
        for (int64_t b = 0; b < B_; ++b) v_.data()[(i * B_ + b) * D_ + i] = T(1);
    }
  }

  Stats run(const T* z0, const T* logp0, T* z1, T* logp1) {
    AlignedBuf<T> y;
    y.resize(n_);
    std::memcpy(y.data(), z0, size_t(nz_) * sizeof(T));
    if (n_ > nz_) std::memcpy(y.data() + nz_, logp0, size_t(B_) * sizeof(T));
    const T* out = opt_.method == Method::Dopri5 ? dopri5(y) : fixed_grid(y);
    std::memcpy(z1, out, size_t(nz_) * sizeof(T));
    if (n_ > nz_) std::memcpy(logp1, out + nz_, size_t(B_) * sizeof(T));
    return st_;
  }

 private:
  const FieldPlan<T>& plan_;
  int64_t B_, D_, nz_ = 0, n_ = 0;
  const T* noise_;
  Options opt_;
  double t0_, t1_;
  bool rev_;
  int threads_;
  AlignedBuf<T> v_, res_;
  std::vector<double> part_;
  Stats st_;

  // Solver time s is t, or -t backwards (torchdiffeq's _ReverseFunc): always increasing.
  double user_time(double s) const { return rev_ ? -s : s; }

  // out = d[z, logp]/ds at solver time s (already rounded to T, as torchdiffeq's _PerturbFunc does)
  // at the state y + Σ_{j<nk} c_j K_j (nk = 0: at y), in one field call: the stage input is formed in
  // each field tile (stage_in) and the trace reduced from the tile's tangents (stage_out), so neither
  // the stage input nor J·v makes a pass over memory (or an OpenMP region) of its own
  // (FieldPlan::Hooks); numbers in bench/RESULTS.md ("Native solve").
  struct Stage {
    const Integrator* self;
    const T* y;
    T* const* K;
    const T* c;
    int nk;
    T* out;
  };

  static void stage_in(void* p, int64_t b0, int64_t nb, T* dst) {
    const Stage& st = *static_cast<const Stage*>(p);
    const int64_t D = st.self->D_;
    if (st.nk == 0)
      std::memcpy(dst, st.y + b0 * D, size_t(nb * D) * sizeof(T));
    else
      combo_n<T>(st.nk, dst, st.y, st.K, st.c, b0 * D, (b0 + nb) * D, b0 * D);
  }

  static void stage_out(void* p, int64_t b0, int64_t nb, const T* res, int64_t ld, int64_t TB) {
    const Stage& st = *static_cast<const Stage*>(p);
    const Integrator& I = *st.self;
    const int64_t D = I.D_;
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = res + r * ld;
      T* dst = st.out + (b0 + r) * D;
      if (I.rev_)
        for (int64_t i = 0; i < D; ++i) dst[i] = -src[i];
      else
        std::memcpy(dst, src, size_t(D) * sizeof(T));
    }
    if (I.opt_.trace == Trace::None) return;
    T* lp = st.out + I.nz_;
    const T sgn = I.rev_ ? T(1) : T(-1);  // dlogp/dt = -tr; -(-tr) backwards
    if (I.opt_.trace == Trace::Exact) {
      // (J e_i)_i: column i of tangent i's row.
      for (int64_t r = 0; r < nb; ++r) {
        T acc = T(0);
        for (int64_t i = 0; i < D; ++i) acc += res[((i + 1) * TB + r) * ld + i];
        lp[b0 + r] = acc * sgn;
      }
    } else {
      for (int64_t r = 0; r < nb; ++r) {
        const T* jv = res + (TB + r) * ld;
        const T* eps = I.noise_ + (b0 + r) * D;
        T tr = 0;
        for (int64_t i = 0; i < D; ++i) tr += jv[i] * eps[i];
        lp[b0 + r] = sgn * tr;
      }
    }
  }

  void rhs(T s, const T* y, T* out, int nk = 0, T* const* K = nullptr, const T* c = nullptr) {
    const T t = rev_ ? -s : s;
    ++st_.nfe;
    Stage st{this, y, K, c, nk, out};
    typename FieldPlan<T>::Hooks hooks;
    hooks.ctx = &st;
    hooks.in = &Integrator::stage_in;
    hooks.out = &Integrator::stage_out;
    const T* v = nullptr;
    int64_t ntan = 0;
    if (opt_.trace == Trace::Exact) {
      v = v_.data();
      ntan = D_;
    } else if (opt_.trace == Trace::Hutchinson) {
      v = noise_;
      ntan = 1;
    }
    plan_.eval_hooked(t, B_, v, ntan, hooks, threads_);
  }

  void lincomb(int nk, T* dst, const T* y, T* const* K, const T* c) {
    ranges(n_, threads_, [&](int64_t lo, int64_t hi, int) { combo_n<T>(nk, dst, y, K, c, lo, hi); });
  }

  // torchdiffeq's norm for a tuple state: the max over the parts (z, then logp) of each part's RMS,
  // in T (squares in T as torch does, summed in double). elem(e) gives element e.
  template <class F>
  T mixed_rms(F&& elem) {
    std::fill(part_.begin(), part_.end(), 0.0);
    const int64_t nz = nz_, n = n_;
    ranges(n, threads_, [&](int64_t lo, int64_t hi, int p) {
      double s0 = 0, s1 = 0;
      for (int64_t e = lo; e < std::min(hi, nz); ++e) {
        const T v = elem(e);
        s0 += double(T(v * v));
      }
      for (int64_t e = std::max(lo, nz); e < hi; ++e) {
        const T v = elem(e);
        s1 += double(T(v * v));
      }
      part_[2 * p] = s0;
      part_[2 * p + 1] = s1;
    });
    return rms_of_parts(n - nz);
  }

  // The mixed RMS from the per-range sums of squares in part_ (z part, then the n_logp logp elements).
  T rms_of_parts(int64_t n_logp) const {
    double s0 = 0, s1 = 0;
    for (int p = 0; p < threads_; ++p) s0 += part_[2 * p], s1 += part_[2 * p + 1];
    T norm = std::sqrt(T(s0 / double(nz_)));
    if (n_logp > 0) {
      const T r1 = std::sqrt(T(s1 / double(n_logp)));
      if (r1 > norm) norm = r1;  // Python's max(): a NaN second part is ignored, a NaN first kept
    }
    return norm;
  }

  bool all_finite(const T* y) {
    std::fill(part_.begin(), part_.end(), 0.0);
    ranges(n_, threads_, [&](int64_t lo, int64_t hi, int p) {
      double bad = 0;
      for (int64_t e = lo; e < hi; ++e) bad += std::isfinite(y[e]) ? 0.0 : 1.0;
      part_[2 * p] = bad;
    });
    for (int p = 0; p < threads_; ++p)
      if (part_[2 * p] != 0) return false;
    return true;
  }

  [[noreturn]] void fail(const std::string& what, double s, const std::string& advice) const {
    const char* name = method_name(opt_.method);
    std::string msg = std::string(name) + " solver failed: " + what + " at t = " + fmt(user_time(s)) +
                      " (integrating from " + fmt(t0_) + " to " + fmt(t1_) + ") after " +
                      std::to_string(st_.nfe) + " field evaluations";
    if (opt_.method == Method::Dopri5)
      msg += " and " + std::to_string(st_.steps) + " steps (rtol=" + fmt(opt_.rtol) +
             ", atol=" + fmt(opt_.atol) + ")";
    throw SolveError(msg + ". " + advice);
  }

  static constexpr const char* kStiff =
      "The dynamics are too stiff or blow up along this trajectory: try looser rtol/atol, a "
      "fixed-step solver (solver='rk4', options={'step_size': ...}), a model trained with RNODE "
      "regularisation (reg={'kinetic': 0.01, 'jacobian': 0.01}), or check the data scale.";
  static constexpr const char* kBlowUp =
      "The field blows up along this trajectory: try smaller steps (tighter rtol/atol, or a smaller "
      "step_size), check the input scale, or regularise the model (RNODE).";

  // ---- dopri5 ------------------------------------------------------------------------------------
  // torchdiffeq's _select_initial_step (Hairer, Nørsett & Wanner II.4) for order 5 - 1.
  double initial_step(double s0, const T* y0, const T* f0, T* y1, T* f1) {
    const T atol = T(opt_.atol), rtol = T(opt_.rtol);
    auto scale = [&](int64_t e) { return atol + std::abs(y0[e]) * rtol; };
    const T d0 = std::abs(mixed_rms([&](int64_t e) { return y0[e] / scale(e); }));
    const T d1 = std::abs(mixed_rms([&](int64_t e) { return f0[e] / scale(e); }));
    T h0 = (d0 < T(1e-5) || d1 < T(1e-5)) ? T(1e-6) : T(0.01) * d0 / d1;
    h0 = std::abs(h0);
    ranges(n_, threads_, [&](int64_t lo, int64_t hi, int) {
      for (int64_t e = lo; e < hi; ++e) y1[e] = y0[e] + h0 * f0[e];
    });
    rhs(T(s0 + double(h0)), y1, f1);
    const T d2 =
        std::abs(mixed_rms([&](int64_t e) { return (f1[e] - f0[e]) / scale(e); }) / h0);
    T h1;
    if (d1 <= T(1e-15) && d2 <= T(1e-15))
      h1 = std::max(T(1e-6), h0 * T(1e-3));
    else
      h1 = std::pow(T(0.01) / (d2 > d1 ? d2 : d1), T(1.0 / double(kOrder - 1 + 1)));
    h1 = std::abs(h1);
    return double(std::min(T(100) * h0, h1));
  }

  double optimal_step(double dt, T ratio_t) const {
    if (ratio_t == T(0)) return dt * opt_.ifactor;
    const double dfactor = ratio_t < T(1) ? 1.0 : opt_.dfactor;
    const double ratio = double(ratio_t);
    const double factor =
        std::min(opt_.ifactor, std::max(opt_.safety / std::pow(ratio, 1.0 / kOrder), dfactor));
    return dt * factor;
  }

  static double clamp(double x, double lo, double hi) {
    // torch.clamp: NaN stays NaN
    if (std::isnan(x)) return x;
    return std::min(std::max(x, lo), hi);
  }

  // The pass after stage 6's inputs: y1 = y + Σ_{j<6} c_j K_j (the 5th-order solution) and the first
  // six terms of the error estimate, head = Σ_{j<6} (kErr_j dt) K_j, in one read of K[0..5] (the error
  // pass then reads head and K[6] instead of all seven stages). Same sums in the same order as
  // torchdiffeq's y0 + sum(k * c) and its error's sum over the seven stages.
  void solution_and_error_head(T* y1, T* head, const T* y, T* const* K, const T* c, T dt) {
    T ce[6];
    for (int j = 0; j < 6; ++j) ce[j] = T(kErr[j]) * dt;
    const T* k[6] = {K[0], K[1], K[2], K[3], K[4], K[5]};
    ranges(n_, threads_, [&](int64_t lo, int64_t hi, int) {
      for (int64_t e = lo; e < hi; ++e) {
        T acc = k[0][e] * c[0];
        T err = k[0][e] * ce[0];
#pragma GCC unroll 6
        for (int j = 1; j < 6; ++j) {
          acc += k[j][e] * c[j];
          err += k[j][e] * ce[j];
        }
        y1[e] = y[e] + acc;
        head[e] = err;
      }
    });
  }

  // torchdiffeq's error ratio: mixed_rms((head + c6 K6) / (atol + rtol max(|y|, |y1|))), and whether y1
  // is finite, in one pass.
  T error_ratio(const T* head, const T* k6, T c6, const T* y, const T* y1, T atol, T rtol, bool& y1_finite) {
    std::fill(part_.begin(), part_.end(), 0.0);
    std::vector<char> bad(size_t(threads_), 0);
    const int64_t nz = nz_, n = n_;
    ranges(n, threads_, [&](int64_t lo, int64_t hi, int p) {
      int64_t nonfinite = 0;
      auto sum = [&](int64_t a, int64_t b) {
        double acc = 0;
        for (int64_t e = a; e < b; ++e) {
          const T err = head[e] + k6[e] * c6;
          const T tol = atol + rtol * std::max(std::abs(y[e]), std::abs(y1[e]));
          const T v = err / tol;
          acc += double(T(v * v));
          nonfinite += !std::isfinite(y1[e]);
        }
        return acc;
      };
      part_[2 * p] = sum(lo, std::min(hi, nz));
      part_[2 * p + 1] = sum(std::max(lo, nz), hi);
      bad[size_t(p)] = nonfinite != 0;
    });
    y1_finite = std::none_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
    return rms_of_parts(n - nz);
  }

  const T* dopri5(AlignedBuf<T>& ybuf) {
    std::vector<AlignedBuf<T>> kb(7);
    for (auto& b : kb) b.resize(n_);
    AlignedBuf<T> y1b, tmpb;
    y1b.resize(n_);
    tmpb.resize(n_);
    T* K[7];
    for (int j = 0; j < 7; ++j) K[j] = kb[j].data();
    T* y = ybuf.data();
    T* y1 = y1b.data();
    T* tmp = tmpb.data();

    double s = rev_ ? -t0_ : t0_;
    const double s_end = rev_ ? -t1_ : t1_;
    rhs(T(s), y, K[0]);
    double dt = std::isnan(opt_.first_step) ? initial_step(s, y, K[0], tmp, K[1]) : opt_.first_step;

    const T atol = T(opt_.atol), rtol = T(opt_.rtol);
    // Whether y is finite: checked here for y0, then for each y1 in the error pass (the next y when
    // accepted), so a step pays no pass of its own for it.
    bool y_finite = all_finite(y);
    for (;;) {
      if (st_.steps >= opt_.max_num_steps)
        fail("max_num_steps (" + std::to_string(opt_.max_num_steps) + ") exceeded", s,
             "Raise options['max_num_steps'], loosen rtol/atol, or regularise the model (RNODE).");
      if (!std::isfinite(dt)) dt = opt_.min_step;
      dt = clamp(dt, opt_.min_step, opt_.max_step);
      const double s1 = s + dt;
      // A non-finite state first: it also makes the step size NaN (-> min_step), and "underflow" would
      // send the user after stiffness instead of the NaN (e.g. a NaN row in the input).
      if (!y_finite) fail("the state became non-finite (NaN or inf)", s, kBlowUp);
      if (!(s + dt > s)) fail("step size underflow (dt = " + fmt(dt) + ")", s, kStiff);
      ++st_.steps;

      // _runge_kutta_step: times and coefficients in T.
      const T t0T = T(s), dtT = T(dt), t1T = T(s1);
      T c[7];
      for (int i = 0; i < 6; ++i) {
        const T ti = kAlpha[i] == 1.0
                         ? std::nextafter(t1T, -std::numeric_limits<T>::infinity())  // Perturb.PREV
                         : t0T + T(kAlpha[i]) * dtT;
        for (int j = 0; j <= i; ++j) c[j] = T(kBeta[i][j]) * dtT;
        if (i == 5) {  // FSAL: the last stage's input is the 5th-order solution, kept whole
          solution_and_error_head(y1, tmp, y, K, c, dtT);
          rhs(ti, y1, K[6]);
        } else {  // formed inside the field call (its logp part is never read)
          rhs(ti, y, K[i + 1], i + 1, K, c);
        }
      }
      bool y1_finite = true;
      const T ratio = std::abs(error_ratio(tmp, K[6], T(kErr[6]) * dtT, y, y1, atol, rtol, y1_finite));
      if (std::isnan(ratio) && !(opt_.min_step > 0))
        // torchdiffeq would reject, get a NaN step size, fall back to min_step = 0 and fail on
        // "underflow in dt": the same end, said plainly.
        fail("the field returned non-finite values (NaN) within a step of dt = " + fmt(dt), s,
             kBlowUp);
      bool accept = ratio <= T(1);
      if (dt > opt_.max_step) accept = false;
      if (dt <= opt_.min_step) accept = true;
      const double dt_next = clamp(optimal_step(dt, ratio), opt_.min_step, opt_.max_step);
      if (accept) {
        ++st_.accepted;
        if (s1 >= s_end) {
          res_.resize(n_);  // outlives this function's buffers
          return interpolate(y, y1, K, dtT, T((s_end - s) / (s1 - s)), res_.data());
        }
        std::swap(y, y1);
        std::swap(K[0], K[6]);  // FSAL: f(y1) starts the next step
        s = s1;
        y_finite = y1_finite;
      }
      dt = dt_next;
    }
  }

  // torchdiffeq's _interp_fit + _interp_evaluate of the last accepted step at x ∈ [0, 1].
  const T* interpolate(const T* y0, const T* y1, T* const* K, T dt, T x, T* out) {
    T cm[7];
    for (int j = 0; j < 7; ++j) cm[j] = dt * T(kMid[j]);
    const T x2 = x * x, x3 = x2 * x, x4 = x3 * x;
    const T* Kc[7] = {K[0], K[1], K[2], K[3], K[4], K[5], K[6]};
    ranges(n_, threads_, [&](int64_t lo, int64_t hi, int) {
      for (int64_t e = lo; e < hi; ++e) {
        T acc = Kc[0][e] * cm[0];
        for (int j = 1; j < 7; ++j) acc += Kc[j][e] * cm[j];
        const T ym = y0[e] + acc, f0 = Kc[0][e], f1 = Kc[6][e], a0 = y0[e], a1 = y1[e];
        const T a = T(2) * dt * (f1 - f0) - T(8) * (a1 + a0) + T(16) * ym;
        const T b = dt * (T(5) * f0 - T(3) * f1) + T(18) * a0 + T(14) * a1 - T(32) * ym;
        const T cc = dt * (f1 - T(4) * f0) - T(11) * a0 - T(5) * a1 + T(16) * ym;
        const T d = dt * f0;
        T total = a0 + x * d;
        total = total + x2 * cc;
        total = total + x3 * b;
        total = total + x4 * a;
        out[e] = total;
      }
    });
    return out;
  }

  // ---- euler, midpoint, rk4 on torchdiffeq's fixed grid ------------------------------------------
  const T* fixed_grid(AlignedBuf<T>& ybuf) {
    const int nk = opt_.method == Method::Euler ? 1 : opt_.method == Method::Midpoint ? 2 : 4;
    std::vector<AlignedBuf<T>> kb(nk);
    for (auto& b : kb) b.resize(n_);
    AlignedBuf<T> y1b, tmpb;
    y1b.resize(n_);
    tmpb.resize(n_);
    T* K[4] = {nullptr, nullptr, nullptr, nullptr};
    for (int j = 0; j < nk; ++j) K[j] = kb[j].data();
    T* y = ybuf.data();
    T* y1 = y1b.data();
    T* tmp = tmpb.data();
    res_.resize(n_);
    T* res = res_.data();

    // _grid_constructor_from_step_size, in the time tensor's precision (the state's).
    const T start = T(rev_ ? -t0_ : t0_), end = T(rev_ ? -t1_ : t1_);
    const bool has_step = opt_.step_size > 0;
    const T h = T(opt_.step_size);
    int64_t npts = 2;
    if (has_step) {
      const double np = std::ceil(double((end - start) / h + T(1)));
      if (!(np <= double(int64_t(1) << 31)))
        throw std::invalid_argument("step_size " + fmt(opt_.step_size) + " gives more than 2^31 steps");
      npts = std::max<int64_t>(int64_t(np), 2);
    }
    auto grid = [&](int64_t i) { return i == npts - 1 ? end : (has_step ? T(i) * h + start : start); };

    bool captured = false;
    const int64_t n = n_;
    for (int64_t i = 0; i + 1 < npts; ++i) {
      const T ta = grid(i), tb = grid(i + 1), dt = tb - ta;
      ++st_.steps;
      T c[1];
      switch (opt_.method) {
        case Method::Euler:
          rhs(ta, y, K[0]);
          c[0] = dt;
          lincomb(1, y1, y, K, c);
          break;
        case Method::Midpoint: {
          const T half = T(0.5) * dt;
          rhs(ta, y, K[0]);
          c[0] = half;
          rhs(ta + half, y, K[1], 1, K, c);  // the midpoint state, formed inside the field call
          c[0] = dt;
          lincomb(1, y1, y, K + 1, c);
          break;
        }
        default: {  // rk4_alt_step_func (the 3/8 rule), torch's order of operations
          const T third = T(1. / 3), two_thirds = T(2. / 3);
          const T* k1 = K[0];
          const T* k2 = K[1];
          const T* k3 = K[2];
          const T* k4 = K[3];
          rhs(ta, y, K[0]);
          ranges(n, threads_, [&](int64_t lo, int64_t hi, int) {
            for (int64_t e = lo; e < hi; ++e) tmp[e] = y[e] + dt * k1[e] * third;
          });
          rhs(ta + dt * third, tmp, K[1]);
          ranges(n, threads_, [&](int64_t lo, int64_t hi, int) {
            for (int64_t e = lo; e < hi; ++e) tmp[e] = y[e] + dt * (k2[e] - k1[e] * third);
          });
          rhs(ta + dt * two_thirds, tmp, K[2]);
          ranges(n, threads_, [&](int64_t lo, int64_t hi, int) {
            for (int64_t e = lo; e < hi; ++e) tmp[e] = y[e] + dt * (k1[e] - k2[e] + k3[e]);
          });
          rhs(tb, tmp, K[3]);
          ranges(n, threads_, [&](int64_t lo, int64_t hi, int) {
            for (int64_t e = lo; e < hi; ++e)
              y1[e] = y[e] + (k1[e] + T(3) * (k2[e] + k3[e]) + k4[e]) * dt * T(0.125);
          });
        }
      }
      // torchdiffeq would carry NaN/inf on to the end; stop at the step where it appears.
      if (!all_finite(y1)) fail("the state became non-finite (NaN or inf)", double(tb), kBlowUp);
      if (!captured && tb >= end) {  // linear interpolation onto t1 (exact when tb == t1)
        captured = true;
        if (end == ta) {
          std::memcpy(res, y, size_t(n) * sizeof(T));
        } else if (end == tb) {
          std::memcpy(res, y1, size_t(n) * sizeof(T));
        } else {
          const T slope = (end - ta) / (tb - ta);
          for (int64_t e = 0; e < n; ++e) res[e] = y[e] + slope * (y1[e] - y[e]);
        }
      }
      std::swap(y, y1);
    }
    return res;
  }
};

}  // namespace

template <typename T>
std::vector<Stats> odeint(const FieldPlan<T>& plan, int64_t B, const T* z0, const T* logp0,
                          const T* noise, double t0, double t1, const Options& opt, T* z1, T* logp1) {
  if (plan.num_layers() == 0) throw std::invalid_argument("the field plan has no layers");
  if (plan.dim_in() != plan.dim_out())
    throw std::invalid_argument("a solve needs a square field (dim_in == dim_out)");
  if (B <= 0) throw std::invalid_argument("the batch must not be empty");
  if (!(t0 != t1) || !std::isfinite(t0) || !std::isfinite(t1))
    throw std::invalid_argument("t0 and t1 must be finite and different");
  if (opt.trace == Trace::Hutchinson && noise == nullptr)
    throw std::invalid_argument("Hutchinson's trace needs the noise");
  const int threads = opt.num_threads > 0 ? opt.num_threads : default_threads();
  const int64_t D = plan.dim_in();
  const bool has_logp = opt.trace != Trace::None;
  const int64_t chunk = opt.chunk > 0 && opt.chunk < B ? opt.chunk : B;
  const int64_t nchunks = (B + chunk - 1) / chunk;
  std::vector<Stats> stats(static_cast<size_t>(nchunks));

  auto one = [&](int64_t c, int inner_threads) {
    const int64_t b0 = c * chunk, nb = std::min(chunk, B - b0);
    Integrator<T> integ(plan, nb, noise ? noise + b0 * D : nullptr, opt, t0, t1, inner_threads);
    stats[size_t(c)] = integ.run(z0 + b0 * D, has_logp ? logp0 + b0 : nullptr, z1 + b0 * D,
                                 has_logp ? logp1 + b0 : nullptr);
  };
  // Many chunks: one thread per chunk (each chunk's field call is small). Few: chunk after chunk,
  // each with every thread (nested OpenMP regions would run on one thread anyway).
  if (nchunks == 1 || nchunks < threads) {
    for (int64_t c = 0; c < nchunks; ++c) one(c, threads);
    return stats;
  }
  std::exception_ptr err;
#ifdef JSP_FAST_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t c = 0; c < nchunks; ++c) {
    bool failed;
#ifdef JSP_FAST_OPENMP
#pragma omp critical(jsp_fast_solve_err)
#endif
    failed = bool(err);
    if (failed) continue;
    try {
      one(c, 1);
    } catch (...) {
#ifdef JSP_FAST_OPENMP
#pragma omp critical(jsp_fast_solve_err)
#endif
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
  return stats;
}

template std::vector<Stats> odeint<float>(const FieldPlan<float>&, int64_t, const float*, const float*,
                                          const float*, double, double, const Options&, float*, float*);
template std::vector<Stats> odeint<double>(const FieldPlan<double>&, int64_t, const double*,
                                           const double*, const double*, double, double,
                                           const Options&, double*, double*);

}  // namespace solve
}  // namespace cpu
}  // namespace jsp_fast
