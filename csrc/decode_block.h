// A transformer block's decode step (one token per sequence, B sequences) as one CPU primitive (decode_block.cpp says why and what).
#pragma once

#include <stdexcept>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace bonsai {

struct BlockParams {
  float eps = 1e-6f;          // both RMSNorms
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  bool rope_traditional = false;
  float rope_base = 10000.0f, rope_scale = 1.0f;
  std::vector<int> offsets;   // per row: the new token's position = the cached positions read
  float attn_scale = 1.0f;
  int group_size = 64, bits = 4;
  int bias_mask = 0;          // bit i: linear i (q k v o gate up down) has a bias, passed after the 7 triples
  std::vector<int> packed_n;  // empty: MLX-layout linears; else all 7 are packed.h tiles, of these output rows
};

// B rows (sequences), each with its own KV cache and position: inputs x [B, 1, D], norm 1 [D], norm 2 [D], then per
// row b its keys and values [1, Hk, >= offsets[b], head_dim] (the cache's buffers: positions < offsets[b] are read),
// then (w, scales, biases) of q k v o gate up down (or their packed tiles: packed_n), then the biases of bias_mask.
// Returns the block's output [B, 1, D] and per row its new key and value rows [1, Hk, 1, head_dim] (rotated key):
// [out, k_0, v_0, k_1, v_1, ...]. The products run on all B rows at once (each weight byte read once per step).
std::vector<mx::array> decode_block(const std::vector<mx::array>& inputs, const BlockParams& p,
                                    mx::StreamOrDevice s = {});

class DecodeBlock : public mx::Primitive {
 public:
  DecodeBlock(mx::Stream stream, BlockParams p) : mx::Primitive(stream), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[bonsai.decode_block] CPU only");
  }
  const char* name() const override { return "BonsaiDecodeBlock"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const mx::Shape kv = {1, p_.n_kv_heads, 1, p_.head_dim};
    std::vector<mx::Shape> out = {inputs[0].shape()};
    for (size_t b = 0; b < 2 * p_.offsets.size(); ++b) out.push_back(kv);
    return out;
  }

 private:
  BlockParams p_;
};

}  // namespace bonsai
