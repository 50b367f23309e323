// The BonsaiQuantizedMatmul primitive (see qmm.h): graph construction, CPU evaluation, vjp, shapes (the products
// themselves: products.cpp).
#include "qmm.h"

#include <sstream>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "packed.h"
#include "strided.h"

namespace bonsai {

namespace {
void check_inputs(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                  int group_size, int bits, bool transpose) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[bonsai.quantized_matmul] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("[bonsai.quantized_matmul] group_size must be 32, 64 or 128");
  if (w.ndim() != 2 || w.dtype() != mx::uint32 || scales.ndim() != 2 || biases.shape() != scales.shape())
    throw std::invalid_argument("[bonsai.quantized_matmul] w must be [N, K*bits/32] uint32, scales/biases [N, K/g]");
  const int N = w.shape(0), K = w.shape(1) * 32 / bits;
  if (scales.shape(0) != N || scales.shape(1) * group_size != K)
    throw std::invalid_argument("[bonsai.quantized_matmul] scales/biases do not match w");
  if (x.ndim() < 1 || x.shape(-1) != (transpose ? K : N)) {
    std::ostringstream msg;
    msg << "[bonsai.quantized_matmul] x's last axis is " << (x.ndim() ? x.shape(-1) : 0) << ", expected "
        << (transpose ? K : N);
    throw std::invalid_argument(msg.str());
  }
}

void check_packed(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                  int group_size, int bits, bool transpose, int N) {
  if (bits != 4) throw std::invalid_argument("[bonsai.quantized_matmul] packed tiles are 4-bit");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("[bonsai.quantized_matmul] group_size must be 32, 64 or 128");
  const int T = packed_tiles(N);
  if (w.ndim() != 2 || w.dtype() != mx::uint8 || w.shape(0) != T || w.shape(1) % (8 * group_size) != 0)
    throw std::invalid_argument("[bonsai.quantized_matmul] packed w must be [ceil(N/16), 8K] uint8");
  const int K = w.shape(1) / 8;
  const mx::Shape sg = {T, K / group_size, kTileRows};
  if (scales.shape() != sg || biases.shape() != sg || scales.dtype() != mx::float32 || biases.dtype() != mx::float32)
    throw std::invalid_argument("[bonsai.quantized_matmul] packed scales/biases must be [ceil(N/16), K/g, 16] float32");
  if (x.ndim() < 1 || x.shape(-1) != (transpose ? K : N))
    throw std::invalid_argument("[bonsai.quantized_matmul] x's last axis does not match the packed weight");
}
}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                           bool transpose, int group_size, int bits, const std::optional<mx::array>& bias,
                           int row_kernel_rows, int packed_n, mx::StreamOrDevice s) {
  if (packed_n > 0)
    check_packed(x, w, scales, biases, group_size, bits, transpose, packed_n);
  else
    check_inputs(x, w, scales, biases, group_size, bits, transpose);
  auto st = mx::to_stream(s);
  const int N = packed_n > 0 ? packed_n : w.shape(0);
  const int K = packed_n > 0 ? w.shape(1) / 8 : w.shape(1) * 32 / bits;
  auto shape = x.shape();
  shape.back() = transpose ? N : K;
  // no extra graph nodes in the common case (a decode step makes ~170 of these products): casts only where needed,
  // strided inputs are gathered inside eval_cpu
  auto f32 = [&](const mx::array& a) { return a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, st); };
  std::vector<mx::array> inputs = {f32(x), w, f32(scales), f32(biases)};
  if (bias) {  // the layer's own bias, added inside the task (one graph node fewer per product)
    if (!transpose || bias->ndim() != 1 || bias->shape(0) != N)
      throw std::invalid_argument("[bonsai.quantized_matmul] bias must be [N], with transpose=True");
    inputs.push_back(f32(*bias));
  }
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedMatmul>(st, group_size, bits, transpose, row_kernel_rows, packed_n),
                   inputs);
}


void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_input_array(w);
  enc.set_input_array(scales);
  enc.set_input_array(biases);
  const bool has_bias = inputs.size() > 4;
  if (has_bias) enc.set_input_array(inputs[4]);
  enc.set_output_array(out);
  const int bits = bits_, gs = group_size_;
  const bool packed = packed_n_ > 0;
  const int N = packed ? packed_n_ : w.shape(0), K = packed ? w.shape(1) / 8 : w.shape(1) * 32 / bits;
  const int inner = transpose_ ? K : N;
  const int M = static_cast<int>(x.size() / std::max(inner, 1));
  const mx::array bias = has_bias ? inputs[4] : x;  // x: a placeholder, unused without a bias
  enc.dispatch([x, w, scales, biases, bias, has_bias, yp = out.data<float>(), M, N, K, gs, bits,
                transpose = transpose_, rows = row_kernel_rows_, packed]() {
    if (M == 0) return;
    product(x, w, scales, biases, yp, M, N, K, gs, bits, transpose, rows, packed);
    if (has_bias) {
      std::vector<float> bb;
      const float* b = row_major(bias, bb);
      for (int64_t m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) yp[m * N + n] += b[n];
    }
  });
}

void QuantizedMatmul::product(const mx::array& x, const mx::array& w, const mx::array& scales,
                              const mx::array& biases, float* yp, int M, int N, int K, int gs, int bits,
                              bool transpose, int row_kernel_rows, bool packed) {
  std::vector<float> xb, sb, bb;
  std::vector<uint32_t> wb;
  std::vector<uint8_t> pb;
  const uint32_t* wp = packed ? reinterpret_cast<const uint32_t*>(row_major(w, pb)) : row_major(w, wb);
  product_rows(row_major(x, xb), wp, row_major(scales, sb), row_major(biases, bb), yp, M, N, K, gs, bits, transpose,
               row_kernel_rows, packed);
}


void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[bonsai.quantized_matmul] CPU only: on a GPU use mx.quantized_matmul");
}

std::vector<mx::array> QuantizedMatmul::vjp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cotangents,
                                            const std::vector<int>& argnums, const std::vector<mx::array>&) {
  std::vector<mx::array> out;
  for (int arg : argnums) {
    if (arg == 4) {  // the layer's bias: the cotangent summed over every axis but the last
      std::vector<int> axes(cotangents[0].ndim() - 1);
      for (size_t i = 0; i < axes.size(); ++i) axes[i] = static_cast<int>(i);
      out.push_back(mx::sum(cotangents[0], axes, false, stream()));
      continue;
    }
    if (arg != 0)
      throw std::invalid_argument("[bonsai.quantized_matmul] gradients only for the input (the weights are frozen)");
    // d/dx of x @ W^T is cot @ W, and of x @ W is cot @ W^T: the same primitive, transposed the other way
    out.push_back(quantized_matmul(cotangents[0], primals[1], primals[2], primals[3], !transpose_, group_size_, bits_,
                                   std::nullopt, 0, packed_n_, stream()));
  }
  return out;
}

std::vector<mx::Shape> QuantizedMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  const int N = packed_n_ > 0 ? packed_n_ : inputs[1].shape(0);
  const int K = packed_n_ > 0 ? inputs[1].shape(1) / 8 : inputs[1].shape(1) * 32 / bits_;
  shape.back() = transpose_ ? N : K;
  return {shape};
}

bool QuantizedMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_ &&
         row_kernel_rows_ == o.row_kernel_rows_ && packed_n_ == o.packed_n_;
}

}  // namespace bonsai
