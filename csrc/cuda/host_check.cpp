// Host-side check driver for the fused CUDA MLP: runs the kernel's own CTA program (fused_mlp_math.h)
// on the CPU, one phase at a time for every thread of the CTA, over every CTA of the launch grid. Not
// part of the module (CMake compiles csrc/cuda/*.cu only); built by tests/test_cuda_fused.py and
// .ci/check_cuda with a plain C++17 compiler.
//
//   host_check run SPEC FLOATS INTS OUT   evaluate one network (formats below), write y then y_dot
//   host_check plan                       print the default tile plans (dynamic shared memory)
//   host_check validate                   print validate()'s message for a set of bad parameters
//
// SPEC (whitespace-separated): num_layers batch ntan t smem_budget num_sms force_generic, then per
// layer: n k bm bk nnzb act has_scale has_bias has_gate has_gate_b has_shift_w.
// FLOATS (raw float32): x [B*k0], x_dot [T*B*k0], then per layer values [nnzb*bm*bk], then scale,
// bias, gate_w, gate_b, shift_w [n] each where present. INTS (raw int32): per layer row_ptr [n/bm+1],
// col_idx [nnzb]. OUT (raw float32): y [B*n_last], y_dot [T*B*n_last].
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "fused_mlp.h"
#include "fused_mlp_math.h"
#include "static_switch.h"

using namespace jsp_fast::cuda::fused;

namespace {

struct HostExec {
  int threads;
  template <class F>
  void operator()(F&& f) const {
    for (int tid = 0; tid < threads; ++tid) f(tid, threads);
  }
  void sync() const {}
};

template <class T>
std::vector<T> read_all(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path);
    std::exit(1);
  }
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

// 64-byte aligned copies (the vectorised path needs 16-byte aligned values, as on the device).
struct Pool {
  std::vector<void*> blocks;
  template <class T>
  T* copy(const T* src, size_t n) {
    void* p = std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64 + 1) * 64);
    std::memcpy(p, src, n * sizeof(T));
    blocks.push_back(p);
    return static_cast<T*>(p);
  }
  ~Pool() {
    for (void* p : blocks) std::free(p);
  }
};

int run(const char* spec_path, const char* floats_path, const char* ints_path, const char* out_path) {
  std::ifstream spec(spec_path);
  FusedMlpParams p;
  int64_t batch;
  int budget, sms, force_generic;
  spec >> p.num_layers >> batch >> p.ntan >> p.t >> budget >> sms >> force_generic;
  if (!spec || p.num_layers < 1 || p.num_layers > kMaxLayers) {
    std::fprintf(stderr, "bad spec header\n");
    return 1;
  }
  p.batch = batch;
  const std::vector<float> fl = read_all<float>(floats_path);
  const std::vector<int> in = read_all<int>(ints_path);
  size_t fo = 0, io = 0;
  Pool pool;
  auto take_f = [&](size_t n) -> const float* {
    if (fo + n > fl.size()) {
      std::fprintf(stderr, "FLOATS too short\n");
      std::exit(1);
    }
    const float* r = pool.copy(fl.data() + fo, n);
    fo += n;
    return r;
  };
  auto take_i = [&](size_t n) -> const int* {
    if (io + n > in.size()) {
      std::fprintf(stderr, "INTS too short\n");
      std::exit(1);
    }
    const int* r = pool.copy(in.data() + io, n);
    io += n;
    return r;
  };
  int flags[kMaxLayers][5];
  for (int l = 0; l < p.num_layers; ++l) {
    LayerParams& L = p.layers[l];
    spec >> L.n >> L.k >> L.bm >> L.bk >> L.nnzb >> L.act;
    for (int f = 0; f < 5; ++f) spec >> flags[l][f];
  }
  if (!spec) {
    std::fprintf(stderr, "bad spec layers\n");
    return 1;
  }
  const int k0 = p.layers[0].k, nl = p.layers[p.num_layers - 1].n;
  p.x = take_f(size_t(batch) * k0);
  p.x_dot = p.ntan ? take_f(size_t(p.ntan) * batch * k0) : nullptr;
  for (int l = 0; l < p.num_layers; ++l) {
    LayerParams& L = p.layers[l];
    L.values = take_f(size_t(L.nnzb) * L.bm * L.bk);
    if (flags[l][0]) L.scale = take_f(L.n);
    if (flags[l][1]) L.bias = take_f(L.n);
    if (flags[l][2]) L.gate_w = take_f(L.n);
    if (flags[l][3]) L.gate_b = take_f(L.n);
    if (flags[l][4]) L.shift_w = take_f(L.n);
    L.row_ptr = take_i(size_t(L.n / std::max(L.bm, 1)) + 1);
    L.col_idx = take_i(size_t(L.nnzb));
  }
  std::vector<float> y(size_t(batch) * nl, std::nanf("")), yd(size_t(p.ntan) * batch * nl, std::nanf(""));
  p.y = y.data();
  p.y_dot = p.ntan ? yd.data() : nullptr;
  const std::string err = validate(p);
  if (!err.empty()) {
    std::fprintf(stderr, "validate: %s\n", err.c_str());
    return 2;
  }
  prepare(p);
  if (force_generic)
    for (int l = 0; l < p.num_layers; ++l) p.layers[l].vec = 0;
  const int mw = max_width(p);
  const TilePlan plan = plan_tiles(p.batch, p.ntan, mw, threads_for_width(mw), budget, sms);
  if (plan.tb == 0) {
    std::fprintf(stderr, "plan: nothing fits\n");
    return 3;
  }
  std::printf("plan tb=%d tc=%d chunks=%d grid_x=%lld threads=%d smem=%d vec=", plan.tb, plan.tc, plan.chunks,
              (long long)plan.grid_x, plan.threads, plan.smem_bytes);
  for (int l = 0; l < p.num_layers; ++l) std::printf("%d", p.layers[l].vec);
  std::printf(" act=%d\n", int(kernel_act(p)));
  std::vector<float> smem(plan.smem_bytes / sizeof(float) + 4);
  float* base = smem.data();
  while (reinterpret_cast<uintptr_t>(base) % 16) ++base;
  HostExec exec{plan.threads};
  for (int by = 0; by < plan.chunks; ++by)
    for (int64_t bx = 0; bx < plan.grid_x; ++bx) {
      std::fill(smem.begin(), smem.end(), std::nanf(""));  // nothing may depend on stale shared memory
      ACT_SWITCH(kernel_act(p), A, [&] {
        Cta c = make_cta(p, plan, bx, by, base);
        cta_program<A>(p, c, exec);
      });
    }
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size() * sizeof(float)));
  out.write(reinterpret_cast<const char*>(yd.data()), std::streamsize(yd.size() * sizeof(float)));
  return out ? 0 : 1;
}

int plan() {
  std::printf("%-6s %-5s %-4s %-4s %-7s %-10s %s\n", "width", "ntan", "tb", "tc", "chunks", "smem_B",
              "threads");
  const int widths[] = {64, 128, 256, 512};
  const int tans[] = {0, 1, 2, 16, 64};
  for (int w : widths)
    for (int t : tans) {
      const TilePlan pl = plan_tiles(1 << 16, t, w, threads_for_width(w), kDefaultSmemBudget, 132);
      std::printf("%-6d %-5d %-4d %-4d %-7d %-10d %d\n", w, t, pl.tb, pl.tc, pl.chunks, pl.smem_bytes, pl.threads);
      if (pl.tb == 0 || pl.smem_bytes > kDefaultSmemBudget) return 1;
    }
  return 0;
}

int validate_cases() {
  static float buf[64];
  static int ibuf[64];
  auto base = [&] {
    FusedMlpParams p;
    p.num_layers = 2;
    p.batch = 3;
    p.ntan = 1;
    p.x = p.x_dot = buf;
    p.y = p.y_dot = buf;
    for (int l = 0; l < 2; ++l) {
      LayerParams& L = p.layers[l];
      L.n = 8, L.k = 8, L.bm = 4, L.bk = 4, L.nnzb = 1, L.act = 1;
      L.values = buf, L.row_ptr = ibuf, L.col_idx = ibuf;
    }
    return p;
  };
  struct Case {
    const char* name;
    void (*edit)(FusedMlpParams&);
  };
  const Case cases[] = {
      {"ok", [](FusedMlpParams&) {}},
      {"no_layers", [](FusedMlpParams& p) { p.num_layers = 0; }},
      {"too_many_layers", [](FusedMlpParams& p) { p.num_layers = kMaxLayers + 1; }},
      {"neg_batch", [](FusedMlpParams& p) { p.batch = -1; }},
      {"neg_ntan", [](FusedMlpParams& p) { p.ntan = -1; }},
      {"too_wide", [](FusedMlpParams& p) { p.layers[0].n = 1024; }},
      {"block_not_tiling", [](FusedMlpParams& p) { p.layers[0].bm = 3; }},
      {"nnzb_too_big", [](FusedMlpParams& p) { p.layers[0].nnzb = 5; }},
      {"bad_act", [](FusedMlpParams& p) { p.layers[1].act = 6; }},
      {"null_row_ptr", [](FusedMlpParams& p) { p.layers[0].row_ptr = nullptr; }},
      {"null_values", [](FusedMlpParams& p) { p.layers[0].values = nullptr; }},
      {"scale_and_gate", [](FusedMlpParams& p) { p.layers[0].scale = buf, p.layers[0].gate_w = buf; }},
      {"shift_without_gate", [](FusedMlpParams& p) { p.layers[0].shift_w = buf; }},
      {"chain", [](FusedMlpParams& p) { p.layers[1].k = 4, p.layers[1].nnzb = 1; }},
      {"null_x", [](FusedMlpParams& p) { p.x = nullptr; }},
      {"null_x_dot", [](FusedMlpParams& p) { p.x_dot = nullptr; }},
      {"misaligned", [](FusedMlpParams& p) { p.y = reinterpret_cast<float*>(reinterpret_cast<char*>(buf) + 2); }},
  };
  for (const Case& c : cases) {
    FusedMlpParams p = base();
    c.edit(p);
    const std::string e = validate(p);
    std::printf("%s\t%s\n", c.name, e.empty() ? "OK" : e.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 6 && std::string(argv[1]) == "run") return run(argv[2], argv[3], argv[4], argv[5]);
  if (argc == 2 && std::string(argv[1]) == "plan") return plan();
  if (argc == 2 && std::string(argv[1]) == "validate") return validate_cases();
  std::fprintf(stderr, "usage: host_check run SPEC FLOATS INTS OUT | plan | validate\n");
  return 64;
}
