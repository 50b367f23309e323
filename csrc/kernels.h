// Row kernels of the quantized matmul (qmm.cpp): y[m, n] = sum_k x[m, k] * (scale[n, g] * q[n, k] + bias[n, g]),
// computed per group as scale * sum(q * x) + bias * sum(x), so that each packed weight byte is read once.
//
// Two families:
//   rows_*     few rows, float activations: exact to float32 rounding (where no q8 kernel exists, and with
//              BONSAI_QMM_ACTIVATIONS=float);
//   rows_q8_*  few rows: the activation row rounded to int8 per block of 32 (x ≈ x̂ = d_b * xq, |x - x̂| <= d_b / 2,
//              d_b = max|x in b| / 127: llama.cpp's Q8_1 activations), sum(q * xq) by integer dot products:
//              y = sum_g scale_g * sum_{b in g} d_b * sum_{k in b} q_k * xq_k + bias_g * sum_{b in g} d_b * sum(xq in b)
//                = x̂ · dequantize(w) exactly (up to float32 summation order), so
//              |y - x · dequantize(w)| <= sum_b d_b / 2 * sum_{k in b} |dequantize(w)_k|.
//              In float a decode product is bound by instructions, not memory: ~3.5x fewer per weight byte here
//              (`python bench/cpu_qmm.py`).
#pragma once

#include <cstdint>
#include <vector>

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
  // q8 kernels only (`quantize_activations` fills them):
  const int8_t* xq = nullptr;     // [M, K] int8 activations in natural order (the portable kernel)
  const int8_t* xqp = nullptr;    // [M, K] the same, in the vectorized kernels' order (see quantize_activations)
  const float* xd = nullptr;      // [M, K / 32] per-block scale d_b
  const float* xdsum = nullptr;   // [M, G] sum over the group's blocks of d_b * sum(xq in b)
};

// x [M, K] (K a multiple of 32) → xq, xqp, xd, xdsum of QmmArgs. xqp: 4-bit, per pair of blocks (2p, 2p+1) 64 bytes
// [even elements of 2p, even of 2p+1, odd of 2p, odd of 2p+1] (matching the nibbles of one 32-byte load), a last
// unpaired block as [even, odd]; 8-bit, natural order. xqp may be nullptr (not filled: the packed-tile kernel).
void quantize_activations(const float* x, int M, int K, int group_size, int bits, int8_t* xq, int8_t* xqp, float* xd,
                          float* xdsum);

using RowKernel = void (*)(const QmmArgs& a, int n0, int n1);

void rows_portable(const QmmArgs& a, int n0, int n1);
void rows_q8_portable(const QmmArgs& a, int n0, int n1);
#if defined(__x86_64__) || defined(_M_X64)
void rows_avx2(const QmmArgs& a, int n0, int n1);  // compiled for AVX2+FMA, called only where the CPU has them
void rows_q8_avx2(const QmmArgs& a, int n0, int n1);
void rows_q8_avx512(const QmmArgs& a, int n0, int n1);  // AVX-512 F/BW/VL/VNNI: 4-bit only
// the same on packed.h's tiles (a.w, a.scales, a.biases packed; a.N the real rows): tiles [t0, t1), any number of rows
// (a prompt too: each tile is read once for all rows) — so with packed weights the int8 bound above holds at every
// row count
void rows_q8_packed_avx512(const QmmArgs& a, int t0, int t1);
// decode_math.h's attend_row with AVX-512 (head_dim a multiple of 16, at most 128)
void attend_row_avx512(const float* q, int Dh, const float* k, int64_t k_step, const float* v, int64_t v_step, int S,
                       const float* k_new, const float* v_new, float scale, float* out, std::vector<float>& p);
void dequantize_packed_t_avx512(const uint8_t* pw, const float* ps, const float* pb, int K, int group_size, int n0,
                                int n1, int N, float* out, int64_t ld);
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
