// AVX2 + FMA row kernels (x86-64). This file is compiled with -mavx2 -mfma; qmm.cpp calls it only after checking
// the CPU has both (__builtin_cpu_supports), so the library still loads on older x86 CPUs.
//
// Per output row n and quantization group g: sum(q * x) by 8-lane FMAs on the unpacked weights (each packed byte is
// read once and converted once, then used for every activation row), scaled once per group, plus bias * sum(x):
// the exact float result of MLX's formula up to summation order.
#include <immintrin.h>

#include "kernels.h"

namespace bonsai {

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// the 32 values of one chunk as 4 × 8 floats (4-bit: low nibbles = even elements, high nibbles = odd elements,
// matching `xperm`; 8-bit: in order)
static inline void unpack4(const uint8_t* p, __m256 w[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void unpack8(const uint8_t* p, __m256 w[4]) {
  for (int i = 0; i < 4; ++i) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i));
    w[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
}

template <int BITS, int MB>
static void rows_block(const QmmArgs& a, int n, int m0) {
  const int G = a.K / a.group_size;
  const int chunks = a.group_size / 32;
  const int row_bytes = a.K * BITS / 8;
  const uint8_t* row = reinterpret_cast<const uint8_t*>(a.w) + static_cast<int64_t>(n) * row_bytes;
  const float* sc = a.scales + static_cast<int64_t>(n) * G;
  const float* xs = BITS == 4 ? a.xperm : a.x;
  __m256 tot[MB];
  for (int r = 0; r < MB; ++r) tot[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m256 acc[MB][4];
    for (int r = 0; r < MB; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      const int k = (g * chunks + c) * 32;
      __m256 w[4];
      if (BITS == 4) unpack4(row + k / 2, w);
      else unpack8(row + k, w);
      for (int r = 0; r < MB; ++r) {
        const float* x = xs + static_cast<int64_t>(m0 + r) * a.K + k;
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + 8 * i), acc[r][i]);
      }
    }
    const __m256 s = _mm256_set1_ps(sc[g]);
    for (int r = 0; r < MB; ++r) {
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
      tot[r] = _mm256_fmadd_ps(s, sum, tot[r]);
    }
  }
  const float* bi = a.biases + static_cast<int64_t>(n) * G;
  for (int r = 0; r < MB; ++r) {
    const float* xsum = a.xsum + static_cast<int64_t>(m0 + r) * G;
    __m256 bv = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= G; g += 8) bv = _mm256_fmadd_ps(_mm256_loadu_ps(bi + g), _mm256_loadu_ps(xsum + g), bv);
    float b = hsum(bv);
    for (; g < G; ++g) b += bi[g] * xsum[g];
    a.y[static_cast<int64_t>(m0 + r) * a.N + n] = hsum(tot[r]) + b;
  }
}

template <int BITS>
static void rows_bits(const QmmArgs& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    int m = 0;
    for (; m + 2 <= a.M; m += 2) rows_block<BITS, 2>(a, n, m);
    if (m < a.M) rows_block<BITS, 1>(a, n, m);
  }
}

// out = scale * q + bias for 32 values at a time, in element order (4-bit: the low and high nibbles of each byte
// interleaved back into order)
void dequantize_rows_avx2(const uint32_t* w, const float* scales, const float* biases, int K, int group_size, int bits,
                          int n0, int n1, float* out) {
  if ((bits != 4 && bits != 8) || group_size % 32) return dequantize_rows(w, scales, biases, K, group_size, bits, n0, n1, out);
  const int G = K / group_size, row_bytes = K * bits / 8;
  const __m128i m = _mm_set1_epi8(0x0F);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(w) + static_cast<int64_t>(n) * row_bytes;
    float* o = out + static_cast<int64_t>(n - n0) * K;
    for (int g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(scales[static_cast<int64_t>(n) * G + g]);
      const __m256 b = _mm256_set1_ps(biases[static_cast<int64_t>(n) * G + g]);
      for (int k = g * group_size; k < (g + 1) * group_size; k += 32) {
        __m128i v[2];
        if (bits == 4) {
          const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
          const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
          v[0] = _mm_unpacklo_epi8(lo, hi);  // elements k .. k+15
          v[1] = _mm_unpackhi_epi8(lo, hi);  // k+16 .. k+31
        } else {
          v[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
          v[1] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16));
        }
        for (int h = 0; h < 2; ++h) {
          const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v[h]));
          const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v[h], 8)));
          _mm256_storeu_ps(o + k + 16 * h, _mm256_fmadd_ps(s, q0, b));
          _mm256_storeu_ps(o + k + 16 * h + 8, _mm256_fmadd_ps(s, q1, b));
        }
      }
    }
  }
}

void rows_avx2(const QmmArgs& a, int n0, int n1) {
  if (a.bits == 4 && a.group_size % 32 == 0) return rows_bits<4>(a, n0, n1);
  if (a.bits == 8 && a.group_size % 32 == 0) return rows_bits<8>(a, n0, n1);
  rows_portable(a, n0, n1);
}

}  // namespace bonsai
