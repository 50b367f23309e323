// Row kernels of the quantized matmul (qmm.cpp): y[m, n] = sum_k x[m, k] * (scale[n, g] * q[n, k] + bias[n, g]),
// computed per group as scale * sum(q * x) + bias * sum(x), so that each packed weight byte is read once.
#pragma once

#include <cstdint>

namespace bonsai {

struct QmmArgs {
  const float* x;        // [M, K] row-major activations
  const float* xperm;    // 4-bit: x with each 32-element chunk reordered even elements first, then odd ones
  const float* xsum;     // [M, G] sum of x over each quantization group
  const uint32_t* w;     // [N, K * bits / 32] packed weights
  const float* scales;   // [N, G]
  const float* biases;   // [N, G]
  float* y;              // [M, N]
  int M, N, K, group_size, bits;
};

using RowKernel = void (*)(const QmmArgs& a, int n0, int n1);

void rows_portable(const QmmArgs& a, int n0, int n1);
#if defined(__x86_64__) || defined(_M_X64)
void rows_avx2(const QmmArgs& a, int n0, int n1);  // compiled for AVX2+FMA, called only where the CPU has them
#endif

// dequantize rows [n0, n1) of w into out[(n - n0) * K + k]
using DequantKernel = void (*)(const uint32_t* w, const float* scales, const float* biases, int K, int group_size,
                               int bits, int n0, int n1, float* out);
#if defined(__aarch64__)
void rows_neon(const QmmArgs& a, int n0, int n1);
void dequantize_rows_neon(const uint32_t* w, const float* scales, const float* biases, int K, int group_size, int bits,
                          int n0, int n1, float* out);
#endif
#if defined(__x86_64__) || defined(_M_X64)
void dequantize_rows_avx2(const uint32_t* w, const float* scales, const float* biases, int K, int group_size, int bits,
                          int n0, int n1, float* out);
#endif
void dequantize_rows(const uint32_t* w, const float* scales, const float* biases, int K, int group_size, int bits,
                     int n0, int n1, float* out);

}  // namespace bonsai
