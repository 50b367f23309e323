// AVX2 + FMA row kernels (x86-64). This file is compiled with -mavx2 -mfma; qmm.cpp calls it only after checking
// the CPU has both (__builtin_cpu_supports), so the library still loads on older x86 CPUs.
//
// Per output row n and quantization group g: sum(q * x) by 8-lane FMAs on the unpacked weights (each packed byte is
// read once and converted once, then used for every activation row), scaled once per group, plus bias * sum(x):
// the exact float result of MLX's formula up to summation order.
#include <immintrin.h>

#include "kernels.h"

#ifndef BONSAI_PREFETCH
#define BONSAI_PREFETCH 2048  // bytes ahead of each weight row read (0: none)
#endif

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

// --- int8 activations (rows_q8_*, see kernels.h) ---------------------------------------------------------------
// 4-bit: one 32-byte load holds blocks 2p and 2p+1 (16 bytes each; low nibbles = even elements, high = odd);
// _mm256_maddubs_epi16 (unsigned nibble x signed int8, pairs summed: |.| <= 2 * 15 * 127, no saturation) on the low
// and high nibbles against xqp's matching bytes, the two added (<= 7620) and widened by _mm256_madd_epi16: int32
// lanes 0-3 = block 2p, 4-7 = block 2p+1, then one FMA with [scale * d_2p x4, scale * d_2p+1 x4].
static inline __m256 pair_vec(float lo, float hi) {  // [lo x4, hi x4]
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(lo)), _mm_set1_ps(hi), 1);
}

static inline __m256 weight_scales(const float* sc, int b, int per_group) {  // the scales of blocks b and b + 1
  if (per_group == 1) return _mm256_blend_ps(_mm256_broadcast_ss(sc + b), _mm256_broadcast_ss(sc + b + 1), 0xF0);
  return _mm256_broadcast_ss(sc + b / per_group);
}

static inline __m256i nibble_dot(__m256i lo, __m256i hi, __m256i xlo, __m256i xhi) {
  const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
  return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

// NB weight rows n .. n+NB-1 against MB activation rows m0 ..: each row's weights, the activations' int8 values and
// block scales loaded once per block pair for all of them (independent accumulators, several streams in flight)
template <int MB, int NB>
static void q8_block4(const QmmArgs& a, int n, int m0) {
  const int G = a.K / a.group_size, nb = a.K / 32, per_group = a.group_size / 32;
  const int64_t row_bytes = a.K / 2;
  const uint8_t* rows = reinterpret_cast<const uint8_t*>(a.w) + static_cast<int64_t>(n) * row_bytes;
  const float* sc = a.scales + static_cast<int64_t>(n) * G;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  int b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m256i xlo[MB], xhi[MB];
    __m256 dv[MB];
    for (int r = 0; r < MB; ++r) {
      const int64_t m = m0 + r;
      const int8_t* xq = a.xqp + m * a.K + 32 * b;
      xlo[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      xhi[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      dv[r] = pair_vec(a.xd[m * nb + b], a.xd[m * nb + b + 1]);
    }
    for (int j = 0; j < NB; ++j) {
      const uint8_t* p = rows + j * row_bytes + 16 * b;
      if (BONSAI_PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(p) + BONSAI_PREFETCH, _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
      const __m256 ws = weight_scales(sc + j * G, b, per_group);
      for (int r = 0; r < MB; ++r)
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(nibble_dot(lo, hi, xlo[r], xhi[r])), _mm256_mul_ps(ws, dv[r]),
                                    acc[r][j]);
    }
  }
  float tail[MB][NB] = {};
  if (b < nb) {  // the last, unpaired block: 16 bytes, xqp [even | odd]
    const __m128i m = _mm_set1_epi8(0x0F);
    for (int j = 0; j < NB; ++j) {
      const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + j * row_bytes + 16 * b));
      const __m128i lo = _mm_and_si128(w, m), hi = _mm_and_si128(_mm_srli_epi16(w, 4), m);
      for (int r = 0; r < MB; ++r) {
        const int64_t mm = m0 + r;
        const int8_t* xq = a.xqp + mm * a.K + 32 * b;
        const __m128i s16 = _mm_add_epi16(
            _mm_maddubs_epi16(lo, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq))),
            _mm_maddubs_epi16(hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16))));
        __m128i i32 = _mm_madd_epi16(s16, _mm_set1_epi16(1));
        i32 = _mm_add_epi32(i32, _mm_shuffle_epi32(i32, 0x4E));
        i32 = _mm_add_epi32(i32, _mm_shuffle_epi32(i32, 0xB1));
        tail[r][j] = sc[j * G + b / per_group] * a.xd[mm * nb + b] * static_cast<float>(_mm_cvtsi128_si32(i32));
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float* bi = a.biases + static_cast<int64_t>(n + j) * G;
    for (int r = 0; r < MB; ++r) {
      const float* xdsum = a.xdsum + static_cast<int64_t>(m0 + r) * G;
      __m256 bv = _mm256_setzero_ps();
      int g = 0;
      for (; g + 8 <= G; g += 8) bv = _mm256_fmadd_ps(_mm256_loadu_ps(bi + g), _mm256_loadu_ps(xdsum + g), bv);
      float t = hsum(bv) + tail[r][j];
      for (; g < G; ++g) t += bi[g] * xdsum[g];
      a.y[static_cast<int64_t>(m0 + r) * a.N + n + j] = hsum(acc[r][j]) + t;
    }
  }
}

// rows [n0, n1) of the output: MB = 1 or 2 activation rows at a time, NB weight rows at a time
template <int NB1, int NB2, void (*B11)(const QmmArgs&, int, int), void (*B1N)(const QmmArgs&, int, int),
          void (*B21)(const QmmArgs&, int, int), void (*B2N)(const QmmArgs&, int, int)>
static void q8_rows(const QmmArgs& a, int n0, int n1) {
  int m = 0;
  for (; m + 2 <= a.M; m += 2) {
    int n = n0;
    for (; n + NB2 <= n1; n += NB2) B2N(a, n, m);
    for (; n < n1; ++n) B21(a, n, m);
  }
  if (m < a.M) {
    int n = n0;
    for (; n + NB1 <= n1; n += NB1) B1N(a, n, m);
    for (; n < n1; ++n) B11(a, n, m);
  }
}

void rows_q8_avx2(const QmmArgs& a, int n0, int n1) {
  if (a.bits == 4)
    return q8_rows<4, 2, q8_block4<1, 1>, q8_block4<1, 4>, q8_block4<2, 1>, q8_block4<2, 2>>(a, n0, n1);
  rows_q8_portable(a, n0, n1);
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
