// pybind11 registration of the block-sparse CPU kernels (csrc/cpu/bsr_kernels.h).
//
// Outputs are allocated by the caller. Everything a kernel trusts is checked here first (with
// bind/checks.h): dtypes (one float type per call, int64 tables), C-contiguity, shapes, and the look-up
// tables' contents (O(nnzb), so a corrupt plan raises instead of reading out of bounds). The GIL is
// released around the kernels.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bind/checks.h"
#include "bind/module.h"
#include "cpu/bsr_kernels.h"

namespace py = pybind11;

namespace jsp_fast {
namespace {

using namespace bind;  // the argument checks
using cpu::bsr::Layout;

const int64_t* idx(const py::handle& obj, int64_t len, const char* what) {
  return data<int64_t>(checked<int64_t>(obj, {len}, what));
}

// Holds the index arrays alive (they are borrowed from the caller) and the validated Layout.
struct Plan {
  Layout lay;
  py::array keep[6];
};

Plan make_plan(const py::array& values, py::handle row_ptr, py::handle col_idx, py::handle block_row,
               py::handle col_ptr, py::handle row_idx, py::handle perm, int64_t n, int64_t k) {
  if (values.ndim() != 3) fail("values has shape " + shape_str(values) + ", expected 3 dims [nnzb, bm, bk]");
  Plan p;
  Layout& L = p.lay;
  L.nnzb = values.shape(0);
  L.bm = values.shape(1);
  L.bk = values.shape(2);
  L.n = n;
  L.k = k;
  if (L.bm <= 0 || L.bk <= 0) fail("values has shape " + shape_str(values) + ", expected positive block dims");
  if (n <= 0 || k <= 0 || n % L.bm || k % L.bk)
    fail("[n, k] must be positive multiples of the block [" + std::to_string(L.bm) + ", " + std::to_string(L.bk) +
         "], got [" + std::to_string(n) + ", " + std::to_string(k) + "]");
  const int64_t nbr = n / L.bm, nbc = k / L.bk, nnzb = L.nnzb;
  L.row_ptr = idx(row_ptr, nbr + 1, "row_ptr");
  L.col_idx = idx(col_idx, nnzb, "col_idx");
  L.block_row = idx(block_row, nnzb, "block_row");
  L.col_ptr = idx(col_ptr, nbc + 1, "col_ptr");
  L.row_idx = idx(row_idx, nnzb, "row_idx");
  L.perm = idx(perm, nnzb, "perm");
  if (L.row_ptr[0] != 0 || L.row_ptr[nbr] != nnzb || L.col_ptr[0] != 0 || L.col_ptr[nbc] != nnzb)
    fail("row_ptr/col_ptr must start at 0 and end at nnzb = " + std::to_string(nnzb) + ", got row_ptr [" +
         std::to_string(L.row_ptr[0]) + " .. " + std::to_string(L.row_ptr[nbr]) + "], col_ptr [" +
         std::to_string(L.col_ptr[0]) + " .. " + std::to_string(L.col_ptr[nbc]) + "]");
  for (int64_t i = 0; i < nbr; ++i) {
    if (L.row_ptr[i + 1] < L.row_ptr[i]) fail("row_ptr must be non-decreasing, got a drop at " + std::to_string(i));
    for (int64_t e = L.row_ptr[i]; e < L.row_ptr[i + 1]; ++e)
      if (L.col_idx[e] < 0 || L.col_idx[e] >= nbc || L.block_row[e] != i)
        fail("col_idx/block_row out of range at entry " + std::to_string(e));
  }
  for (int64_t i = 0; i < nbc; ++i) {
    if (L.col_ptr[i + 1] < L.col_ptr[i]) fail("col_ptr must be non-decreasing, got a drop at " + std::to_string(i));
    for (int64_t e = L.col_ptr[i]; e < L.col_ptr[i + 1]; ++e)
      if (L.row_idx[e] < 0 || L.row_idx[e] >= nbr || L.perm[e] < 0 || L.perm[e] >= nnzb)
        fail("row_idx/perm out of range at entry " + std::to_string(e));
  }
  p.keep[0] = py::reinterpret_borrow<py::array>(row_ptr);
  p.keep[1] = py::reinterpret_borrow<py::array>(col_idx);
  p.keep[2] = py::reinterpret_borrow<py::array>(block_row);
  p.keep[3] = py::reinterpret_borrow<py::array>(col_ptr);
  p.keep[4] = py::reinterpret_borrow<py::array>(row_idx);
  p.keep[5] = py::reinterpret_borrow<py::array>(perm);
  return p;
}

// Dispatches on the values' dtype: fp32 and fp64 only.
template <typename F>
void by_dtype(const py::array& values, F&& f) {
  if (values.dtype().is(py::dtype::of<float>())) {
    f(float{});
  } else if (values.dtype().is(py::dtype::of<double>())) {
    f(double{});
  } else {
    fail("values has dtype " + std::string(py::str(values.dtype())) + "; the CPU kernels support float32 and float64");
  }
}

#define JSP_PLAN_ARGS                                                                                    \
  py::handle values, py::handle row_ptr, py::handle col_idx, py::handle block_row, py::handle col_ptr, \
      py::handle row_idx, py::handle perm, int64_t n, int64_t k
#define JSP_PLAN_FORWARD values, row_ptr, col_idx, block_row, col_ptr, row_idx, perm, n, k
#define JSP_PLAN_PYARGS                                                                               \
  py::arg("values"), py::arg("row_ptr"), py::arg("col_idx"), py::arg("block_row"), py::arg("col_ptr"), \
      py::arg("row_idx"), py::arg("perm"), py::arg("n"), py::arg("k")

// The checks every op starts with, in this order: values' dtype picks T (float32 or float64), the
// tables are validated against values' block shape and [n, k], and values must be a C-contiguous
// [nnzb, bm, bk] array of T. Then op(T{}, layout, values' data) checks its own arguments and runs.
template <typename Op>
void with_plan(JSP_PLAN_ARGS, Op&& op) {
  auto va = as_array(values, "values");
  by_dtype(va, [&](auto tag) {
    using T = decltype(tag);
    const Plan p = make_plan(va, row_ptr, col_idx, block_row, col_ptr, row_idx, perm, n, k);
    checked<T>(va, {-1, -1, -1}, "values");
    op(tag, p.lay, data<T>(va));
  });
}

void py_fwd(JSP_PLAN_ARGS, py::handle x, py::handle scale, py::handle bias, int act, py::handle y, int num_threads) {
  with_plan(JSP_PLAN_FORWARD, [&](auto tag, const Layout& lay, const auto* vp) {
    using T = decltype(tag);
    auto xa = checked<T>(x, {-1, k}, "x");
    const int64_t B = xa.shape(0);
    auto ya = checked<T>(y, {B, n}, "y", true);
    const T* sp = optional_data<T>(scale, {n}, "scale");
    const T* bp = optional_data<T>(bias, {n}, "bias");
    const Act a = to_act(act);
    py::gil_scoped_release release;
    cpu::bsr::fwd<T>(lay, vp, data<T>(xa), B, sp, bp, a, mutable_data<T>(ya), num_threads);
  });
}

void py_jvp(JSP_PLAN_ARGS, py::handle x, py::handle x_dot, py::handle scale, py::handle bias, int act, py::handle y,
            py::handle y_dot, int num_threads, py::handle ud) {
  with_plan(JSP_PLAN_FORWARD, [&](auto tag, const Layout& lay, const auto* vp) {
    using T = decltype(tag);
    auto xa = checked<T>(x, {-1, k}, "x");
    const int64_t B = xa.shape(0);
    auto xda = checked<T>(x_dot, {-1, B, k}, "x_dot");
    const int64_t ntan = xda.shape(0);
    auto ya = checked<T>(y, {B, n}, "y", true);
    auto yda = checked<T>(y_dot, {ntan, B, n}, "y_dot", true);
    const T* sp = optional_data<T>(scale, {n}, "scale");
    const T* bp = optional_data<T>(bias, {n}, "bias");
    const Act a = to_act(act);
    py::array uda;
    if (!ud.is_none()) uda = checked<T>(ud, {ntan, B, n}, "ud", true);
    T* udp = ud.is_none() ? nullptr : mutable_data<T>(uda);
    py::gil_scoped_release release;
    cpu::bsr::jvp<T>(lay, vp, data<T>(xa), data<T>(xda), ntan, B, sp, bp, a, mutable_data<T>(ya),
                     mutable_data<T>(yda), num_threads, udp);
  });
}

void py_t_matmul(JSP_PLAN_ARGS, py::handle g, py::handle gx, int num_threads) {
  with_plan(JSP_PLAN_FORWARD, [&](auto tag, const Layout& lay, const auto* vp) {
    using T = decltype(tag);
    auto ga = checked<T>(g, {-1, n}, "g");
    const int64_t B = ga.shape(0);
    auto gxa = checked<T>(gx, {B, k}, "gx", true);
    py::gil_scoped_release release;
    cpu::bsr::t_matmul<T>(lay, vp, data<T>(ga), B, mutable_data<T>(gxa), num_threads);
  });
}

// values is only read for its dtype and block shape here (the gradient does not depend on it).
// x2 (optional): the input rows after x's, so g's rows are [x; x2] without stacking them.
void py_weight_grad(JSP_PLAN_ARGS, py::handle g, py::handle x, py::handle gv, int num_threads, py::handle x2) {
  with_plan(JSP_PLAN_FORWARD, [&](auto tag, const Layout& lay, const auto*) {
    using T = decltype(tag);
    auto ga = checked<T>(g, {-1, n}, "g");
    const int64_t B = ga.shape(0);
    const T* x2p = nullptr;
    int64_t B1 = B;
    if (!x2.is_none()) {
      auto x1a = checked<T>(x, {-1, k}, "x");
      B1 = x1a.shape(0);
      if (B1 > B) fail("x has more rows than g");
      x2p = data<T>(checked<T>(x2, {B - B1, k}, "x2 (g's rows after x's)"));
    }
    auto xa = checked<T>(x, {B1, k}, "x");
    auto gva = checked<T>(gv, {lay.nnzb, lay.bm, lay.bk}, "gv", true);
    py::gil_scoped_release release;
    cpu::bsr::weight_grad<T>(lay, data<T>(ga), data<T>(xa), B, mutable_data<T>(gva), num_threads, x2p, B1);
  });
}

// The backward epilogue (no plan: elementwise over [B, n]); y's dtype picks T.
void py_bwd_epilogue(py::handle gy, py::handle gyd, py::handle y, py::handle ud, py::handle scale, int act,
                     py::handle G, py::handle GU, py::handle gbias, int num_threads) {
  auto y0 = as_array(y, "y");
  by_dtype(y0, [&](auto tag) {
    using T = decltype(tag);
    auto ya = checked<T>(y, {-1, -1}, "y");
    const int64_t B = ya.shape(0), n = ya.shape(1);
    const T* gyp = optional_data<T>(gy, {B, n}, "gy");
    int64_t ntan = 0;
    const T* gydp = nullptr;
    if (!gyd.is_none()) {
      auto a = checked<T>(gyd, {-1, B, n}, "gyd");
      ntan = a.shape(0);
      gydp = data<T>(a);
    }
    if (!gyp && !gydp) fail("bwd_epilogue needs gy or gyd (both are None)");
    const Act a = to_act(act);
    const T* udp = nullptr;
    if (ntan > 0 && cpu::bsr::act_has_second(a)) {
      if (ud.is_none()) fail(std::string("ud (x_dot W^T) is required for the jvp backward of ") + kActNames[act]);
      udp = data<T>(checked<T>(ud, {ntan, B, n}, "ud"));
    }
    const T* sp = optional_data<T>(scale, {n}, "scale");
    auto Ga = checked<T>(G, {(1 + ntan) * B, n}, "G", true);
    T* GUp = nullptr;
    if (!GU.is_none()) {
      auto g = checked<T>(GU, {(1 + ntan) * B, n}, "GU", true);
      GUp = mutable_data<T>(g);
    }
    T* gbp = nullptr;
    if (!gbias.is_none()) {
      auto g = checked<T>(gbias, {n}, "gbias", true);
      gbp = mutable_data<T>(g);
    }
    py::gil_scoped_release release;
    cpu::bsr::bwd_epilogue<T>(B, n, ntan, gyp, gydp, data<T>(ya), udp, sp, a, mutable_data<T>(Ga), GUp, gbp,
                              num_threads);
  });
}

}  // namespace

void bind_cpu_sparse(py::module_& m) {
  m.attr("bsr_rows_per_tile") = cpu::bsr::kRows;
  m.def("bsr_fwd", &py_fwd, JSP_PLAN_PYARGS, py::arg("x"), py::arg("scale"), py::arg("bias"), py::arg("act"),
        py::arg("y"), py::arg("num_threads") = 0,
        "y[B, n] = act(scale * (x W^T) + bias) for a block-sparse W (writes y).");
  m.def("bsr_jvp", &py_jvp, JSP_PLAN_PYARGS, py::arg("x"), py::arg("x_dot"), py::arg("scale"), py::arg("bias"),
        py::arg("act"), py::arg("y"), py::arg("y_dot"), py::arg("num_threads") = 0, py::arg("ud") = py::none(),
        "Value and T tangents in one pass over the weights (writes y [B, n], y_dot [T, B, n]; and ud [T, B, n] = "
        "x_dot W^T, the tangents before act' * scale, when given).");
  m.def("bsr_t_matmul", &py_t_matmul, JSP_PLAN_PYARGS, py::arg("g"), py::arg("gx"), py::arg("num_threads") = 0,
        "gx[B, k] = g W (input gradient; reads the transposed table).");
  m.def("bsr_weight_grad", &py_weight_grad, JSP_PLAN_PYARGS, py::arg("g"), py::arg("x"), py::arg("gv"),
        py::arg("num_threads") = 0, py::arg("x2") = py::none(),
        "gv[nnzb, bm, bk] = g^T [x; x2] on the kept blocks only (x2: optional rows after x's).");
  m.def("bsr_bwd_epilogue", &py_bwd_epilogue, py::arg("gy"), py::arg("gyd"), py::arg("y"), py::arg("ud"),
        py::arg("scale"), py::arg("act"), py::arg("G"), py::arg("GU"), py::arg("gbias"), py::arg("num_threads") = 0,
        "The backward's elementwise pass of fwd/jvp (writes G = [gpre; gyd*act'], GU = G*scale, gbias).");
}

}  // namespace jsp_fast
