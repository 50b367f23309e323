// 4-bit weights repacked at load for the AVX-512 VNNI decode kernel (kernels_avx512.cpp), and what reads them back.
//
// MLX's affine layout stores each output row's values together: a row kernel then reduces 16 lanes to one output
// per row, reads a scale and a bias per group of each row separately, and on K = 896 rows (all of Qwen2.5-0.5B's
// but down_proj) that per-row work is a third of its instructions. Here 16 output rows are interleaved so that one
// _mm512_dpbusd_epi32 computes 4 products for each of 16 outputs: activations are broadcast, no horizontal sums,
// one scale vector per group for 16 rows (llama.cpp's repacked Q4_0x8 / Q4_K_8x8 CPU layouts do the same for
// their formats). From DRAM on both cores: `python bench/cpu_qmm.py` compares it with the row layout.
//
// Tiles of 16 output rows (N padded up to a multiple of 16 with zero scales and biases), K a multiple of 32:
//   pw [T, 8K] uint8, T = ceil(N/16): 64-byte chunk c (k = 8c .. 8c+7) of tile t holds at byte 4r + j
//        q[16t + r, 8c + j] | q[16t + r, 8c + 4 + j] << 4   (r: row in tile, j = 0..3)
//   ps, pb [T, G, 16] float32: scale and bias of row 16t + r, group g.
#pragma once

#include <cstdint>

namespace bonsai {

constexpr int kTileRows = 16;

inline int packed_tiles(int N) { return (N + kTileRows - 1) / kTileRows; }

// MLX's [N, K/8] uint32 words + [N, G] scales/biases → the tiles above
void pack_tiles(const uint32_t* w, const float* scales, const float* biases, int N, int K, int group_size,
                uint8_t* pw, float* ps, float* pb);

// rows [n0, n1) of the packed weight (N rows), dequantized and transposed — out[k * ld + (n - n0)] = scale * q + bias
// — the tiles' natural order, for the sgemm of many-row products (n0 a multiple of 16)
void dequantize_packed_t(const uint8_t* pw, const float* ps, const float* pb, int K, int group_size, int n0, int n1,
                         float* out, int64_t ld);

}  // namespace bonsai
