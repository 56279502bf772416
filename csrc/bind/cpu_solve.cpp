// pybind11 registration of the native CNF solve (csrc/cpu/solve.h). The field arrives as the
// FieldPlanF32/F64 object bound in bind/cpu_field.cpp; arrays as NumPy views of CPU tensors
// (zero-copy). Every dtype, shape and contiguity is checked here before a pointer reaches the solver.
// Python-facing wrapper with the argument validation users see: jsp_fast/_native_solve.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bind/checks.h"
#include "bind/module.h"
#include "cpu/field.h"
#include "cpu/solve.h"

namespace py = pybind11;

namespace jsp_fast {
namespace {

using cpu::field::FieldPlan;
namespace sv = cpu::solve;

using bind::checked;
using bind::fail;

sv::Method parse_method(const std::string& s) {
  if (s == "dopri5") return sv::Method::Dopri5;
  if (s == "euler") return sv::Method::Euler;
  if (s == "midpoint") return sv::Method::Midpoint;
  if (s == "rk4") return sv::Method::Rk4;
  fail("unknown solver '" + s + "'; expected one of dopri5, euler, midpoint, rk4");
  return sv::Method::Dopri5;
}

sv::Trace parse_trace(const std::string& s) {
  if (s == "exact") return sv::Trace::Exact;
  if (s == "hutchinson") return sv::Trace::Hutchinson;
  if (s == "none") return sv::Trace::None;
  fail("unknown trace '" + s + "'; expected one of exact, hutchinson, none");
  return sv::Trace::Exact;
}

template <typename T>
py::list run(const FieldPlan<T>& plan, py::handle z0, py::handle logp0, py::handle noise,
             py::handle z1, py::handle logp1, double t0, double t1, const sv::Options& opt) {
  if (plan.num_layers() == 0) fail("the plan has no layers");
  if (plan.dim_in() != plan.dim_out())
    fail("a solve needs a square field: the plan maps " + std::to_string(plan.dim_in()) + " -> " +
         std::to_string(plan.dim_out()));
  if (!py::isinstance<py::array>(z0) || py::reinterpret_borrow<py::array>(z0).ndim() != 2)
    fail("z0 must be a 2-d array [B, dim]");
  const int64_t B = py::reinterpret_borrow<py::array>(z0).shape(0), D = plan.dim_in();
  if (B <= 0) fail("z0 must have at least one row");
  auto za = checked<T>(z0, {B, D}, "z0", false);
  auto zo = checked<T>(z1, {B, D}, "z1", true);
  py::array la, lo, na;
  const T* lp0 = nullptr;
  T* lp1 = nullptr;
  const T* np = nullptr;
  if (opt.trace != sv::Trace::None) {
    la = checked<T>(logp0, {B}, "logp0", false);
    lo = checked<T>(logp1, {B}, "logp1", true);
    lp0 = static_cast<const T*>(la.data());
    lp1 = static_cast<T*>(lo.mutable_data());
  }
  if (opt.trace == sv::Trace::Hutchinson) {
    na = checked<T>(noise, {B, D}, "noise", false);
    np = static_cast<const T*>(na.data());
  }
  const T* zp0 = static_cast<const T*>(za.data());
  T* zp1 = static_cast<T*>(zo.mutable_data());
  std::vector<sv::Stats> stats;
  {
    py::gil_scoped_release release;
    stats = sv::odeint<T>(plan, B, zp0, lp0, np, t0, t1, opt, zp1, lp1);
  }
  py::list out;
  for (const auto& s : stats) out.append(py::make_tuple(s.nfe, s.steps, s.accepted));
  return out;
}

}  // namespace

void bind_cpu_solve(py::module_& m) {
  py::register_exception<sv::SolveError>(m, "SolveError", PyExc_RuntimeError);
  m.def(
      "native_odeint",
      [](py::object plan, py::handle z0, py::handle logp0, py::handle noise, py::handle z1,
         py::handle logp1, double t0, double t1, const std::string& method, const std::string& trace,
         double rtol, double atol, double step_size, double first_step, double min_step,
         double max_step, double safety, double ifactor, double dfactor, int64_t max_num_steps,
         int64_t chunk, int num_threads) {
        sv::Options opt;
        opt.method = parse_method(method);
        opt.trace = parse_trace(trace);
        opt.rtol = rtol;
        opt.atol = atol;
        opt.step_size = step_size;
        opt.first_step = first_step;
        opt.min_step = min_step;
        opt.max_step = max_step;
        opt.safety = safety;
        opt.ifactor = ifactor;
        opt.dfactor = dfactor;
        opt.max_num_steps = max_num_steps;
        opt.chunk = chunk;
        opt.num_threads = num_threads;
        if (py::isinstance<FieldPlan<float>>(plan))
          return run<float>(plan.cast<const FieldPlan<float>&>(), z0, logp0, noise, z1, logp1, t0,
                            t1, opt);
        if (py::isinstance<FieldPlan<double>>(plan))
          return run<double>(plan.cast<const FieldPlan<double>&>(), z0, logp0, noise, z1, logp1, t0,
                             t1, opt);
        throw py::type_error("plan must be a FieldPlanF32 or FieldPlanF64, got " +
                             std::string(py::str(py::type::of(plan))));
      },
      "Solve the CNF augmented dynamics from t0 to t1 in one call; writes z1 (and logp1) and returns "
      "one (nfe, steps, accepted) tuple per batch chunk. Use jsp_fast._native_solve.odeint_native.",
      py::arg("plan"), py::arg("z0"), py::arg("logp0"), py::arg("noise"), py::arg("z1"),
      py::arg("logp1"), py::arg("t0"), py::arg("t1"), py::arg("method") = "dopri5",
      py::arg("trace") = "exact", py::arg("rtol") = 1e-7, py::arg("atol") = 1e-9,
      py::arg("step_size") = 0.0, py::arg("first_step") = std::numeric_limits<double>::quiet_NaN(),
      py::arg("min_step") = 0.0, py::arg("max_step") = std::numeric_limits<double>::infinity(),
      py::arg("safety") = 0.9, py::arg("ifactor") = 10.0, py::arg("dfactor") = 0.2,
      py::arg("max_num_steps") = (int64_t(1) << 31) - 1, py::arg("chunk") = 0,
      py::arg("num_threads") = 0);
}

}  // namespace jsp_fast
