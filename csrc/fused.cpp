// Decode-step operations as single MLX primitives on the CPU (bonsai_mlx/cpu/fused.py is the Python side).
//
// On the CPU, mx.fast.rms_norm and mx.fast.rope run MLX's fallback graphs (mlx/fast.cpp: ~6 and ~15 ordinary ops),
// and mlx-lm's attention for one query several more: at one token each op costs more to schedule than to compute
// (a real-size 4-bit decode step spent ~20 ms of ~40 outside its products, `python bench/cpu_decode_ops.py`). These
// do the same arithmetic in one op each, float32, for inference only (no vjp: fused.py uses them inside
// `decoding()`, where nothing is differentiated).
#include "fused.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "decode_math.h"
#include "mlx/backend/cpu/encoder.h"
#include "strided.h"

namespace bonsai {

namespace {
void check_f32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string("[bonsai.fused] ") + what + " must be float32");
}
}  // namespace

// --- RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w over the last axis (mx.fast.rms_norm's arithmetic) ---------------
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  check_f32(x, "x");
  check_f32(w, "weight");
  if (w.ndim() != 1 || x.ndim() < 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument("[bonsai.rms_norm] weight must be [D] for x [..., D]");
  auto st = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm1>(st, eps), {x, w});
}

void RMSNorm1::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_input_array(w);
  enc.set_output_array(out);
  const int D = x.shape(-1);
  const int64_t rows = D ? static_cast<int64_t>(x.size() / D) : 0;
  enc.dispatch([x, w, yp = out.data<float>(), D, rows, eps = eps_]() {
    std::vector<float> xb, wb;  // strided inputs are gathered here (no contiguous() node in the graph)
    const float* xp = row_major(x, xb);
    const float* wp = row_major(w, wb);
    for (int64_t r = 0; r < rows; ++r) rms_row(xp + r * D, wp, eps, D, yp + r * D);
  });
}

bool RMSNorm1::is_equivalent(const mx::Primitive& other) const {
  return eps_ == static_cast<const RMSNorm1&>(other).eps_;
}

// --- RoPE over the whole last axis at positions offset + l (mx.fast.rope with dims = D, scale, base) --------------
mx::array rope(const mx::array& x, bool traditional, float base, float scale, int offset, mx::StreamOrDevice s) {
  check_f32(x, "x");
  if (x.ndim() < 2 || x.shape(-1) % 2)
    throw std::invalid_argument("[bonsai.rope] x must be [..., L, D] with D even");
  auto st = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RoPE1>(st, traditional, base, scale, offset), {x});
}

void RoPE1::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_output_array(out);
  const int D = x.shape(-1), L = x.shape(-2);
  const int64_t planes = x.size() / (static_cast<int64_t>(L) * D);
  enc.dispatch([x, yp = out.data<float>(), D, L, planes, trad = traditional_, base = base_, scale = scale_,
                offset = offset_]() {
    std::vector<float> xb;
    const float* xp = row_major(x, xb);
    const int half = D / 2;
    std::vector<float> cs, sn;
    rope_table(L, D, base, scale, offset, cs, sn);
    for (int64_t p = 0; p < planes; ++p)
      for (int l = 0; l < L; ++l)
        rope_row(xp + (p * L + l) * D, yp + (p * L + l) * D, cs.data() + static_cast<size_t>(l) * half,
                 sn.data() + static_cast<size_t>(l) * half, D, trad);
  });
}

bool RoPE1::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const RoPE1&>(other);
  return traditional_ == o.traditional_ && base_ == o.base_ && scale_ == o.scale_ && offset_ == o.offset_;
}

// --- attention of one query position: softmax(scale * q·Kᵀ)·V, q [B, H, 1, D], K/V [B, Hk, S, D] (GQA) ----------
mx::array attend_one(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s) {
  check_f32(q, "q");
  check_f32(k, "keys");
  check_f32(v, "values");
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(2) != 1 || q.shape(0) != k.shape(0) ||
      q.shape(3) != k.shape(3) || k.shape(1) == 0 || q.shape(1) % k.shape(1))
    throw std::invalid_argument("[bonsai.attend_one] expected q [B, H, 1, D] and keys/values [B, Hk, S, D], H % Hk == 0");
  auto st = mx::to_stream(s);
  // the cache's keys/values are usually a view [.., :S, :] of a larger buffer: strided rows are read in place
  return mx::array(q.shape(), mx::float32, std::make_shared<AttendOne>(st, scale), {q, k, v});
}

void AttendOne::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  const auto& v = inputs[2];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(q);
  enc.set_input_array(k);
  enc.set_input_array(v);
  enc.set_output_array(out);
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3), Hk = k.shape(1), S = k.shape(2);
  const auto ks = k.strides(), vs = v.strides();
  if (ks[3] != 1 || vs[3] != 1) throw std::invalid_argument("[bonsai.attend_one] keys/values rows must be contiguous");
  enc.dispatch([q, kp = k.data<float>(), vp = v.data<float>(), yp = out.data<float>(), B, H, D, Hk, S, ks, vs,
                scale = scale_]() {
    std::vector<float> qb, p;
    const float* qp = row_major(q, qb);
    const int g = H / Hk;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        attend_row(qp + (static_cast<int64_t>(b) * H + h) * D, D, kp + b * ks[0] + (h / g) * ks[1], ks[2],
                   vp + b * vs[0] + (h / g) * vs[1], vs[2], S, nullptr, nullptr, scale,
                   yp + (static_cast<int64_t>(b) * H + h) * D, p);
  });
}

// --- SwiGLU: silu(g) * u = g / (1 + exp(-g)) * u (mlx-lm's swiglu) ----------------------------------------------
mx::array swiglu(const mx::array& g, const mx::array& u, mx::StreamOrDevice s) {
  check_f32(g, "gate");
  check_f32(u, "up");
  if (g.shape() != u.shape()) throw std::invalid_argument("[bonsai.swiglu] gate and up must have the same shape");
  return mx::array(g.shape(), mx::float32, std::make_shared<SwiGLU1>(mx::to_stream(s)), {g, u});
}

void SwiGLU1::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& g = inputs[0];
  const auto& u = inputs[1];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(g);
  enc.set_input_array(u);
  enc.set_output_array(out);
  enc.dispatch([g, u, yp = out.data<float>(), n = static_cast<int64_t>(g.size())]() {
    std::vector<float> gb, ub;
    const float* gp = row_major(g, gb);
    const float* up = row_major(u, ub);
    for (int64_t i = 0; i < n; ++i) yp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * up[i];
  });
}

bool SwiGLU1::is_equivalent(const mx::Primitive&) const { return true; }

bool AttendOne::is_equivalent(const mx::Primitive& other) const {
  return scale_ == static_cast<const AttendOne&>(other).scale_;
}

}  // namespace bonsai
