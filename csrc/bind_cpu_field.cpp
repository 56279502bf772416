// pybind11 registration of the fused CPU field (csrc/cpu/field.h). Arguments arrive as NumPy views of
// CPU tensors (torch.Tensor.numpy(), zero-copy); every dtype, shape and contiguity is checked here
// before a pointer reaches the kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bind.h"
#include "cpu/field.h"

namespace py = pybind11;

namespace jsp_fast {
namespace {

using cpu::field::Act;
using cpu::field::FieldPlan;

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

void fail(const std::string& msg) { throw py::value_error(msg); }

template <typename T>
const T* vec_ptr(const py::handle& obj, int64_t n, const char* what, bool optional = false) {
  if (obj.is_none()) {
    if (optional) return nullptr;
    fail(std::string(what) + " must not be None");
  }
  if (!py::isinstance<Arr<T>>(obj)) fail(std::string(what) + " has the wrong dtype");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!(a.flags() & py::array::c_style)) fail(std::string(what) + " must be contiguous");
  if (a.ndim() != 1 || a.shape(0) != n)
    fail(std::string(what) + " must have shape [" + std::to_string(n) + "]");
  return static_cast<const T*>(a.data());
}

template <typename T>
py::array checked(const py::handle& obj, std::initializer_list<int64_t> shape, const char* what,
                  bool writeable) {
  if (!py::isinstance<py::array>(obj)) fail(std::string(what) + " must be an array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(std::string(what) + " has dtype " + std::string(py::str(a.dtype())) + ", expected " +
         std::string(py::str(py::dtype::of<T>())));
  if (!(a.flags() & py::array::c_style)) fail(std::string(what) + " must be C-contiguous");
  if (writeable && !a.writeable()) fail(std::string(what) + " must be writeable");
  if (a.ndim() != py::ssize_t(shape.size())) fail(std::string(what) + " has the wrong number of dims");
  int i = 0;
  for (int64_t s : shape) {
    if (a.shape(i) != s)
      fail(std::string(what) + ": dim " + std::to_string(i) + " is " + std::to_string(a.shape(i)) +
           ", expected " + std::to_string(s));
    ++i;
  }
  return a;
}

template <typename T>
void bind_plan(py::module_& m, const char* name) {
  using Plan = FieldPlan<T>;
  py::class_<Plan>(m, name,
                   "A whole concatsquash field packed for one-call evaluation (value and tangents).")
      .def(py::init<>())
      .def_property_readonly_static("panel", [](py::object) { return int(Plan::kPanel); })
      .def_property_readonly_static("rows", [](py::object) { return int(Plan::kRows); })
      .def_property_readonly("num_layers", &Plan::num_layers)
      .def_property_readonly("dim_in", &Plan::dim_in)
      .def_property_readonly("dim_out", &Plan::dim_out)
      .def("density", &Plan::density)
      .def("layer_kinds", &Plan::layer_kinds)
      .def(
          "add_layer",
          [](Plan& self, py::handle w, py::handle mask, py::handle gate_w, py::handle gate_b,
             py::handle shift_w, py::handle bias, int act) {
            if (act < 0 || act > 5) fail("act must be in 0..5");
            if (!py::isinstance<py::array>(w) || py::reinterpret_borrow<py::array>(w).ndim() != 2)
              fail("w must be a 2-d array");
            auto wa = py::reinterpret_borrow<py::array>(w);
            const int64_t n = wa.shape(0), k = wa.shape(1);
            if (n <= 0 || k <= 0) fail("w must be non-empty");
            if (self.num_layers() > 0 && self.dim_out() != k)
              fail("w has " + std::to_string(k) + " inputs but the previous layer has " +
                   std::to_string(self.dim_out()) + " outputs");
            auto wc = checked<T>(w, {n, k}, "w", false);
            const uint8_t* mp = nullptr;
            py::array mc;
            if (!mask.is_none()) {
              mc = checked<uint8_t>(mask, {n, k}, "mask", false);
              mp = static_cast<const uint8_t*>(mc.data());
            }
            self.add_layer(n, k, Act(act), static_cast<const T*>(wc.data()), mp, vec_ptr<T>(gate_w, n, "gate_w"),
                           vec_ptr<T>(gate_b, n, "gate_b"), vec_ptr<T>(shift_w, n, "shift_w"),
                           vec_ptr<T>(bias, n, "bias", true));
          },
          py::arg("w"), py::arg("mask"), py::arg("gate_w"), py::arg("gate_b"), py::arg("shift_w"),
          py::arg("bias"), py::arg("act"))
      .def(
          "eval",
          [](const Plan& self, double t, py::handle z, py::handle v, py::handle f, py::handle jv,
             int num_threads) {
            if (self.num_layers() == 0) fail("the plan has no layers");
            if (!py::isinstance<py::array>(z) || py::reinterpret_borrow<py::array>(z).ndim() != 2)
              fail("z must be a 2-d array");
            const int64_t B = py::reinterpret_borrow<py::array>(z).shape(0);
            const int64_t din = self.dim_in(), dout = self.dim_out();
            auto za = checked<T>(z, {B, din}, "z", false);
            auto fa = checked<T>(f, {B, dout}, "f", true);
            const T* vp = nullptr;
            T* jp = nullptr;
            int64_t ntan = 0;
            py::array va, ja;
            if (!v.is_none()) {
              if (jv.is_none()) fail("jv is required with v");
              if (din != dout) fail("tangents need a square field");
              if (!py::isinstance<py::array>(v) || py::reinterpret_borrow<py::array>(v).ndim() != 3)
                fail("v must be a 3-d array [T, B, dim]");
              ntan = py::reinterpret_borrow<py::array>(v).shape(0);
              va = checked<T>(v, {ntan, B, din}, "v", false);
              ja = checked<T>(jv, {ntan, B, dout}, "jv", true);
              vp = static_cast<const T*>(va.data());
              jp = static_cast<T*>(ja.mutable_data());
            }
            const T* zp = static_cast<const T*>(za.data());
            T* fp = static_cast<T*>(fa.mutable_data());
            py::gil_scoped_release release;
            self.eval(T(t), zp, B, vp, ntan, fp, jp, num_threads);
          },
          py::arg("t"), py::arg("z"), py::arg("v"), py::arg("f"), py::arg("jv"),
          py::arg("num_threads") = 0);
}

}  // namespace

void bind_cpu_field(py::module_& m) {
  bind_plan<float>(m, "FieldPlanF32");
  bind_plan<double>(m, "FieldPlanF64");
}

}  // namespace jsp_fast
