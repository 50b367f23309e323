// One decode step of a Qwen2 / Llama transformer block with MLX-quantized linears, as one MLX primitive on the CPU
// (bonsai_mlx/cpu/block.py is the Python side).
//
// Even with one op per RMSNorm / RoPE / attention (fused.cpp), a 4-bit decode step schedules ~750 graph nodes, and
// on a 2-core CPU that scheduling cost as much as the step's products (`python bench/cpu_decode_ops.py`). This op
// runs the whole block for one token — mlx-lm's TransformerBlock.__call__ (qwen2.py / llama.py):
//   r = o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)) ++ cache, v_proj(n1) ++ cache)),  n1 = rms(x) * w1
//   h = x + r;  out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),  n2 = rms(h) * w2
// with the same kernels as the separate ops (product_rows: the int8-activation or float row kernels and the pool;
// RMSNorm, RoPE with exact angles, softmax attention as fused.cpp), and returns the block's output and the new key
// and value rows, which the caller appends to its KV cache (the attention already saw them). Inference only.
#include "decode_block.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "decode_math.h"
#include "mlx/backend/cpu/encoder.h"
#include "qmm.h"
#include "strided.h"

namespace bonsai {

namespace {
constexpr int kLinears = 7;  // q k v o gate up down
constexpr int kFixed = 5;    // x, norm 1, norm 2, cached keys, cached values
}  // namespace

std::vector<mx::array> decode_block(const std::vector<mx::array>& inputs, const BlockParams& p,
                                    mx::StreamOrDevice s) {
  int n_bias = 0;
  for (int i = 0; i < kLinears; ++i) n_bias += (p.bias_mask >> i) & 1;
  if (static_cast<int>(inputs.size()) != kFixed + 3 * kLinears + n_bias)
    throw std::invalid_argument("[bonsai.decode_block] expected x, 2 norms, keys, values, 7 × (w, scales, biases) "
                                "and the biases that bias_mask names");
  const auto& x = inputs[0];
  const auto& kc = inputs[3];
  if (x.ndim() != 3 || x.shape(0) != 1 || x.shape(1) != 1 || x.dtype() != mx::float32)
    throw std::invalid_argument("[bonsai.decode_block] x must be float32 [1, 1, D]");
  if (kc.ndim() != 4 || kc.shape(0) != 1 || kc.shape(1) != p.n_kv_heads || kc.shape(3) != p.head_dim ||
      kc.shape(2) < p.offset || inputs[4].shape() != kc.shape())
    throw std::invalid_argument("[bonsai.decode_block] keys/values must be [1, Hk, >= offset, head_dim]");
  for (const auto& a : inputs)
    if (a.dtype() != mx::float32 && a.dtype() != mx::uint32)
      throw std::invalid_argument("[bonsai.decode_block] float32 activations, norms and scales only");
  auto st = mx::to_stream(s);
  const mx::Shape kv_shape = {1, p.n_kv_heads, 1, p.head_dim};
  return mx::array::make_arrays({x.shape(), kv_shape, kv_shape}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<DecodeBlock>(st, p), inputs);
}

void DecodeBlock::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) enc.set_input_array(a);
  for (auto& o : outputs) enc.set_output_array(o);
  enc.dispatch([inputs, hp = outputs[0].data<float>(), kp_out = outputs[1].data<float>(),
                vp_out = outputs[2].data<float>(), p = p_]() {
    const int D = inputs[0].shape(2), H = p.n_heads, Hk = p.n_kv_heads, Dh = p.head_dim, S = p.offset;
    std::vector<std::vector<float>> fbufs(inputs.size());
    std::vector<std::vector<uint32_t>> wbufs(inputs.size());
    auto f = [&](int i) { return row_major(inputs[i], fbufs[i]); };
    auto u = [&](int i) { return row_major(inputs[i], wbufs[i]); };
    std::vector<const float*> bias(kLinears, nullptr);
    for (int i = 0, j = kFixed + 3 * kLinears; i < kLinears; ++i)
      if ((p.bias_mask >> i) & 1) bias[i] = f(j++);
    // y [N] = x [K] @ linear_i.T (+ its bias)
    auto linear = [&](int i, const float* xin, int K, float* y) {
      const auto& w = inputs[kFixed + 3 * i];
      const int N = w.shape(0);
      product_rows(xin, u(kFixed + 3 * i), f(kFixed + 3 * i + 1), f(kFixed + 3 * i + 2), y, 1, N, K, p.group_size,
                   p.bits, true);
      if (bias[i])
        for (int n = 0; n < N; ++n) y[n] += bias[i][n];
      return N;
    };
    const float* x = f(0);
    std::vector<float> n1(D), q(static_cast<size_t>(H) * Dh), att(static_cast<size_t>(H) * Dh), o(D), h(D);
    rms_row(x, f(1), p.eps, D, n1.data());
    linear(0, n1.data(), D, q.data());
    linear(1, n1.data(), D, kp_out);  // the new key and value rows are outputs: [1, Hk, 1, Dh]
    linear(2, n1.data(), D, vp_out);
    std::vector<float> cs, sn;
    rope_table(1, Dh, p.rope_base, p.rope_scale, p.offset, cs, sn);
    for (int r = 0; r < H; ++r)
      rope_row(q.data() + r * Dh, q.data() + r * Dh, cs.data(), sn.data(), Dh, p.rope_traditional);
    for (int r = 0; r < Hk; ++r)
      rope_row(kp_out + r * Dh, kp_out + r * Dh, cs.data(), sn.data(), Dh, p.rope_traditional);
    // attention of the one query over the S cached positions and the new one (GQA: query head hh reads KV head
    // hh / (H / Hk)); the cache is read in place through its strides
    const auto& kc = inputs[3];
    const auto& vc = inputs[4];
    std::vector<float> kcopy, vcopy;  // only if a cache buffer's rows are not contiguous (a KVCache's always are)
    const bool kcp = kc.strides()[3] != 1, vcp = vc.strides()[3] != 1;
    const float* kb = kcp ? row_major(kc, kcopy) : kc.data<float>();
    const float* vb = vcp ? row_major(vc, vcopy) : vc.data<float>();
    auto strides = [](const mx::array& a, bool copied) {  // [batch, head, position, channel] in elements
      return copied ? std::vector<int64_t>{0, static_cast<int64_t>(a.shape(2)) * a.shape(3), a.shape(3), 1}
                    : std::vector<int64_t>(a.strides().begin(), a.strides().end());
    };
    const auto ks = strides(kc, kcp), vs = strides(vc, vcp);
    std::vector<float> scratch;
    const int g = H / Hk;
    for (int hh = 0; hh < H; ++hh) {
      const int kh = hh / g;
      attend_row(q.data() + static_cast<int64_t>(hh) * Dh, Dh, kb + kh * ks[1], ks[2], vb + kh * vs[1], vs[2], S,
                 kp_out + static_cast<int64_t>(kh) * Dh, vp_out + static_cast<int64_t>(kh) * Dh, p.attn_scale,
                 att.data() + static_cast<int64_t>(hh) * Dh, scratch);
    }
    linear(3, att.data(), H * Dh, o.data());
    for (int i = 0; i < D; ++i) h[i] = x[i] + o[i];
    rms_row(h.data(), f(2), p.eps, D, n1.data());
    const int F = inputs[kFixed + 3 * 4].shape(0);
    std::vector<float> gt(F), up(F), dn(D);
    linear(4, n1.data(), D, gt.data());
    linear(5, n1.data(), D, up.data());
    for (int i = 0; i < F; ++i) gt[i] = gt[i] / (1.0f + std::exp(-gt[i])) * up[i];
    linear(6, gt.data(), F, dn.data());
    for (int i = 0; i < D; ++i) hp[i] = h[i] + dn[i];
  });
}

bool DecodeBlock::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeBlock&>(other).p_;
  return p_.eps == o.eps && p_.n_heads == o.n_heads && p_.n_kv_heads == o.n_kv_heads && p_.head_dim == o.head_dim &&
         p_.rope_traditional == o.rope_traditional && p_.rope_base == o.rope_base && p_.rope_scale == o.rope_scale &&
         p_.offset == o.offset && p_.attn_scale == o.attn_scale && p_.group_size == o.group_size &&
         p_.bits == o.bits && p_.bias_mask == o.bias_mask;
}

}  // namespace bonsai
