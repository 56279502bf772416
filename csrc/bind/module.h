#pragma once
#include <pybind11/pybind11.h>

namespace jsp_fast {
// One registration function per area, each defined in csrc/bind/<area>.cpp. An area that is not built
// in this configuration (CUDA without a toolkit) is defined empty in csrc/bind/stubs.cpp, explicitly:
// a missing area is a link error, never a silently smaller module.
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
