// Portable row kernels (any CPU): the reference the vectorized ones are tested against, and the fallback.
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
