#pragma once
// Activation codes: an ABI shared with jsp_fast/_act.py (CODES) and the Triton kernels
// (jsp_fast/kernels/_common.py). tests/test_act.py checks the two agree through _C.act_codes().
// The math lives with each kernel family (csrc/cpu/simd.h vectorised, csrc/cuda/fused_mlp_math.h).
namespace jsp_fast {
enum class Act : int { None = 0, Tanh = 1, Softplus = 2, Elu = 3, Relu = 4, Sigmoid = 5 };
inline constexpr int kNumActs = 6;
inline constexpr const char* kActNames[kNumActs] = {"none", "tanh", "softplus", "elu", "relu", "sigmoid"};
}  // namespace jsp_fast
