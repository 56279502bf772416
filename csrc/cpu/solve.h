// A whole CNF solve in one native call: the FFJORD augmented dynamics
//   dz/dt = f(t, z),   dlogp/dt = -tr(∂f/∂z)
// integrated from t0 to t1 (either direction) with the field evaluated by a packed FieldPlan
// (cpu/field.h). The trace is exact (D tangents e_i, tr = Σ_i (J e_i)_i), Hutchinson (one noise ε
// [B, D] held fixed for the whole solve, tr ≈ εᵀ J ε) or absent (z only: transform, inverse, sample).
//
// The solvers reproduce torchdiffeq 0.2.x step for step, so a native solve takes the same steps and
// the same number of evaluations as `torchdiffeq.odeint(func, (z, logp), [t0, t1], ...)`:
//   - dopri5: Dormand-Prince 5(4) with FSAL, Hairer's initial step (_select_initial_step), the error
//     ratio under torchdiffeq's norm for a tuple state (the max over z and logp of each part's RMS),
//     _optimal_step_size (safety, ifactor, dfactor; a step is never shrunk after an accepted one),
//     steps that run past t1 and a 4th-order interpolation back to it, the stages at alpha = 1
//     evaluated at the previous representable time (torchdiffeq's Perturb.PREV).
//   - euler, midpoint, rk4 (the 3/8 rule: torchdiffeq's rk4_alt_step_func) on torchdiffeq's grid
//     (points start + i·step_size in the state's precision, the last one replaced by t1; one step
//     over [t0, t1] without a step size), linear interpolation onto t1.
// Backwards in time is torchdiffeq's reversal: the solver integrates s = -t forward with -f(-s).
// Solver time and step sizes are double; stage times, stage combinations and norms use the state's
// precision T where torchdiffeq does.
//
// Deviations (on failure only): where torchdiffeq raises an AssertionError, or (fixed-step solvers)
// returns NaN/inf, this raises SolveError with the solver, the time reached and what to try.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/field.h"

namespace jsp_fast {
namespace cpu {
namespace solve {

enum class Method { Dopri5, Euler, Midpoint, Rk4 };
enum class Trace { None, Exact, Hutchinson };

const char* method_name(Method m);
const char* trace_name(Trace t);

struct Options {
  Method method = Method::Dopri5;
  Trace trace = Trace::Exact;
  double rtol = 1e-7, atol = 1e-9;  // torchdiffeq's defaults
  // fixed-step solvers: grid spacing; <= 0 means one step over the whole interval
  double step_size = 0;
  // dopri5 (torchdiffeq's option names and defaults); first_step NaN = chosen by _select_initial_step
  double first_step = std::numeric_limits<double>::quiet_NaN();
  double min_step = 0, max_step = std::numeric_limits<double>::infinity();
  double safety = 0.9, ifactor = 10.0, dfactor = 0.2;
  int64_t max_num_steps = (int64_t(1) << 31) - 1;
  // > 0: the batch is cut into chunks of this many rows, each solved with its own step sizes (and
  // its own norm); chunks run in parallel, one thread each. 0: one solve over the whole batch.
  int64_t chunk = 0;
  int num_threads = 0;  // <= 0: OpenMP's default
};

struct Stats {
  int64_t nfe = 0;       // field evaluations
  int64_t steps = 0;     // steps attempted (dopri5: accepted + rejected)
  int64_t accepted = 0;  // steps accepted
};

// Raised when a solve cannot finish: step-size underflow, non-finite state, max_num_steps exceeded.
class SolveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// z0, z1: [B, D] (D = plan.dim_in() = plan.dim_out()); logp0, logp1: [B] (unused with Trace::None,
// may be null); noise: [B, D] for Trace::Hutchinson, else ignored. z1/logp1 may alias z0/logp0.
// Returns one Stats per chunk (one in all when opt.chunk is 0 or >= B). Requires t0 != t1.
template <typename T>
std::vector<Stats> odeint(const field::FieldPlan<T>& plan, int64_t B, const T* z0, const T* logp0,
                          const T* noise, double t0, double t1, const Options& opt, T* z1, T* logp1);

extern template std::vector<Stats> odeint<float>(const field::FieldPlan<float>&, int64_t, const float*,
                                                 const float*, const float*, double, double,
                                                 const Options&, float*, float*);
extern template std::vector<Stats> odeint<double>(const field::FieldPlan<double>&, int64_t,
                                                  const double*, const double*, const double*, double,
                                                  double, const Options&, double*, double*);

}  // namespace solve
}  // namespace cpu
}  // namespace jsp_fast
