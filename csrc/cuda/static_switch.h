// Run-time choices -> template parameters (flash-attention's *_SWITCH idiom): one kernel body, one
// instantiation per case, picked once per launch on the host.
//
//   ACT_SWITCH(act, A, [&] { kernel<A><<<...>>>(...); });
//   WIDTH_SWITCH(max_width, kThreads, [&] { ... kThreads ... });
#pragma once

#include "fused_mlp.h"

static_assert(::jsp_fast::cuda::fused::kActDynamic == 6, "ACT_SWITCH below lists the codes 1..6");

#define JSP_ACT_CASE(CODE, CONST_NAME, ...)                             \
  case CODE: {                                                          \
    constexpr int CONST_NAME = CODE;                                    \
    return __VA_ARGS__();                                               \
  }

// ACT: an activation code, jsp_fast::Act's (None .. Sigmoid) or kActDynamic (6) for mixed hidden
// activations; CONST_NAME becomes a constexpr int.
#define ACT_SWITCH(ACT, CONST_NAME, ...)                                \
  [&] {                                                                 \
    switch (int(ACT)) {                                                 \
      JSP_ACT_CASE(1, CONST_NAME, __VA_ARGS__)                          \
      JSP_ACT_CASE(2, CONST_NAME, __VA_ARGS__)                          \
      JSP_ACT_CASE(3, CONST_NAME, __VA_ARGS__)                          \
      JSP_ACT_CASE(4, CONST_NAME, __VA_ARGS__)                          \
      JSP_ACT_CASE(5, CONST_NAME, __VA_ARGS__)                          \
      JSP_ACT_CASE(6, CONST_NAME, __VA_ARGS__)                          \
      default: {                                                        \
        constexpr int CONST_NAME = int(::jsp_fast::Act::None);          \
        return __VA_ARGS__();                                           \
      }                                                                 \
    }                                                                   \
  }()

// Width tiers, matching jsp_fast::cuda::fused::threads_for_width(): <= 128 -> 128 threads per CTA,
// <= 512 -> 256 threads.
#define WIDTH_SWITCH(MAX_WIDTH, THREADS_NAME, ...)                      \
  [&] {                                                                 \
    if ((MAX_WIDTH) <= 128) {                                           \
      constexpr int THREADS_NAME = 128;                                 \
      return __VA_ARGS__();                                             \
    } else {                                                            \
      constexpr int THREADS_NAME = 256;                                 \
      return __VA_ARGS__();                                             \
    }                                                                   \
  }()
