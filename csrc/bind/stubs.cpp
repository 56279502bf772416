// The areas this configuration does not build, registered as empty so the module links. Each stub is
// compiled only when its area is not: building an area twice is a duplicate-symbol error and building
// it never is an undefined-symbol error (weak defaults would hide the second case).
#include "bind/module.h"

namespace jsp_fast {
#ifndef JSP_FAST_WITH_CUDA
// No CUDA toolkit (or JSP_FAST_CUDA=OFF): _C has no cuda_* entry points, and
// jsp_fast.sparse._cuda.built_with_cuda() says so.
void bind_cuda(pybind11::module_&) {}
#endif
}  // namespace jsp_fast
