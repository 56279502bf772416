// The argument checks every binding runs before a pointer reaches a kernel (the one copy).
//
// Arrays arrive as NumPy views of CPU tensors (torch.Tensor.numpy(): zero copy). Every error is a
// ValueError that names the argument, says what was expected and what was given:
//   "<what> has <property> <given>, expected <expected>"   (dtype, shape)
//   "<what> must be <requirement>, got <given>"             (kind, range)
// Some wordings are pinned by tests (tests/test_sparse_ops.py, tests/test_field.py).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/act.h"

namespace jsp_fast {
namespace bind {

namespace py = pybind11;

[[noreturn]] inline void fail(const std::string& msg) { throw py::value_error("jsp_fast._C: " + msg); }

inline std::string type_name(const py::handle& obj) { return std::string(py::str(py::type::of(obj).attr("__name__"))); }

inline std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i)
    s += (i ? ", " : "") + (dims[i] < 0 ? std::string("*") : std::to_string(dims[i]));
  return s + "]";
}

inline std::string shape_str(const py::array& a) {
  return dims_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

inline py::array as_array(const py::handle& obj, const std::string& what) {
  if (!py::isinstance<py::array>(obj))
    fail(what + " must be a NumPy array (a CPU tensor's .numpy()), got " + type_name(obj));
  return py::reinterpret_borrow<py::array>(obj);
}

// The array `obj` after checking its dtype (T), C-contiguity, writeability when asked, and shape
// (-1: any size in that dim). The caller's argument keeps the array alive for the call.
template <typename T>
py::array checked(const py::handle& obj, const std::vector<int64_t>& shape, const std::string& what,
                  bool writeable = false) {
  auto a = as_array(obj, what);
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(what + " has dtype " + std::string(py::str(a.dtype())) + ", expected " +
         std::string(py::str(py::dtype::of<T>())));
  if (!(a.flags() & py::array::c_style)) fail(what + " must be C-contiguous");
  if (writeable && !a.writeable()) fail(what + " must be writeable");
  if (a.ndim() != py::ssize_t(shape.size()))
    fail(what + " has shape " + shape_str(a) + ", expected " + std::to_string(shape.size()) + " dims " +
         dims_str(shape));
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0 && a.shape(py::ssize_t(i)) != shape[i])
      fail(what + " has shape " + shape_str(a) + ", expected " + dims_str(shape) + " (dim " + std::to_string(i) + ")");
  return a;
}

template <typename T>
const T* data(const py::array& a) {
  return static_cast<const T*>(a.data());
}
template <typename T>
T* mutable_data(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}

// A checked read-only input; None gives nullptr (an optional per-output vector).
template <typename T>
const T* optional_data(const py::handle& obj, const std::vector<int64_t>& shape, const std::string& what) {
  if (obj.is_none()) return nullptr;
  return data<T>(checked<T>(obj, shape, what));
}

inline Act to_act(int act) {
  if (act < 0 || act >= kNumActs) {
    std::string names;
    for (int i = 0; i < kNumActs; ++i) names += (i ? ", " : "") + std::string(kActNames[i]);
    fail("act must be in 0.." + std::to_string(kNumActs - 1) + " (" + names + "), got " + std::to_string(act));
  }
  return Act(act);
}

}  // namespace bind
}  // namespace jsp_fast
