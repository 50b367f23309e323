// Packing and dequantizing the 16-row tiles of packed.h (portable C++; the product is kernels_avx512.cpp).
#include "packed.h"

#include <algorithm>
#include <cstring>

namespace bonsai {

void pack_tiles(const uint32_t* w, const float* scales, const float* biases, int N, int K, int group_size,
                uint8_t* pw, float* ps, float* pb) {
  const int T = packed_tiles(N), G = K / group_size, words = K / 8;
  std::memset(pw, 0, static_cast<size_t>(T) * 8 * K);
  std::fill(ps, ps + static_cast<size_t>(T) * G * kTileRows, 0.0f);
  std::fill(pb, pb + static_cast<size_t>(T) * G * kTileRows, 0.0f);
  for (int n = 0; n < N; ++n) {
    const int t = n / kTileRows, r = n % kTileRows;
    const uint32_t* row = w + static_cast<int64_t>(n) * words;
    uint8_t* tile = pw + static_cast<int64_t>(t) * 8 * K;
    for (int c = 0; c < K / 8; ++c) {
      const uint32_t word = row[c];  // values 8c .. 8c+7, low nibble first
      for (int j = 0; j < 4; ++j)
        tile[64 * c + 4 * r + j] = static_cast<uint8_t>(((word >> (4 * j)) & 0xF) | (((word >> (4 * (j + 4))) & 0xF) << 4));
    }
    for (int g = 0; g < G; ++g) {
      ps[(static_cast<int64_t>(t) * G + g) * kTileRows + r] = scales[static_cast<int64_t>(n) * G + g];
      pb[(static_cast<int64_t>(t) * G + g) * kTileRows + r] = biases[static_cast<int64_t>(n) * G + g];
    }
  }
}

void dequantize_packed_t(const uint8_t* pw, const float* ps, const float* pb, int K, int group_size, int n0, int n1,
                         float* out, int64_t ld) {
  const int G = K / group_size;
  for (int n = n0; n < n1; ++n) {
    const int t = n / kTileRows, r = n % kTileRows;
    const uint8_t* tile = pw + static_cast<int64_t>(t) * 8 * K + 4 * r;
    const float* s = ps + static_cast<int64_t>(t) * G * kTileRows + r;
    const float* b = pb + static_cast<int64_t>(t) * G * kTileRows + r;
    for (int c = 0; c < K / 8; ++c) {
      const int g = 8 * c / group_size;
      const float sc = s[g * kTileRows], bi = b[g * kTileRows];
      for (int j = 0; j < 4; ++j) {
        out[static_cast<int64_t>(8 * c + j) * ld + (n - n0)] = sc * static_cast<float>(tile[64 * c + j] & 0xF) + bi;
        out[static_cast<int64_t>(8 * c + 4 + j) * ld + (n - n0)] = sc * static_cast<float>(tile[64 * c + j] >> 4) + bi;
      }
    }
  }
}

}  // namespace bonsai
