// Portable row kernels (any CPU): the reference the vectorized ones are tested against, and the fallback.
#include <cmath>

#include "kernels.h"

namespace bonsai {

static inline unsigned value_at(const uint32_t* row, int k, int bits) {
  const int per = 32 / bits;
  return (row[k / per] >> ((k % per) * bits)) & ((1u << bits) - 1u);
}

void rows_portable(const QmmArgs& a, int n0, int n1) {
  const int G = a.K / a.group_size;
  const int words = a.K * a.bits / 32;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* row = a.w + static_cast<int64_t>(n) * words;
    const float* sc = a.scales + static_cast<int64_t>(n) * G;
    const float* bi = a.biases + static_cast<int64_t>(n) * G;
    for (int m = 0; m < a.M; ++m) {
      const float* x = a.x + static_cast<int64_t>(m) * a.K;
      float acc = 0.0f;
      for (int g = 0; g < G; ++g) {
        float dot = 0.0f;
        for (int k = g * a.group_size; k < (g + 1) * a.group_size; ++k) {
          dot += static_cast<float>(value_at(row, k, a.bits)) * x[k];
        }
        acc += sc[g] * dot + bi[g] * a.xsum[static_cast<int64_t>(m) * G + g];
      }
      a.y[static_cast<int64_t>(m) * a.N + n] = acc;
    }
  }
}

void quantize_activations(const float* x, int M, int K, int group_size, int bits, int8_t* xq, int8_t* xqp, float* xd,
                          float* xdsum) {
  const int nb = K / 32, G = K / group_size, per_group = group_size / 32;
  for (int m = 0; m < M; ++m) {
    const float* xr = x + static_cast<int64_t>(m) * K;
    int8_t* q = xq + static_cast<int64_t>(m) * K;
    int8_t* qp = xqp ? xqp + static_cast<int64_t>(m) * K : nullptr;
    float* d = xd + static_cast<int64_t>(m) * nb;
    float* ds = xdsum + static_cast<int64_t>(m) * G;
    for (int g = 0; g < G; ++g) ds[g] = 0.0f;
    for (int b = 0; b < nb; ++b) {
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(xr[32 * b + i]));
      const float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int sum = 0;
      for (int i = 0; i < 32; ++i) {
        // round half to even by the 1.5 * 2^23 trick (exact for |v| < 2^22; here |v| <= 127): no libm call, and the
        // loop vectorizes where std::nearbyint would not (x86-64's baseline has no roundps)
        const float r = (xr[32 * b + i] * inv + 12582912.0f) - 12582912.0f;
        const int v = static_cast<int>(r);
        q[32 * b + i] = static_cast<int8_t>(v);
        sum += v;
      }
      d[b] = db;
      ds[b / per_group] += db * static_cast<float>(sum);
    }
    if (!xqp) continue;  // the packed-tile kernel reads xq only
    if (bits != 4) {
      for (int k = 0; k < K; ++k) qp[k] = q[k];
      continue;
    }
    for (int b = 0; b < nb; ++b) {
      const int8_t* src = q + 32 * b;
      if (b + 1 < nb || nb % 2 == 0) {  // in a pair: [even 2p | even 2p+1 | odd 2p | odd 2p+1]
        int8_t* dst = qp + 64 * (b / 2) + 16 * (b % 2);
        for (int i = 0; i < 16; ++i) {
          dst[i] = src[2 * i];
          dst[32 + i] = src[2 * i + 1];
        }
      } else {  // the last, unpaired block: [even | odd]
        int8_t* dst = qp + 32 * b;
        for (int i = 0; i < 16; ++i) {
          dst[i] = src[2 * i];
          dst[16 + i] = src[2 * i + 1];
        }
      }
    }
  }
}

void rows_q8_portable(const QmmArgs& a, int n0, int n1) {
  const int G = a.K / a.group_size, nb = a.K / 32, per_group = a.group_size / 32;
  const int words = a.K * a.bits / 32;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* row = a.w + static_cast<int64_t>(n) * words;
    const float* sc = a.scales + static_cast<int64_t>(n) * G;
    const float* bi = a.biases + static_cast<int64_t>(n) * G;
    for (int m = 0; m < a.M; ++m) {
      const int8_t* q = a.xq + static_cast<int64_t>(m) * a.K;
      const float* d = a.xd + static_cast<int64_t>(m) * nb;
      float acc = 0.0f;
      for (int g = 0; g < G; ++g) {
        float dot = 0.0f;
        for (int b = g * per_group; b < (g + 1) * per_group; ++b) {
          int32_t s = 0;  // exact: |s| <= 32 * 255 * 127
          for (int k = 32 * b; k < 32 * (b + 1); ++k) s += static_cast<int32_t>(value_at(row, k, a.bits)) * q[k];
          dot += d[b] * static_cast<float>(s);
        }
        acc += sc[g] * dot + bi[g] * a.xdsum[static_cast<int64_t>(m) * G + g];
      }
      a.y[static_cast<int64_t>(m) * a.N + n] = acc;
    }
  }
}

void dequantize_rows(const uint32_t* w, const float* scales, const float* biases, int K, int group_size, int bits,
                     int n0, int n1, float* out) {
  const int G = K / group_size;
  const int words = K * bits / 32;
  const int per = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* row = w + static_cast<int64_t>(n) * words;
    float* o = out + static_cast<int64_t>(n - n0) * K;
    for (int g = 0; g < G; ++g) {
      const float s = scales[static_cast<int64_t>(n) * G + g], b = biases[static_cast<int64_t>(n) * G + g];
      for (int k = g * group_size; k < (g + 1) * group_size; k += per) {
        uint32_t word = row[k / per];
        for (int j = 0; j < per; ++j, word >>= bits) o[k + j] = s * static_cast<float>(word & mask) + b;
      }
    }
  }
}

}  // namespace bonsai
