#pragma once
#include <pybind11/pybind11.h>

#ifndef JSP_FAST_VERSION
#define JSP_FAST_VERSION "0.1.0"
#endif

namespace jsp_fast {
// Each csrc/bind_<area>.cpp defines one of these. Areas that are not built (CUDA without a toolkit)
// get a weak empty definition so the module always links.
void bind_cpu_sparse(pybind11::module_& m);
void bind_cpu_field(pybind11::module_& m);
void bind_cpu_solve(pybind11::module_& m);
void bind_cuda(pybind11::module_& m);

inline void bind_all(pybind11::module_& m) {
  bind_cpu_sparse(m);
  bind_cpu_field(m);
  bind_cpu_solve(m);  // after the field: its signatures name FieldPlanF32/F64
  bind_cuda(m);
}
}  // namespace jsp_fast
