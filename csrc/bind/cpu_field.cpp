// pybind11 registration of the fused CPU field (csrc/cpu/field.h). Every dtype, shape and contiguity
// is checked here (with bind/checks.h) before a pointer reaches the kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bind/checks.h"
#include "bind/module.h"
#include "cpu/field.h"

namespace py = pybind11;

namespace jsp_fast {
namespace {

using namespace bind;  // the argument checks
using cpu::field::FieldPlan;

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
            const Act a = to_act(act);
            auto wa = checked<T>(w, {-1, -1}, "w");
            const int64_t n = wa.shape(0), k = wa.shape(1);
            if (n <= 0 || k <= 0) fail("w must be non-empty, got shape " + shape_str(wa));
            if (self.num_layers() > 0 && self.dim_out() != k)
              fail("w has " + std::to_string(k) + " inputs but the previous layer has " +
                   std::to_string(self.dim_out()) + " outputs");
            const uint8_t* mp = optional_data<uint8_t>(mask, {n, k}, "mask");
            // gate_w, gate_b and shift_w are required (a concatsquash layer); bias is optional.
            const T* gw = data<T>(checked<T>(gate_w, {n}, "gate_w"));
            const T* gb = data<T>(checked<T>(gate_b, {n}, "gate_b"));
            const T* sw = data<T>(checked<T>(shift_w, {n}, "shift_w"));
            self.add_layer(n, k, a, data<T>(wa), mp, gw, gb, sw, optional_data<T>(bias, {n}, "bias"));
          },
          py::arg("w"), py::arg("mask"), py::arg("gate_w"), py::arg("gate_b"), py::arg("shift_w"),
          py::arg("bias"), py::arg("act"))
      .def(
          "eval",
          [](const Plan& self, double t, py::handle z, py::handle v, py::handle f, py::handle jv,
             int num_threads) {
            if (self.num_layers() == 0) fail("the plan has no layers: call add_layer first");
            const int64_t din = self.dim_in(), dout = self.dim_out();
            auto za = checked<T>(z, {-1, din}, "z");
            const int64_t B = za.shape(0);
            auto fa = checked<T>(f, {B, dout}, "f", true);
            const T* vp = nullptr;
            T* jp = nullptr;
            int64_t ntan = 0;
            py::array ja;
            if (!v.is_none()) {
              if (jv.is_none()) fail("jv is required with v, got None");
              if (din != dout)
                fail("tangents need a square field, got dim_in " + std::to_string(din) + " and dim_out " +
                     std::to_string(dout));
              auto va = checked<T>(v, {-1, B, din}, "v");
              ntan = va.shape(0);
              ja = checked<T>(jv, {ntan, B, dout}, "jv", true);
              vp = data<T>(va);
              jp = mutable_data<T>(ja);
            }
            const T* zp = data<T>(za);
            T* fp = mutable_data<T>(fa);
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
