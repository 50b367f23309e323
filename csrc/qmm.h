// bonsai-mlx: quantized matmul for MLX's affine format on the CPU (docs/architecture.md, "The CPU path").
//
// MLX's own CPU `quantized_matmul` is scalar and single-threaded on Linux (mlx/backend/cpu/quantized.cpp, _qmm_t):
// this primitive multiplies float32 activations by the same packed weights (uint32 words, element k of a row in
// bits (k % (32/bits))*bits of word k/(32/bits), low bits first; per-group scale and bias: w = scale*q + bias)
//   - few rows: a vectorized kernel that reads each weight byte once (AVX2+FMA / NEON / portable C, chosen at
//     run time), over a small persistent thread pool;
//   - many rows: tiles of the weight dequantized into a small buffer and multiplied by the BLAS (cblas_sgemm of the
//     library the process loaded), never a full dequantized copy of the layer.
#pragma once

#include <functional>
#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace bonsai {

// y = x @ dequantize(w).T (transpose) or x @ dequantize(w) (not transpose), x float32.
// bias: the layer's own [N] bias, added in the same op (transpose only).
// packed_n > 0: w, scales, biases are packed.h's tiles of a 4-bit [packed_n, K] weight (pack_weight below).
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, bool transpose, int group_size, int bits,
                           const std::optional<mx::array>& bias = std::nullopt, int row_kernel_rows = 0,
                           int packed_n = 0, mx::StreamOrDevice s = {});

// Whether this CPU has the packed-tile kernel (AVX-512 VNNI, int8 activations on): where 4-bit weights are worth
// packing (bonsai_mlx/cpu/pages.py).
bool packed_kernel();

class QuantizedMatmul : public mx::Primitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits, bool transpose, int row_kernel_rows = 0,
                  int packed_n = 0)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits), transpose_(transpose),
        row_kernel_rows_(row_kernel_rows), packed_n_(packed_n) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "BonsaiQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  // y [M, N or K] = x @ dequantize(w).T (or x @ dequantize(w)), on the calling thread and the pool
  static void product(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                      float* yp, int M, int N, int K, int gs, int bits, bool transpose, int row_kernel_rows,
                      bool packed);
  int group_size_;
  int bits_;
  bool transpose_;
  int row_kernel_rows_;  // product_rows' bound (0: the default crossover)
  int packed_n_;         // > 0: packed tiles of this many output rows
};

// The product on row-major buffers (x [M, K] or [M, N], w [N, K*bits/32], scales/biases [N, K/g]) into y, on the
// calling thread and the pool: what QuantizedMatmul's task runs, and decode_block.cpp's layers.
// row_kernel_rows: inputs with fewer rows use the row kernels (0: many_rows(), the prefill crossover); a decode step of
// a batch of sequences passes its own bound, since re-dequantizing every weight per step costs far more there.
// packed: w, scales, biases are packed.h's tiles (w's bytes), N the real output rows.
void product_rows(const float* x, const uint32_t* w, const float* scales, const float* biases, float* y, int M, int N,
                  int K, int group_size, int bits, bool transpose, int row_kernel_rows = 0, bool packed = false);

// Several packed 4-bit linears of one input (q/k/v, gate/up of a decode step): y_i [M, N_i] = x [M, K] @ W_i^T.
// Where the tile kernel applies (packed_kernel(), M below row_kernel_rows), x is quantized once and all their tiles
// are one parallel_for; else each is product_rows.
struct PackedLinear {
  const uint8_t* w;
  const float* scales;
  const float* biases;
  int N;
  float* y;
};
void packed_products(const float* x, int M, int K, int group_size, const std::vector<PackedLinear>& linears,
                     int row_kernel_rows);

// softmax(scale q·Kᵀ)·V for one query row (decode_math.h's attend_row): the vectorized version for this CPU and
// head_dim Dh (AVX-512), or nullptr where decode_math.h's own is the one to use
using AttendRow = void (*)(const float* q, int Dh, const float* k, int64_t k_step, const float* v, int64_t v_step,
                           int S, const float* k_new, const float* v_new, float scale, float* out,
                           std::vector<float>& p);
AttendRow attend_kernel(int Dh);

// f over [0, n) in chunks on the calling thread and the kernel's pool (threadpool.h)
void parallel_for(int n, const std::function<void(int, int)>& f, int align = 4);

// What the kernel runs on this machine: "avx2+fma", "neon" or "portable", and the pool's thread count.
std::string kernel_isa();
int num_threads();
// "int8" where 4-bit products of fewer than int8_rows() rows round the activations to int8 (kernels.h), else
// "float"
std::string activations();
void set_activations(const std::string& kind);  // "int8" (where a kernel exists) or "float"
int int8_rows();
void set_num_threads(int n);

}  // namespace bonsai
