// The one pybind11 module, jsp_fast._C. Kernels under csrc/cpu and csrc/cuda are torch-free (raw
// pointers and sizes); each area registers its entry points from csrc/bind/<area>.cpp, where the
// arguments are checked (csrc/bind/checks.h) before any pointer is handed to a kernel.
#include <pybind11/pybind11.h>

#include "bind/module.h"
#include "common/act.h"

// The package version, from the build (CMakeLists.txt passes scikit-build-core's project version, or
// pyproject.toml's in a plain CMake build). No default here: a stale literal would report a version the
// module was not built as.
#if !defined(JSP_FAST_VERSION) || !defined(JSP_FAST_VERSION_FROM)
#error "JSP_FAST_VERSION and JSP_FAST_VERSION_FROM must be defined by the build (see CMakeLists.txt)"
#endif

#ifdef JSP_FAST_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = JSP_FAST_VERSION;
  info["version_from"] = JSP_FAST_VERSION_FROM;
#ifdef JSP_FAST_OPENMP
  info["openmp"] = true;
  info["max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["max_threads"] = 1;
#endif
#if defined(__AVX512F__)
  info["simd"] = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  info["simd"] = "avx2";
#else
  info["simd"] = "scalar";
#endif
#ifdef JSP_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

py::dict act_codes() {
  py::dict codes;
  for (int i = 0; i < jsp_fast::kNumActs; ++i) codes[jsp_fast::kActNames[i]] = i;
  return codes;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "jsp_fast compiled core: block-sparse CPU kernels (and CUDA kernels when built with them)";
  m.def("build_info", &build_info,
        "How this module was built: version (and where the build took it from), OpenMP, SIMD level, CUDA.");
  m.def("act_codes", &act_codes, "Activation name -> code, as csrc/common/act.h defines them.");
  jsp_fast::bind_all(m);
}
