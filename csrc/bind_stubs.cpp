// Weak defaults: an area's real bind_*.cpp overrides these with strong definitions.
#include "bind.h"

namespace jsp_fast {
__attribute__((weak)) void bind_cpu_sparse(pybind11::module_&) {}
__attribute__((weak)) void bind_cpu_field(pybind11::module_&) {}
__attribute__((weak)) void bind_cuda(pybind11::module_&) {}
}  // namespace jsp_fast
