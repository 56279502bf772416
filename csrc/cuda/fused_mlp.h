// Fused block-sparse MLP (a whole concatsquash ODEnet) for NVIDIA GPUs: the torch-free interface.
//
// One kernel launch evaluates every layer of the field for a batch tile, the value f and T tangents
// J·v together, with the tile's activations kept in shared memory from the first layer to the last
// (tiny-cuda-nn's fully fused MLP, for widths <= kMaxWidth). Per layer l, with W the block-sparse
// weight (BSR: values [nnzb, bm, bk] row-major per block, block row_ptr [n/bm + 1], col_idx [nnzb]):
//
//   pre   = scale ⊙ (x Wᵀ) + shift,        y   = act(pre)
//   pre_v = scale ⊙ (x_v Wᵀ),              y_v = act'(pre) ⊙ pre_v      for each tangent v
//
// scale/shift come either from plain vectors (scale, bias; null means 1 and 0), or, for concatsquash
// layers, from the time t and the hyper-layer vectors, computed in the kernel:
//   scale = sigmoid(gate_w * t + gate_b),  shift = bias ⊙ scale + shift_w * t.
//
// This header is plain C++17 (no CUDA, no torch): the pybind11 binding (csrc/bind/cuda.cpp), the
// kernel (fused_mlp.cu) and the host-side check driver (host_check.cpp) all include it. Pointers are
// device pointers for the launcher; the host driver passes host pointers to the same math.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// Relative, so this directory compiles on its own (tests build host_check.cpp with -Icsrc/cuda only).
#include "../common/act.h"

namespace jsp_fast {
namespace cuda {
namespace fused {

// Activation codes: jsp_fast::Act (csrc/common/act.h). The kernel is instantiated per code, as an int
// template parameter: kActDynamic, the first code past the shared ones, is internal to this kernel and
// never crosses the binding (the instantiation used when hidden layers mix several activations, a
// switch per element). An int, not an Act: nvcc's host stubs cannot spell an enum template argument
// that is no enumerator.
inline constexpr int kActDynamic = kNumActs;

constexpr int kMaxLayers = 16;
constexpr int kMaxWidth = 512;
// Micro-tile of one thread: kTileRows rows (batch rows, or tangent rows) x kTileCols outputs on the
// vectorised path (needs bm % kTileCols == 0, bk % 4 == 0 and 16-byte aligned values); the generic
// path (any bm, bk) computes kTileRows x 1.
constexpr int kTileRows = 4;
constexpr int kTileCols = 4;
// Shared memory the tile planner aims for per CTA: two CTAs per H100/H200 SM (228 KB each).
constexpr int kDefaultSmemBudget = 112 * 1024;

// Width tiers (WIDTH_SWITCH in static_switch.h): threads per CTA by the widest layer.
constexpr int threads_for_width(int max_width) { return max_width <= 128 ? 128 : 256; }

struct LayerParams {
  int n = 0, k = 0;    // outputs, inputs
  int bm = 0, bk = 0;  // block shape; n % bm == 0, k % bk == 0
  int nnzb = 0;        // kept blocks
  int act = 0;         // Act code; the last layer of an ODEnet uses 0 (none)
  const float* values = nullptr;   // [nnzb, bm, bk]
  const int* row_ptr = nullptr;    // [n / bm + 1]
  const int* col_idx = nullptr;    // [nnzb], block columns in [0, k / bk)
  const float* scale = nullptr;    // [n] or null (1); not with gate_w
  const float* bias = nullptr;     // [n] or null (0)
  const float* gate_w = nullptr;   // [n] or null: concatsquash mode when set
  const float* gate_b = nullptr;   // [n] or null (0); concatsquash only
  const float* shift_w = nullptr;  // [n] or null (0); concatsquash only
  int vec = 0;                     // set by prepare(): 1 where the vectorised path applies
};

struct FusedMlpParams {
  int num_layers = 0;
  LayerParams layers[kMaxLayers];
  int64_t batch = 0;  // B
  int ntan = 0;       // T (0: value only)
  float t = 0.f;      // time, for concatsquash layers
  const float* t_dev = nullptr;  // or a device scalar holding t (no host sync; graph-capturable)
  const float* x = nullptr;      // [B, k_0]
  const float* x_dot = nullptr;  // [T, B, k_0]
  float* y = nullptr;            // [B, n_last]
  float* y_dot = nullptr;        // [T, B, n_last]
  void* stream = nullptr;        // cudaStream_t (null: the legacy default stream)
};

// How a launch is cut: grid (grid_x batch tiles of tb rows) x (chunks of tc tangents). Each CTA holds
// (1 + tc) * tb rows of activations in two ping-pong buffers of `stride` floats per row.
struct TilePlan {
  int tb = 0, tc = 0, chunks = 0, threads = 0, stride = 0, width = 0, smem_bytes = 0;
  int64_t grid_x = 0;
};

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

inline int max_width(const FusedMlpParams& p) {
  int w = 1;
  for (int l = 0; l < p.num_layers; ++l) {
    if (p.layers[l].n > w) w = p.layers[l].n;
    if (p.layers[l].k > w) w = p.layers[l].k;
  }
  return w;
}

inline std::size_t plan_smem_bytes(int width, int stride, int tb, int tc) {
  // two activation buffers of (1 + tc) * tb rows, plus the layer's scale and shift vectors
  return (2 * std::size_t(1 + tc) * std::size_t(tb) * std::size_t(stride) + 2 * std::size_t(width)) *
         sizeof(float);
}

// Choose the batch tile (tb rows, a power of two in [kTileRows, 64]) and tangents per CTA (tc) for a
// shared-memory budget: as many tangents as fit with tb >= 16, else chunks of tangents (each chunk's
// CTAs recompute the value rows; only chunk 0 writes y); then halve tb while there are fewer than two
// CTAs per SM. tb == 0 in the result means nothing fits.
inline TilePlan plan_tiles(int64_t batch, int ntan, int max_w, int threads, int smem_budget, int num_sms) {
  TilePlan pl;
  pl.threads = threads;
  pl.width = round_up(max_w < 1 ? 1 : max_w, 4);
  pl.stride = round_up(pl.width, 32) + 4;  // +4 floats: rows of a float4 column land in other banks
  const std::size_t per_row = 2 * std::size_t(pl.stride) * sizeof(float);
  const std::size_t fixed = 2 * std::size_t(pl.width) * sizeof(float);
  if (smem_budget <= 0 || std::size_t(smem_budget) < fixed + 2 * kTileRows * per_row) return pl;
  const int rows = int((std::size_t(smem_budget) - fixed) / per_row);
  int tb = 0, tc = 0;
  if (ntan == 0) {
    for (tb = 64; tb > kTileRows && tb > rows; tb /= 2) {}
  } else if ((1 + ntan) * 16 <= rows) {
    tc = ntan;
    for (tb = 64; (1 + tc) * tb > rows; tb /= 2) {}
  } else {
    for (tb = 16; tb > kTileRows && 2 * tb > rows; tb /= 2) {}
    tc = rows / tb - 1;
    if (tc > ntan) tc = ntan;
  }
  if (tb < kTileRows || (ntan > 0 && tc < 1)) return pl;
  const int chunks = ntan == 0 ? 1 : (ntan + tc - 1) / tc;
  const int64_t min_ctas = 2 * int64_t(num_sms > 0 ? num_sms : 1);
  while (tb > 8 && ((batch + tb - 1) / tb) * chunks < min_ctas) tb /= 2;
  pl.tb = tb;
  pl.tc = tc;
  pl.chunks = chunks;
  pl.grid_x = (batch + tb - 1) / tb;
  pl.smem_bytes = int(plan_smem_bytes(pl.width, pl.stride, tb, tc));
  return pl;
}

// The activation the kernel is instantiated for: None when no layer has one, the one used when all
// agree, kActDynamic when hidden layers mix activations.
inline int kernel_act(const FusedMlpParams& p) {
  int a = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    const int al = p.layers[l].act;
    if (al == 0) continue;
    if (a == 0) a = al;
    else if (a != al) return kActDynamic;
  }
  return a;
}

// Marks the layers that can use the vectorised path.
inline void prepare(FusedMlpParams& p) {
  for (int l = 0; l < p.num_layers; ++l) {
    LayerParams& L = p.layers[l];
    const bool aligned = L.nnzb == 0 || (reinterpret_cast<std::uintptr_t>(L.values) % 16) == 0;
    L.vec = (L.bm % kTileCols == 0 && L.bk % 4 == 0 && aligned) ? 1 : 0;
  }
}

// Every check that can be made without reading device memory. Empty string: valid. (Index contents
// are not read; the kernel clamps row_ptr to [0, nnzb] and skips block columns out of range, so bad
// indices give wrong numbers, never out-of-bounds accesses.)
inline std::string validate(const FusedMlpParams& p) {
  using std::to_string;
  auto misaligned = [](const void* q, std::size_t a) {
    return (reinterpret_cast<std::uintptr_t>(q) % a) != 0;
  };
  if (p.num_layers < 1 || p.num_layers > kMaxLayers)
    return "num_layers must be in [1, " + to_string(kMaxLayers) + "], got " + to_string(p.num_layers);
  if (p.batch < 0) return "batch must be >= 0, got " + to_string(p.batch);
  if (p.batch > (int64_t(1) << 40)) return "batch is too large";
  if (p.ntan < 0) return "ntan must be >= 0, got " + to_string(p.ntan);
  for (int l = 0; l < p.num_layers; ++l) {
    const LayerParams& L = p.layers[l];
    const std::string at = "layer " + to_string(l) + ": ";
    if (L.n < 1 || L.n > kMaxWidth || L.k < 1 || L.k > kMaxWidth)
      return at + "n and k must be in [1, " + to_string(kMaxWidth) + "] (the fused kernel's widths), got n=" +
             to_string(L.n) + ", k=" + to_string(L.k);
    if (L.bm < 1 || L.bk < 1 || L.n % L.bm != 0 || L.k % L.bk != 0)
      return at + "block " + to_string(L.bm) + "x" + to_string(L.bk) + " does not tile the " +
             to_string(L.n) + "x" + to_string(L.k) + " weight";
    const int64_t grid = int64_t(L.n / L.bm) * (L.k / L.bk);
    if (L.nnzb < 0 || L.nnzb > grid)
      return at + "nnzb must be in [0, " + to_string(grid) + "], got " + to_string(L.nnzb);
    if (L.act < 0 || L.act >= kNumActs)
      return at + "act must be in [0, " + to_string(kNumActs - 1) + "], got " + to_string(L.act);
    if (!L.row_ptr) return at + "row_ptr is null";
    if (L.nnzb > 0 && (!L.values || !L.col_idx)) return at + "values and col_idx are required when nnzb > 0";
    if (L.scale && L.gate_w) return at + "give either scale or gate_w (concatsquash), not both";
    if (!L.gate_w && (L.gate_b || L.shift_w)) return at + "gate_b and shift_w need gate_w";
    if (l > 0 && L.k != p.layers[l - 1].n)
      return at + "k=" + to_string(L.k) + " does not match the previous layer's n=" + to_string(p.layers[l - 1].n);
    const void* ptrs[] = {L.values, L.row_ptr, L.col_idx, L.scale, L.bias, L.gate_w, L.gate_b, L.shift_w};
    for (const void* q : ptrs)
      if (misaligned(q, 4)) return at + "a pointer is not 4-byte aligned";
  }
  if (p.batch > 0) {
    if (!p.x || !p.y) return "x and y are required when batch > 0";
    if (p.ntan > 0 && (!p.x_dot || !p.y_dot)) return "x_dot and y_dot are required when ntan > 0";
  }
  const void* io[] = {p.x, p.x_dot, p.y, p.y_dot, p.t_dev};
  for (const void* q : io)
    if (misaligned(q, 4)) return "x, x_dot, y, y_dot and t_dev must be 4-byte aligned";
  if (p.ntan > (1 << 20)) return "ntan is too large";
  return {};
}

// Launches the fused kernel on p.stream (defined in fused_mlp.cu; only in builds with CUDA). Returns an
// empty string on success, else the validation or CUDA error. Asynchronous: errors inside the kernel
// surface at the next synchronisation.
std::string launch_fused_mlp(const FusedMlpParams& p);

// The plan the launcher would use on the current device (for tests and benchmarks).
TilePlan device_plan(const FusedMlpParams& p);

}  // namespace fused
}  // namespace cuda
}  // namespace jsp_fast
