// One call per vector-field evaluation: a whole concatsquash MLP (time gate, block-sparse or dense
// products, activation, value and T tangents) evaluated in a single pass over batch tiles.
//
// Torch-free: the plan owns packed copies of the weights; eval() takes raw pointers and sizes.
//
// Math, per layer l with packed weight W (zeros outside kept blocks), per-output hyper-parameters
// gate_w, gate_b, shift_w and bias b, at time t:
//   g     = sigmoid(gate_w * t + gate_b)          scale
//   s     = b * g + shift_w * t                   shift
//   pre   = g ⊙ (x Wᵀ) + s,     y   = act(pre)
//   pre_v = g ⊙ (x_v Wᵀ),       y_v = act'(pre) ⊙ pre_v     for every tangent v
// with act = identity on the last layer. The value rows and the T tangent rows of a batch tile are
// stacked into one (1+T)·TB-row matrix, so each packed weight panel is read once per tile for all of
// them; activations stay in two per-thread ping-pong buffers sized for L2.
//
// Packing: a layer's outputs are cut into panels of P = pv·L outputs (pv = 1 or 2 vectors, chosen
// per layer for the least padded work: 8×8 or 16×16 blocks waste less in narrower panels). For each
// panel the needed input columns (the union of the kept weights of its outputs) form runs
// ("segments"); each segment's weights are stored k-major, [len][P], zero-padded past the last
// output. Layers with very few outputs (a 2-d field's last layer) are "narrow": dense rows [n][k]
// and one dot product per output, instead of a panel that would be mostly padding.
//
// Vector types and activations come from cpu/simd.h, the micro-kernel is bsr::micro_accumulate (both
// shared with the block-sparse kernels). It reads the activations in place (R strided rows,
// broadcast-FMA) rather than packed [k][R] as the block-sparse layer does: here every layer's input
// is the previous layer's output, and a packing pass would cost ~L / kept-columns of the product at
// 90% sparsity.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cpu/simd.h"

namespace jsp_fast {
namespace cpu {
namespace field {

template <typename T>
struct Simd {
  using vec = typename simd::Vec<T>::type;
  static constexpr int L = simd::Vec<T>::L;  // lanes
  static constexpr int P = 2 * L;            // widest panel (outputs)
  static constexpr int R = simd::kVecBytes == 64 ? 12 : (simd::kVecBytes == 32 ? 6 : 4);  // rows per micro-tile
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
struct AlignedBuf {
  std::unique_ptr<T[], FreeDeleter> ptr;
  int64_t size = 0;
  void resize(int64_t n);  // contents undefined, 64-byte aligned
  T* data() { return ptr.get(); }
  const T* data() const { return ptr.get(); }
};

template <typename T>
struct Layer {
  int64_t n = 0, k = 0, n_pad = 0;  // outputs, inputs, outputs rounded up to the panel width
  int pv = 2;                       // vectors per panel (P = pv * L)
  bool narrow = false;              // few outputs: w holds dense rows [n][k]
  Act act = Act::None;
  std::vector<int64_t> panel_seg;                // [n_panels + 1] offsets into the segment arrays
  std::vector<int64_t> seg_k0, seg_len, seg_off;  // per segment: first column, length, offset in w
  AlignedBuf<T> w;                                // packed weights
  AlignedBuf<T> gate_w, gate_b, shift_w, bias;    // [n_pad], zero-padded
  int64_t kept_cols = 0;                          // Σ segment lengths (work per panel row)
};

template <typename T>
class FieldPlan {
 public:
  static constexpr int kPanel = Simd<T>::P;
  static constexpr int kRows = Simd<T>::R;

  // w: [n, k] row-major dense weight (zeros where pruned); mask: [n, k] bytes (1 = kept) or null for
  // a dense layer. gate_w, gate_b, shift_w: [n]; bias: [n] or null.
  void add_layer(int64_t n, int64_t k, Act act, const T* w, const uint8_t* mask, const T* gate_w,
                 const T* gate_b, const T* shift_w, const T* bias);

  // z: [B, dim]; v: [ntan, B, dim] (ignored when ntan == 0); f: [B, dim]; jv: [ntan, B, dim].
  // Rows are contiguous; batch stride of each tangent is B * dim. Thread-safe (no mutable state).
  void eval(T t, const T* z, int64_t B, const T* v, int64_t ntan, T* f, T* jv, int num_threads) const;

  // eval with the value rows read and the results written by callbacks, once per tile of rows (each
  // tile on one thread; tiles are disjoint). The native solve (solve.cpp) uses them to form a Runge-
  // Kutta stage's input straight into the tile and to reduce the trace from the tile's tangents, so
  // neither the stage input nor J·v makes a round trip through memory. in(ctx, b0, nb, dst) writes
  // value rows b0 .. b0+nb-1 ([nb, dim_in] row-major) to dst; out(ctx, b0, nb, res, ld, TB) reads the
  // tile's result: value row r at res + r*ld, row r of tangent g (1-based) at res + (g*TB + r)*ld.
  struct Hooks {
    void (*in)(void* ctx, int64_t b0, int64_t nb, T* dst) = nullptr;
    void (*out)(void* ctx, int64_t b0, int64_t nb, const T* res, int64_t ld, int64_t TB) = nullptr;
    void* ctx = nullptr;
  };
  void eval_hooked(T t, int64_t B, const T* v, int64_t ntan, const Hooks& hooks, int num_threads) const;

  int64_t dim_in() const { return layers_.empty() ? 0 : layers_.front().k; }
  int64_t dim_out() const { return layers_.empty() ? 0 : layers_.back().n; }
  int64_t num_layers() const { return int64_t(layers_.size()); }
  // Fraction of the dense multiply-adds the packed plan performs (kept columns × padded outputs).
  double density() const;
  // Per layer: "panel<P>" or "narrow".
  std::vector<std::string> layer_kinds() const;
  // Batch rows per tile for ntan tangents (multiple of kRows).
  int64_t tile_rows(int64_t B, int64_t ntan, int num_threads) const;

 private:
  std::vector<Layer<T>> layers_;
  int64_t max_width_ = 0;  // max over layers of n_pad and k
};

extern template class FieldPlan<float>;
extern template class FieldPlan<double>;

}  // namespace field
}  // namespace cpu
}  // namespace jsp_fast
