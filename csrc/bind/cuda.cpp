// pybind11 registration of the CUDA kernels (csrc/cuda/). Compiled in every build; its content only
// when CMake built the CUDA sources (JSP_FAST_WITH_CUDA), otherwise csrc/bind/stubs.cpp defines an
// empty bind_cuda(). The launcher (jsp_fast/sparse/_cuda.py) passes device pointers as integers
// with their sizes and the CUDA stream; everything that can be checked without reading device memory
// is checked here before a pointer reaches the kernel.
#ifdef JSP_FAST_WITH_CUDA

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "bind/checks.h"
#include "bind/module.h"
#include "cuda/fused_mlp.h"

namespace py = pybind11;

namespace jsp_fast {
namespace {

using bind::fail;
using cuda::fused::FusedMlpParams;
using cuda::fused::LayerParams;

const std::set<std::string>& layer_keys() {
  static const std::set<std::string> keys = {"n",      "k",       "bm",    "bk",   "nnzb",   "act",    "values",
                                             "row_ptr", "col_idx", "scale", "bias", "gate_w", "gate_b", "shift_w"};
  return keys;
}

int64_t get_int(const py::dict& d, const char* key, const std::string& at, int64_t lo, int64_t hi) {
  if (!d.contains(key)) fail(at + "missing key '" + key + "'");
  py::handle h = d[key];
  if (!py::isinstance<py::int_>(h) || py::isinstance<py::bool_>(h))
    fail(at + "'" + key + "' must be an int, got " + bind::type_name(h));
  const int64_t v = h.cast<int64_t>();
  if (v < lo || v > hi)
    fail(at + "'" + key + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
         std::to_string(v));
  return v;
}

// A device pointer given as a Python int (0 or None: null).
template <class T>
T* get_ptr(py::handle h, const std::string& what) {
  if (h.is_none()) return nullptr;
  if (!py::isinstance<py::int_>(h) || py::isinstance<py::bool_>(h))
    fail(what + " must be a pointer (int) or None, got " + bind::type_name(h));
  const py::int_ i = py::reinterpret_borrow<py::int_>(h);
  if (i < py::int_(0)) fail(what + " must not be negative");
  const uint64_t v = i.cast<uint64_t>();
  constexpr uint64_t align = std::is_void<T>::value ? 1 : alignof(std::conditional_t<std::is_void<T>::value, char, T>);
  if (v % align != 0) fail(what + " is not aligned for its element type");
  return reinterpret_cast<T*>(static_cast<uintptr_t>(v));
}

template <class T>
T* dict_ptr(const py::dict& d, const char* key, const std::string& at) {
  if (!d.contains(key)) return nullptr;
  return get_ptr<T>(d[key], at + "'" + key + "'");
}

LayerParams parse_layer(py::handle obj, int index) {
  const std::string at = "layer " + std::to_string(index) + ": ";
  if (!py::isinstance<py::dict>(obj)) fail(at + "must be a dict, got " + bind::type_name(obj));
  const py::dict d = py::reinterpret_borrow<py::dict>(obj);
  for (auto item : d) {
    if (!py::isinstance<py::str>(item.first)) fail(at + "keys must be strings");
    const std::string key = item.first.cast<std::string>();
    if (!layer_keys().count(key)) fail(at + "unknown key '" + key + "'");
  }
  constexpr int64_t W = cuda::fused::kMaxWidth;
  LayerParams L;
  L.n = int(get_int(d, "n", at, 1, W));
  L.k = int(get_int(d, "k", at, 1, W));
  L.bm = int(get_int(d, "bm", at, 1, L.n));
  L.bk = int(get_int(d, "bk", at, 1, L.k));
  if (L.n % L.bm || L.k % L.bk)
    fail(at + "block " + std::to_string(L.bm) + "x" + std::to_string(L.bk) + " does not tile the weight " +
         std::to_string(L.n) + "x" + std::to_string(L.k));
  L.nnzb = int(get_int(d, "nnzb", at, 0, int64_t(L.n / L.bm) * (L.k / L.bk)));
  L.act = int(get_int(d, "act", at, 0, kNumActs - 1));
  L.values = dict_ptr<const float>(d, "values", at);
  L.row_ptr = dict_ptr<const int>(d, "row_ptr", at);
  L.col_idx = dict_ptr<const int>(d, "col_idx", at);
  L.scale = dict_ptr<const float>(d, "scale", at);
  L.bias = dict_ptr<const float>(d, "bias", at);
  L.gate_w = dict_ptr<const float>(d, "gate_w", at);
  L.gate_b = dict_ptr<const float>(d, "gate_b", at);
  L.shift_w = dict_ptr<const float>(d, "shift_w", at);
  return L;
}

void fused_mlp(py::sequence layers, py::handle x, py::handle x_dot, py::handle y, py::handle y_dot, int64_t batch,
               int64_t ntan, double t, py::handle t_dev, py::handle stream) {
  FusedMlpParams p;
  const auto nl = py::len(layers);
  if (nl < 1 || nl > size_t(cuda::fused::kMaxLayers))
    fail("layers must hold 1 to " + std::to_string(cuda::fused::kMaxLayers) + " layers, got " + std::to_string(nl));
  p.num_layers = int(nl);
  for (size_t l = 0; l < nl; ++l) p.layers[l] = parse_layer(layers[l], int(l));
  if (batch < 0) fail("batch must be >= 0, got " + std::to_string(batch));
  if (ntan < 0 || ntan > (1 << 20)) fail("ntan must be in [0, 2^20], got " + std::to_string(ntan));
  if (!(t == t) || t > std::numeric_limits<float>::max() || t < -std::numeric_limits<float>::max())
    fail("t must be a finite float32 value, got " + std::to_string(t));
  p.batch = batch;
  p.ntan = int(ntan);
  p.t = float(t);
  p.t_dev = get_ptr<const float>(t_dev, "t_dev");
  p.x = get_ptr<const float>(x, "x");
  p.x_dot = get_ptr<const float>(x_dot, "x_dot");
  p.y = get_ptr<float>(y, "y");
  p.y_dot = get_ptr<float>(y_dot, "y_dot");
  if (ntan == 0 && (p.x_dot || p.y_dot)) fail("x_dot and y_dot must be None when ntan == 0");
  p.stream = get_ptr<void>(stream, "stream");
  std::string err = cuda::fused::validate(p);
  if (!err.empty()) fail(err);
  {
    py::gil_scoped_release release;
    err = cuda::fused::launch_fused_mlp(p);
  }
  if (!err.empty()) throw std::runtime_error(err);
}

py::dict fused_mlp_plan(int64_t batch, int64_t ntan, int64_t max_width) {
  if (batch < 0 || ntan < 0 || ntan > (1 << 20))
    fail("batch and ntan must be >= 0 (ntan <= 2^20), got " + std::to_string(batch) + " and " + std::to_string(ntan));
  if (max_width < 1 || max_width > cuda::fused::kMaxWidth)
    fail("max_width must be in [1, " + std::to_string(cuda::fused::kMaxWidth) + "], got " + std::to_string(max_width));
  FusedMlpParams p;
  p.num_layers = 1;
  p.layers[0].n = p.layers[0].k = int(max_width);
  p.batch = batch;
  p.ntan = int(ntan);
  const cuda::fused::TilePlan pl = cuda::fused::device_plan(p);
  if (pl.threads == 0) throw std::runtime_error("no usable CUDA device (cudaGetDevice failed)");
  py::dict d;
  d["tb"] = pl.tb;
  d["tc"] = pl.tc;
  d["chunks"] = pl.chunks;
  d["grid_x"] = pl.grid_x;
  d["threads"] = pl.threads;
  d["stride"] = pl.stride;
  d["smem_bytes"] = pl.smem_bytes;
  return d;
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("cuda_fused_mlp", &fused_mlp, py::arg("layers"), py::arg("x"), py::arg("x_dot"), py::arg("y"),
        py::arg("y_dot"), py::arg("batch"), py::arg("ntan"), py::arg("t") = 0.0, py::arg("t_dev") = py::none(),
        py::arg("stream") = py::none(),
        "Fused block-sparse MLP on the GPU: value and ntan tangents of every layer in one launch.\n"
        "layers: dicts of sizes (n, k, bm, bk, nnzb, act) and device pointers as ints (values, row_ptr,\n"
        "col_idx; optional scale, bias, gate_w, gate_b, shift_w). x [batch, k0], x_dot [ntan, batch, k0],\n"
        "y [batch, n_last], y_dot [ntan, batch, n_last] float32 device pointers; t or t_dev (device float);\n"
        "stream: a cudaStream_t as int (None: the default stream). Asynchronous.");
  m.def("cuda_fused_mlp_plan", &fused_mlp_plan, py::arg("batch"), py::arg("ntan"), py::arg("max_width"),
        "The tile plan the fused MLP would use on the current device (tb, tc, chunks, smem_bytes, ...).");
  m.attr("CUDA_FUSED_MAX_WIDTH") = cuda::fused::kMaxWidth;
  m.attr("CUDA_FUSED_MAX_LAYERS") = cuda::fused::kMaxLayers;
}

}  // namespace jsp_fast

#endif  // JSP_FAST_WITH_CUDA
