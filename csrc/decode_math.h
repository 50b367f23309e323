// The decode step's arithmetic, shared by the one-op layers (fused.cpp) and the one-op block (decode_block.cpp), so
// both compute exactly the same thing. Both files are compiled with -fassociative-math (CMakeLists.txt): the dot
// products and sums below vectorize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace bonsai {

// y = x * rsqrt(mean(x^2) + eps) * w (mx.fast.rms_norm)
inline void rms_row(const float* x, const float* w, float eps, int D, float* y) {
  float ss = 0.0f;
  for (int i = 0; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int i = 0; i < D; ++i) y[i] = x[i] * inv * w[i];
}

// cos / sin of theta = scale * position * base^(-i / half) for positions offset .. offset+L-1, [L, half] each, in
// double precision: in float32 (MLX's fallback, transformers' inv_freq) one ulp of the frequency is ~1e-3 rad at
// position 30,000; these are exact to float32 rounding
inline void rope_table(int L, int D, float base, float scale, int offset, std::vector<float>& c, std::vector<float>& s) {
  const int half = D / 2;
  c.resize(static_cast<size_t>(L) * half);
  s.resize(static_cast<size_t>(L) * half);
  for (int l = 0; l < L; ++l) {
    const double pos = static_cast<double>(scale) * static_cast<double>(offset + l);
    for (int i = 0; i < half; ++i) {
      const double th = pos * std::pow(static_cast<double>(base), -static_cast<double>(i) / half);
      c[static_cast<size_t>(l) * half + i] = static_cast<float>(std::cos(th));
      s[static_cast<size_t>(l) * half + i] = static_cast<float>(std::sin(th));
    }
  }
}

// one head row rotated (y may be x): pairs (2i, 2i+1) if traditional, else halves (i, i + D/2) (mx.fast.rope)
inline void rope_row(const float* x, float* y, const float* c, const float* s, int D, bool traditional) {
  const int half = D / 2;
  for (int i = 0; i < half; ++i) {
    const int ia = traditional ? 2 * i : i, ib = traditional ? 2 * i + 1 : i + half;
    const float a = x[ia], b = x[ib];
    y[ia] = a * c[i] - b * s[i];
    y[ib] = a * s[i] + b * c[i];
  }
}

// softmax(scale * q·kᵀ)·v for one query row over S positions of a cache (row j at k + j * k_step, v + j * v_step)
// and, if k_new, one more position (k_new, v_new); p: scratch
inline void attend_row(const float* q, int Dh, const float* k, int64_t k_step, const float* v, int64_t v_step, int S,
                       const float* k_new, const float* v_new, float scale, float* out, std::vector<float>& p) {
  const int T = S + (k_new ? 1 : 0);
  p.resize(T);
  float mx = -INFINITY;
  for (int j = 0; j < T; ++j) {
    const float* kr = j < S ? k + j * k_step : k_new;
    float d = 0.0f;
    for (int i = 0; i < Dh; ++i) d += q[i] * kr[i];
    p[j] = d * scale;
    mx = std::max(mx, p[j]);
  }
  float sum = 0.0f;
  for (int j = 0; j < T; ++j) sum += (p[j] = std::exp(p[j] - mx));
  std::fill(out, out + Dh, 0.0f);
  for (int j = 0; j < T; ++j) {
    const float* vr = j < S ? v + j * v_step : v_new;
    const float pj = p[j] / sum;
    for (int i = 0; i < Dh; ++i) out[i] += pj * vr[i];
  }
}

}  // namespace bonsai
