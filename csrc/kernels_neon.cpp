// NEON row kernels (aarch64, where NEON is always present): the same arithmetic as kernels_avx2.cpp on 4-lane
// float32 vectors — each packed byte read once, unpacked once, fused multiply-adds per activation row, one scale per
// group, bias · sum(x). Checked against the portable kernels under qemu (tests/test_qmm.py).
#include <arm_neon.h>

#include "kernels.h"

namespace bonsai {

// 32 values of one chunk as 8 × 4 floats (4-bit: low nibbles = even elements, high nibbles = odd ones, matching
// `xperm`; 8-bit: in order)
static inline void widen16(uint8x16_t v, float32x4_t* out) {
  const uint16x8_t a = vmovl_u8(vget_low_u8(v)), b = vmovl_u8(vget_high_u8(v));
  out[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(a)));
  out[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(a)));
  out[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(b)));
  out[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(b)));
}

static inline void unpack(const uint8_t* p, int bits, float32x4_t w[8]) {
  if (bits == 4) {
    const uint8x16_t b = vld1q_u8(p);
    widen16(vandq_u8(b, vdupq_n_u8(0x0F)), w);
    widen16(vshrq_n_u8(b, 4), w + 4);
  } else {
    widen16(vld1q_u8(p), w);
    widen16(vld1q_u8(p + 16), w + 4);
  }
}

template <int MB>
static void rows_block(const QmmArgs& a, int n, int m0) {
  const int G = a.K / a.group_size, chunks = a.group_size / 32, row_bytes = a.K * a.bits / 8;
  const uint8_t* row = reinterpret_cast<const uint8_t*>(a.w) + static_cast<int64_t>(n) * row_bytes;
  const float* sc = a.scales + static_cast<int64_t>(n) * G;
  const float* xs = a.bits == 4 ? a.xperm : a.x;
  float32x4_t tot[MB];
  for (int r = 0; r < MB; ++r) tot[r] = vdupq_n_f32(0.0f);
  for (int g = 0; g < G; ++g) {
    float32x4_t acc[MB][4];
    for (int r = 0; r < MB; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = vdupq_n_f32(0.0f);
    for (int c = 0; c < chunks; ++c) {
      const int k = (g * chunks + c) * 32;
      float32x4_t w[8];
      unpack(row + k * a.bits / 8, a.bits, w);
      for (int r = 0; r < MB; ++r) {
        const float* x = xs + static_cast<int64_t>(m0 + r) * a.K + k;
        for (int i = 0; i < 8; ++i) acc[r][i & 3] = vfmaq_f32(acc[r][i & 3], w[i], vld1q_f32(x + 4 * i));
      }
    }
    for (int r = 0; r < MB; ++r)
      tot[r] = vfmaq_n_f32(tot[r], vaddq_f32(vaddq_f32(acc[r][0], acc[r][1]), vaddq_f32(acc[r][2], acc[r][3])), sc[g]);
  }
  const float* bi = a.biases + static_cast<int64_t>(n) * G;
  for (int r = 0; r < MB; ++r) {
    const float* xsum = a.xsum + static_cast<int64_t>(m0 + r) * G;
    float b = 0.0f;
    for (int g = 0; g < G; ++g) b += bi[g] * xsum[g];
    a.y[static_cast<int64_t>(m0 + r) * a.N + n] = vaddvq_f32(tot[r]) + b;
  }
}

void rows_neon(const QmmArgs& a, int n0, int n1) {
  if ((a.bits != 4 && a.bits != 8) || a.group_size % 32) return rows_portable(a, n0, n1);
  for (int n = n0; n < n1; ++n) {
    int m = 0;
    for (; m + 2 <= a.M; m += 2) rows_block<2>(a, n, m);
    if (m < a.M) rows_block<1>(a, n, m);
  }
}

void dequantize_rows_neon(const uint32_t* w, const float* scales, const float* biases, int K, int group_size, int bits,
                          int n0, int n1, float* out) {
  if ((bits != 4 && bits != 8) || group_size % 32) return dequantize_rows(w, scales, biases, K, group_size, bits, n0, n1, out);
  const int G = K / group_size, row_bytes = K * bits / 8;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(w) + static_cast<int64_t>(n) * row_bytes;
    float* o = out + static_cast<int64_t>(n - n0) * K;
    for (int g = 0; g < G; ++g) {
      const float s = scales[static_cast<int64_t>(n) * G + g];
      const float32x4_t b = vdupq_n_f32(biases[static_cast<int64_t>(n) * G + g]);
      for (int k = g * group_size; k < (g + 1) * group_size; k += 32) {
        uint8x16_t v[2];
        if (bits == 4) {
          const uint8x16_t x = vld1q_u8(row + k / 2);
          const uint8x16_t lo = vandq_u8(x, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(x, 4);
          v[0] = vzip1q_u8(lo, hi);  // elements k .. k+15 in order
          v[1] = vzip2q_u8(lo, hi);
        } else {
          v[0] = vld1q_u8(row + k);
          v[1] = vld1q_u8(row + k + 16);
        }
        for (int h = 0; h < 2; ++h) {
          float32x4_t q[4];
          widen16(v[h], q);
          for (int i = 0; i < 4; ++i) vst1q_f32(o + k + 16 * h + 4 * i, vfmaq_n_f32(b, q[i], s));
        }
      }
    }
  }
}

}  // namespace bonsai
