// One decode step of a Qwen2 / Llama transformer block with MLX-quantized linears, as one MLX primitive on the CPU
// (bonsai_mlx/cpu/block.py is the Python side), for B sequences at once (the server's continuous batching): the
// products take all B rows (the few-row kernels read each weight byte once for them), RoPE and attention run per row
// over that row's own KV cache and position.
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
constexpr int kNorms = 3;    // x, norm 1, norm 2; then the B rows' cached keys and values
// a decode step of up to this many sequences runs its products on the row kernels (B = 8: 428 → 135 ms a step on the
// real-size student here, where dequantized tiles + sgemm re-expand every weight each step); qmm.py's DECODE_ROWS
constexpr int kRowKernelRows = 17;
}  // namespace

std::vector<mx::array> decode_block(const std::vector<mx::array>& inputs, const BlockParams& p,
                                    mx::StreamOrDevice s) {
  const int B = static_cast<int>(p.offsets.size());
  int n_bias = 0;
  for (int i = 0; i < kLinears; ++i) n_bias += (p.bias_mask >> i) & 1;
  if (B < 1 || static_cast<int>(inputs.size()) != kNorms + 2 * B + 3 * kLinears + n_bias)
    throw std::invalid_argument("[bonsai.decode_block] expected x, 2 norms, keys and values per row (offsets), "
                                "7 × (w, scales, biases) and the biases that bias_mask names");
  const auto& x = inputs[0];
  if (x.ndim() != 3 || x.shape(0) != B || x.shape(1) != 1 || x.dtype() != mx::float32)
    throw std::invalid_argument("[bonsai.decode_block] x must be float32 [B, 1, D], B = len(offsets)");
  for (int b = 0; b < B; ++b) {
    const auto& kc = inputs[kNorms + 2 * b];
    if (kc.ndim() != 4 || kc.shape(0) != 1 || kc.shape(1) != p.n_kv_heads || kc.shape(3) != p.head_dim ||
        kc.shape(2) < p.offsets[b] || p.offsets[b] < 0 || inputs[kNorms + 2 * b + 1].shape() != kc.shape())
      throw std::invalid_argument("[bonsai.decode_block] each row's keys/values must be [1, Hk, >= offset, head_dim]");
  }
  for (const auto& a : inputs)
    if (a.dtype() != mx::float32 && a.dtype() != (p.packed_n.empty() ? mx::uint32 : mx::uint8))
      throw std::invalid_argument("[bonsai.decode_block] float32 activations, norms and scales only");
  if (!p.packed_n.empty() && (static_cast<int>(p.packed_n.size()) != kLinears || p.bits != 4))
    throw std::invalid_argument("[bonsai.decode_block] packed_n names the output rows of all 7 packed 4-bit linears");
  auto st = mx::to_stream(s);
  const mx::Shape kv_shape = {1, p.n_kv_heads, 1, p.head_dim};
  std::vector<mx::Shape> shapes = {x.shape()};
  for (int i = 0; i < 2 * B; ++i) shapes.push_back(kv_shape);
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                std::make_shared<DecodeBlock>(st, p), inputs);
}

void DecodeBlock::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) enc.set_input_array(a);
  for (auto& o : outputs) enc.set_output_array(o);
  std::vector<float*> kv_out;  // row b's new key at 2b, its new value at 2b + 1: [Hk, Dh] each
  for (size_t i = 1; i < outputs.size(); ++i) kv_out.push_back(outputs[i].data<float>());
  enc.dispatch([inputs, hp = outputs[0].data<float>(), kv_out, p = p_]() {
    const int B = static_cast<int>(p.offsets.size());
    const int D = inputs[0].shape(2), H = p.n_heads, Hk = p.n_kv_heads, Dh = p.head_dim;
    const int kFixed = kNorms + 2 * B;
    std::vector<std::vector<float>> fbufs(inputs.size());
    std::vector<std::vector<uint32_t>> wbufs(inputs.size());
    std::vector<std::vector<uint8_t>> pbufs(inputs.size());
    const bool packed = !p.packed_n.empty();
    auto f = [&](int i) { return row_major(inputs[i], fbufs[i]); };
    auto u = [&](int i) {
      return packed ? reinterpret_cast<const uint32_t*>(row_major(inputs[i], pbufs[i])) : row_major(inputs[i], wbufs[i]);
    };
    auto rows_of = [&](int i) { return packed ? p.packed_n[i] : inputs[kFixed + 3 * i].shape(0); };
    std::vector<const float*> bias(kLinears, nullptr);
    for (int i = 0, j = kFixed + 3 * kLinears; i < kLinears; ++i)
      if ((p.bias_mask >> i) & 1) bias[i] = f(j++);
    // y [B, N] = x [B, K] @ linear_i.T (+ its bias): all rows in one product
    auto linear = [&](int i, const float* xin, int K, float* y) {
      const int N = rows_of(i);
      product_rows(xin, u(kFixed + 3 * i), f(kFixed + 3 * i + 1), f(kFixed + 3 * i + 2), y, B, N, K, p.group_size,
                   p.bits, true, kRowKernelRows, packed);
      if (bias[i])
        for (int b = 0; b < B; ++b)
          for (int n = 0; n < N; ++n) y[static_cast<int64_t>(b) * N + n] += bias[i][n];
      return N;
    };
    // linears of one input: packed ones quantize it once and share one parallel_for (packed_products)
    auto linears = [&](std::vector<int> ids, const float* xin, int K, std::vector<float*> ys) {
      if (!packed) {
        for (size_t j = 0; j < ids.size(); ++j) linear(ids[j], xin, K, ys[j]);
        return;
      }
      std::vector<PackedLinear> ls;
      for (size_t j = 0; j < ids.size(); ++j) {
        const int i = ids[j];
        ls.push_back({reinterpret_cast<const uint8_t*>(u(kFixed + 3 * i)), f(kFixed + 3 * i + 1),
                      f(kFixed + 3 * i + 2), rows_of(i), ys[j]});
      }
      packed_products(xin, B, K, p.group_size, ls, kRowKernelRows);
      for (size_t j = 0; j < ids.size(); ++j)
        if (bias[ids[j]])
          for (int b = 0; b < B; ++b)
            for (int n = 0; n < rows_of(ids[j]); ++n) ys[j][static_cast<int64_t>(b) * rows_of(ids[j]) + n] += bias[ids[j]][n];
    };
    const float* x = f(0);
    const int64_t HD = static_cast<int64_t>(H) * Dh, KD = static_cast<int64_t>(Hk) * Dh;
    std::vector<float> n1(static_cast<size_t>(B) * D), q(B * HD), kn(B * KD), vn(B * KD), att(B * HD),
        o(static_cast<size_t>(B) * D), h(static_cast<size_t>(B) * D);
    for (int b = 0; b < B; ++b) rms_row(x + static_cast<int64_t>(b) * D, f(1), p.eps, D, n1.data() + b * D);
    linears({0, 1, 2}, n1.data(), D, {q.data(), kn.data(), vn.data()});
    // RoPE per row at its own position; then attention of each (row, query head) over that row's own S cached
    // positions and the new one (GQA: query head hh reads KV head hh / (H / Hk)), on the pool: B·H independent
    // tasks. The cache is read in place through its strides (a KVCache's rows are contiguous; else a copy).
    std::vector<const float*> kbase(B), vbase(B);
    std::vector<std::vector<int64_t>> kst(B), vst(B);
    std::vector<std::vector<float>> copies(2 * B);
    std::vector<float> cs, sn;
    for (int b = 0; b < B; ++b) {
      float* qb = q.data() + b * HD;
      float* kb_new = kv_out[2 * b];
      std::copy(vn.data() + b * KD, vn.data() + (b + 1) * KD, kv_out[2 * b + 1]);
      rope_table(1, Dh, p.rope_base, p.rope_scale, p.offsets[b], cs, sn);
      for (int r = 0; r < H; ++r) rope_row(qb + r * Dh, qb + r * Dh, cs.data(), sn.data(), Dh, p.rope_traditional);
      for (int r = 0; r < Hk; ++r)
        rope_row(kn.data() + b * KD + r * Dh, kb_new + r * Dh, cs.data(), sn.data(), Dh, p.rope_traditional);
      for (int j = 0; j < 2; ++j) {
        const auto& c = inputs[kNorms + 2 * b + j];
        const bool copied = c.strides()[3] != 1;
        (j ? vbase : kbase)[b] = copied ? row_major(c, copies[2 * b + j]) : c.data<float>();
        (j ? vst : kst)[b] = copied ? std::vector<int64_t>{0, static_cast<int64_t>(c.shape(2)) * c.shape(3),
                                                          c.shape(3), 1}
                                    : std::vector<int64_t>(c.strides().begin(), c.strides().end());
      }
    }
    const int g = H / Hk;
    const AttendRow attend_row_k = attend_kernel(Dh) ? attend_kernel(Dh) : attend_row;
    auto attend = [&](int t0, int t1) {
      std::vector<float> scratch;
      for (int t = t0; t < t1; ++t) {
        const int b = t / H, hh = t % H, kh = hh / g;
        attend_row_k(q.data() + b * HD + static_cast<int64_t>(hh) * Dh, Dh, kbase[b] + kh * kst[b][1], kst[b][2],
                   vbase[b] + kh * vst[b][1], vst[b][2], p.offsets[b], kv_out[2 * b] + static_cast<int64_t>(kh) * Dh,
                   kv_out[2 * b + 1] + static_cast<int64_t>(kh) * Dh, p.attn_scale,
                   att.data() + b * HD + static_cast<int64_t>(hh) * Dh, scratch);
      }
    };
    if (B == 1 && p.offsets[0] < 32)
      attend(0, H);  // one short sequence: waking the pool costs about what it saves
    else  // (at 250 cached positions, on the pool: 0.095 → 0.065 ms a block here)
      parallel_for(B * H, attend, 1);
    linear(3, att.data(), H * Dh, o.data());
    for (int64_t i = 0; i < static_cast<int64_t>(B) * D; ++i) h[i] = x[i] + o[i];
    for (int b = 0; b < B; ++b) rms_row(h.data() + b * D, f(2), p.eps, D, n1.data() + b * D);
    const int F = rows_of(4);
    std::vector<float> gt(static_cast<size_t>(B) * F), up(static_cast<size_t>(B) * F), dn(static_cast<size_t>(B) * D);
    linears({4, 5}, n1.data(), D, {gt.data(), up.data()});
    auto swiglu = [&](int i0, int i1) {
      for (int i = i0; i < i1; ++i) gt[i] = gt[i] / (1.0f + std::exp(-gt[i])) * up[i];
    };
    if (B == 1)
      swiglu(0, F);
    else
      parallel_for(B * F, swiglu, 64);  // B·F exponentials: ~1 ms a step at B = 4 on one core
    linear(6, gt.data(), F, dn.data());
    for (int64_t i = 0; i < static_cast<int64_t>(B) * D; ++i) hp[i] = h[i] + dn[i];
  });
}

bool DecodeBlock::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeBlock&>(other).p_;
  return p_.eps == o.eps && p_.n_heads == o.n_heads && p_.n_kv_heads == o.n_kv_heads && p_.head_dim == o.head_dim &&
         p_.rope_traditional == o.rope_traditional && p_.rope_base == o.rope_base && p_.rope_scale == o.rope_scale &&
         p_.offsets == o.offsets && p_.attn_scale == o.attn_scale && p_.group_size == o.group_size &&
         p_.bits == o.bits && p_.bias_mask == o.bias_mask && p_.packed_n == o.packed_n;
}

}  // namespace bonsai
