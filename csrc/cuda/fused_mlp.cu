// Fused block-sparse concatsquash MLP: one launch per field evaluation, value and T tangents, the
// batch tile's activations in shared memory across all layers. Interface: fused_mlp.h; math and the
// CTA program (shared with the host check driver): fused_mlp_math.h.
//
// Grid: (batch tiles of plan.tb rows) x (chunks of plan.tc tangents); blockDim = kThreads (by width
// tier). fp32 SIMT FMAs with float4 loads: a thread owns a 4-row x 4-output micro-tile, weights come
// through the read-only cache (every CTA reads all kept blocks; the layer sizes here, <= 512 x 512,
// keep them L2-resident), activations from shared memory (rows padded by 4 floats: no bank conflicts
// for the 8 rows of a warp's float4 column).
//
// Not done yet: a bf16/TF32 tensor-core (mma.sync) variant of tile_vec for 16x16-multiple blocks, and
// staging each block row's weights in shared memory for the wide (512) tier.
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <string>

#include "fused_mlp.h"
#include "fused_mlp_math.h"
#include "static_switch.h"

namespace jsp_fast {
namespace cuda {
namespace fused {
namespace {

// WIDTH_SWITCH and the host-side planner (threads_for_width) must agree on the tiers.
static_assert(threads_for_width(64) == 128 && threads_for_width(128) == 128 && threads_for_width(129) == 256 &&
                  threads_for_width(kMaxWidth) == 256,
              "WIDTH_SWITCH tiers out of step with threads_for_width");

template <int kThreads>
struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void operator()(F&& f) const {
    f(int(threadIdx.x), kThreads);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

template <int A, int kThreads>
__global__ void __launch_bounds__(kThreads)
    fused_mlp_kernel(const __grid_constant__ FusedMlpParams p, const __grid_constant__ TilePlan plan) {
  extern __shared__ float4 smem4[];
  Cta c = make_cta(p, plan, int64_t(blockIdx.x), int(blockIdx.y), reinterpret_cast<float*>(smem4));
  DeviceExec<kThreads> exec;
  cta_program<A>(p, c, exec);
}

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int sms = 0, smem_optin = 0;
};

DeviceInfo device_info(int dev) {
  static std::array<std::atomic<int>, kMaxDevices> sms{}, optin{};
  DeviceInfo d;
  if (dev >= 0 && dev < kMaxDevices && sms[dev].load() > 0) {
    d.sms = sms[dev].load();
    d.smem_optin = optin[dev].load();
    return d;
  }
  if (cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) d.sms = 1;
  if (cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    d.smem_optin = 48 * 1024;
  if (dev >= 0 && dev < kMaxDevices) {
    optin[dev].store(d.smem_optin);
    sms[dev].store(d.sms);
  }
  return d;
}

TilePlan plan_on(const FusedMlpParams& p, int dev) {
  const DeviceInfo d = device_info(dev);
  const int budget = d.smem_optin < kDefaultSmemBudget ? d.smem_optin : kDefaultSmemBudget;
  const int mw = max_width(p);
  return plan_tiles(p.batch, p.ntan, mw, threads_for_width(mw), budget, d.sms);
}

// The dynamic shared memory limit set per (kernel, device): cudaFuncSetAttribute once per size increase.
template <int A, int kThreads>
cudaError_t ensure_smem(int dev, int bytes) {
  static std::array<std::atomic<int>, kMaxDevices> set{};
  if (bytes <= 48 * 1024) return cudaSuccess;
  if (dev >= 0 && dev < kMaxDevices && set[dev].load() >= bytes) return cudaSuccess;
  const cudaError_t e =
      cudaFuncSetAttribute(fused_mlp_kernel<A, kThreads>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
    int cur = set[dev].load();
    while (cur < bytes && !set[dev].compare_exchange_weak(cur, bytes)) {}
  }
  return e;
}

}  // namespace

TilePlan device_plan(const FusedMlpParams& p) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return TilePlan{};
  return plan_on(p, dev);
}

std::string launch_fused_mlp(const FusedMlpParams& params) {
  std::string err = validate(params);
  if (!err.empty()) return err;
  if (params.batch == 0) return {};
  FusedMlpParams p = params;
  prepare(p);
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return std::string("cudaGetDevice: ") + cudaGetErrorString(e);
  const TilePlan plan = plan_on(p, dev);
  if (plan.tb == 0) return "the fused MLP's activation tile does not fit in shared memory on this device";
  if (plan.grid_x > 0x7fffffff || plan.chunks > 65535) return "batch or ntan too large for one launch";
  const dim3 grid(unsigned(plan.grid_x), unsigned(plan.chunks));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const int mw = max_width(p);
  e = WIDTH_SWITCH(mw, kThreads, [&] {
    return ACT_SWITCH(kernel_act(p), A, [&] {
      cudaError_t r = ensure_smem<A, kThreads>(dev, plan.smem_bytes);
      if (r != cudaSuccess) return r;
      fused_mlp_kernel<A, kThreads><<<grid, kThreads, plan.smem_bytes, stream>>>(p, plan);
      return cudaGetLastError();
    });
  });
  if (e != cudaSuccess) return std::string("fused MLP launch failed: ") + cudaGetErrorString(e);
  return {};
}

}  // namespace fused
}  // namespace cuda
}  // namespace jsp_fast
