// AVX-512 VNNI int8-activation row kernel for 4-bit weights (x86-64). This file is compiled with -mavx512f
// -mavx512bw -mavx512vl -mavx512vnni; qmm.cpp calls it only after checking the CPU has all four (Zen 4+, Ice Lake+),
// so the library still loads elsewhere and uses kernels_avx2.cpp.
//
// The arithmetic of rows_q8_avx2 (kernels.h) on 64-byte loads — four 32-blocks of one weight row at once — with
// _mm512_dpbusd_epi32 (unsigned nibble x signed int8, four products summed straight into int32: no int16 step):
// about half the instructions per weight byte of the AVX2 kernel, which is bound by instructions, not memory.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstring>

#include "kernels.h"
#include "packed.h"

#ifndef BONSAI_PREFETCH
#define BONSAI_PREFETCH 2048  // bytes ahead of each weight row read (0: none)
#endif

namespace bonsai {

// sum over the 32 values of block b of weight row `row` (packed 4-bit) times its int8 activations (natural order)
static inline int32_t block_dot(const uint8_t* row, const int8_t* xq, int b) {
  int32_t s = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t v = row[16 * b + j];
    s += static_cast<int32_t>(v & 0x0F) * xq[32 * b + 2 * j] + static_cast<int32_t>(v >> 4) * xq[32 * b + 2 * j + 1];
  }
  return s;
}

// [v[0] x4, v[1] x4, v[2] x4, v[3] x4] from 4 floats at p (quads of lanes: the 4 blocks of a 64-byte load)
static inline __m512 per_block(const float* p) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(p)));
}

// the weight scales of blocks b .. b+3 of one row (lane quads as per_block)
static inline __m512 weight_scales(const float* sc, int b, int per_group) {
  if (per_group == 1) return per_block(sc + b);
  if (per_group == 2) {  // groups b/2 and b/2 + 1, eight lanes each; a masked load never reads past the row
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_maskz_loadu_ps(0x3, sc + b / 2)));
  }
  return _mm512_set1_ps(sc[b / per_group]);
}

template <int MB, int NB>
static void q8_block(const QmmArgs& a, int n, int m0) {
  const int G = a.K / a.group_size, nb = a.K / 32, per_group = a.group_size / 32;
  const int64_t row_bytes = a.K / 2;
  const uint8_t* rows = reinterpret_cast<const uint8_t*>(a.w) + static_cast<int64_t>(n) * row_bytes;
  const float* sc = a.scales + static_cast<int64_t>(n) * G;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  int b = 0;
  for (; b + 4 <= nb; b += 4) {
    __m512i xlo[MB], xhi[MB];
    __m512 dv[MB];
    for (int r = 0; r < MB; ++r) {
      const int64_t m = m0 + r;
      // xqp holds pairs [even 2p | even 2p+1 | odd 2p | odd 2p+1]: the evens of four blocks from two pairs
      const int8_t* xq = a.xqp + m * a.K + 32 * b;
      const __m256i e0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i o0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      const __m256i e1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64));
      const __m256i o1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 96));
      xlo[r] = _mm512_inserti64x4(_mm512_castsi256_si512(e0), e1, 1);
      xhi[r] = _mm512_inserti64x4(_mm512_castsi256_si512(o0), o1, 1);
      dv[r] = per_block(a.xd + m * nb + b);
    }
    for (int j = 0; j < NB; ++j) {
      const uint8_t* p = rows + j * row_bytes + 16 * b;
      if (BONSAI_PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(p) + BONSAI_PREFETCH, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(p);
      const __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
      const __m512 ws = weight_scales(sc + j * G, b, per_group);
      for (int r = 0; r < MB; ++r) {
        const __m512i i32 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[r]), hi, xhi[r]);
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i32), _mm512_mul_ps(ws, dv[r]), acc[r][j]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const uint8_t* row = rows + j * row_bytes;
    const float* scj = sc + j * G;
    const float* bi = a.biases + static_cast<int64_t>(n + j) * G;
    for (int r = 0; r < MB; ++r) {
      const int64_t m = m0 + r;
      float t = _mm512_reduce_add_ps(acc[r][j]);
      for (int bb = b; bb < nb; ++bb)  // up to three blocks past the last 64-byte load
        t += scj[bb / per_group] * a.xd[m * nb + bb] * static_cast<float>(block_dot(row, a.xq + m * a.K, bb));
      const float* xdsum = a.xdsum + m * G;
      __m512 bv = _mm512_setzero_ps();
      int g = 0;
      for (; g + 16 <= G; g += 16) bv = _mm512_fmadd_ps(_mm512_loadu_ps(bi + g), _mm512_loadu_ps(xdsum + g), bv);
      if (g < G) {
        const __mmask16 k = static_cast<__mmask16>((1u << (G - g)) - 1u);
        bv = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, bi + g), _mm512_maskz_loadu_ps(k, xdsum + g), bv);
      }
      a.y[m * a.N + n + j] = t + _mm512_reduce_add_ps(bv);
    }
  }
}

void rows_q8_avx512(const QmmArgs& a, int n0, int n1) {
  if (a.bits != 4) return rows_q8_portable(a, n0, n1);
  int m = 0;
  for (; m + 4 <= a.M; m += 4) {  // a batch of sequences (the server): four rows share each weight load
    int n = n0;
    for (; n + 2 <= n1; n += 2) q8_block<4, 2>(a, n, m);
    for (; n < n1; ++n) q8_block<4, 1>(a, n, m);
  }
  for (; m + 2 <= a.M; m += 2) {
    int n = n0;
    for (; n + 2 <= n1; n += 2) q8_block<2, 2>(a, n, m);
    for (; n < n1; ++n) q8_block<2, 1>(a, n, m);
  }
  if (m < a.M) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) q8_block<1, 4>(a, n, m);
    for (; n < n1; ++n) q8_block<1, 1>(a, n, m);
  }
}

// acc += u8(w) · s8(the 4 bytes at x, broadcast to every lane): vpdpbusd with an embedded {1to16} broadcast, which
// GCC does not fold from _mm512_set1_epi32 (a separate vpbroadcastd per product otherwise)
static inline __m512i dot_bcast(__m512i acc, __m512i w, const int8_t* x) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// The 16-row tiles of packed.h: for rows m0 .. m0+MB-1 of x, the 16 outputs of tile t. Per 32-block: 4 chunks of 64
// bytes; per chunk and row two dot_bcast — the low nibbles (w & 0x0F) with x[8c .. 8c+3], the high nibbles in place
// (w & 0xF0, i.e. 16 × the value: no shift per chunk) with x[8c+4 .. 8c+7]; per block the high sum shifted back
// (exact: a multiple of 16), converted and FMA'd with the tile's 16 scales times the block's d_b; per group one FMA
// of the biases with xdsum. About 5 instructions per 64 weight bytes and row, no horizontal sums.
template <int MB>
static void packed_tile(const QmmArgs& a, int t, int m0) {
  const int K = a.K, G = K / a.group_size, per_group = a.group_size / 32, nb = K / 32;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(a.w) + static_cast<int64_t>(t) * 8 * K;
  const float* sc = a.scales + static_cast<int64_t>(t) * G * kTileRows;
  const float* bi = a.biases + static_cast<int64_t>(t) * G * kTileRows;
  const __m512i m_lo = _mm512_set1_epi8(0x0F), m_hi = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int8_t* xr[MB];
  for (int r = 0; r < MB; ++r) xr[r] = a.xq + static_cast<int64_t>(m0 + r) * K;
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    const __m512 s = _mm512_loadu_ps(sc + kTileRows * g);
    for (int bb = 0; bb < per_group; ++bb) {
      const int b = g * per_group + bb;
      __m512i lo[MB], hi[MB];
      for (int r = 0; r < MB; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c, p += 64) {
        if (BONSAI_PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(p) + BONSAI_PREFETCH, _MM_HINT_T0);
        const __m512i w = _mm512_loadu_si512(p);
        const __m512i wl = _mm512_and_si512(w, m_lo), wh = _mm512_and_si512(w, m_hi);
        for (int r = 0; r < MB; ++r) {
          const int8_t* x = xr[r] + 32 * b + 8 * c;
          lo[r] = dot_bcast(lo[r], wl, x);
          hi[r] = dot_bcast(hi[r], wh, x + 4);
        }
      }
      for (int r = 0; r < MB; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo[r], _mm512_srai_epi32(hi[r], 4))),
                                 _mm512_mul_ps(s, _mm512_set1_ps(a.xd[static_cast<int64_t>(m0 + r) * nb + b])), acc[r]);
    }
    const __m512 bv = _mm512_loadu_ps(bi + kTileRows * g);
    for (int r = 0; r < MB; ++r)
      acc[r] = _mm512_fmadd_ps(bv, _mm512_set1_ps(a.xdsum[static_cast<int64_t>(m0 + r) * G + g]), acc[r]);
  }
  const int rows = std::min(kTileRows, a.N - kTileRows * t);
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1u);
  for (int r = 0; r < MB; ++r) _mm512_mask_storeu_ps(a.y + static_cast<int64_t>(m0 + r) * a.N + kTileRows * t, keep, acc[r]);
}

// Tiles outer, rows inner: a tile (7 KB at K = 896) is read from memory once and stays in L1 for every row, so many
// rows (a prompt) reuse it like a GEMM's packed panel; 8 rows per pass where there are that many (24 accumulators).
void rows_q8_packed_avx512(const QmmArgs& a, int t0, int t1) {
  for (int t = t0; t < t1; ++t) {
    int m = 0;
    for (; m + 8 <= a.M; m += 8) packed_tile<8>(a, t, m);
    for (; m + 4 <= a.M; m += 4) packed_tile<4>(a, t, m);
    for (; m + 2 <= a.M; m += 2) packed_tile<2>(a, t, m);
    for (; m < a.M; ++m) packed_tile<1>(a, t, m);
  }
}

// dequantize_packed_t (packed.h) for tiles: each 64-byte chunk gives, for each of its 8 k, the 16 rows' values as one
// vector (byte j of every dword lane), scaled by the group's 16 scales and biases and stored as 16 floats.
void dequantize_packed_t_avx512(const uint8_t* pw, const float* ps, const float* pb, int K, int group_size, int n0,
                                int n1, int N, float* out, int64_t ld) {
  const int G = K / group_size;
  const __m512i m4 = _mm512_set1_epi8(0x0F), byte = _mm512_set1_epi32(0xFF);
  for (int n = n0; n < n1; n += kTileRows) {
    const int t = n / kTileRows, rows = std::min(kTileRows, N - n);
    const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1u);
    const uint8_t* tile = pw + static_cast<int64_t>(t) * 8 * K;
    const float* s = ps + static_cast<int64_t>(t) * G * kTileRows;
    const float* b = pb + static_cast<int64_t>(t) * G * kTileRows;
    float* o = out + (n - n0);
    for (int c = 0; c < K / 8; ++c) {
      const int g = 8 * c / group_size;
      const __m512 sv = _mm512_loadu_ps(s + g * kTileRows), bv = _mm512_loadu_ps(b + g * kTileRows);
      const __m512i w = _mm512_loadu_si512(tile + 64 * c);
      const __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
      for (int j = 0; j < 4; ++j) {
        const __m512 vl = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lo, 8 * j), byte));
        const __m512 vh = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(hi, 8 * j), byte));
        _mm512_mask_storeu_ps(o + static_cast<int64_t>(8 * c + j) * ld, keep, _mm512_fmadd_ps(vl, sv, bv));
        _mm512_mask_storeu_ps(o + static_cast<int64_t>(8 * c + 4 + j) * ld, keep, _mm512_fmadd_ps(vh, sv, bv));
      }
    }
  }
}

// e^x for x <= 0 (softmax after subtracting the maximum): 2^(x log2 e) as 2^n · 2^f, |f| <= 1/2, 2^f by its
// degree-6 Taylor polynomial (relative error < 2e-7), 2^n by vscalefps; below -87 it flushes to 0 as expf does.
static inline __m512 exp_neg(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(1.5403530e-4f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022651e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// decode_math.h's attend_row with 16-wide FMAs and a vectorized exp, for head_dim a multiple of 16 (64, 128)
void attend_row_avx512(const float* q, int Dh, const float* k, int64_t k_step, const float* v, int64_t v_step, int S,
                       const float* k_new, const float* v_new, float scale, float* out, std::vector<float>& p) {
  const int T = S + (k_new ? 1 : 0), C = Dh / 16;
  p.resize(static_cast<size_t>(T) + 16);
  __m512 qv[8];  // Dh <= 128
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  float mx = -INFINITY;
  for (int j = 0; j < T; ++j) {
    const float* kr = j < S ? k + j * k_step : k_new;
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
    for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), acc);
    p[j] = _mm512_reduce_add_ps(acc) * scale;
    mx = std::max(mx, p[j]);
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < T; j += 16) {
    const __mmask16 keep = static_cast<__mmask16>(T - j >= 16 ? 0xFFFFu : (1u << (T - j)) - 1u);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, p.data() + j), m));
    _mm512_mask_storeu_ps(p.data() + j, keep, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(keep, e));
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(sum);
  __m512 o[8];
  for (int c = 0; c < C; ++c) o[c] = _mm512_setzero_ps();
  for (int j = 0; j < T; ++j) {
    const float* vr = j < S ? v + j * v_step : v_new;
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int c = 0; c < C; ++c) o[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * c), o[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], _mm512_set1_ps(inv)));
}

}  // namespace bonsai
