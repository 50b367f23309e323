// Decode-step operations as single CPU primitives (fused.cpp says why): RMSNorm, RoPE, one-query attention,
// SwiGLU.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace bonsai {

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});
mx::array rope(const mx::array& x, bool traditional, float base, float scale, int offset, mx::StreamOrDevice s = {});
mx::array attend_one(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                     mx::StreamOrDevice s = {});
mx::array swiglu(const mx::array& g, const mx::array& u, mx::StreamOrDevice s = {});

// CPU only, float32, no vjp (inference): eval_gpu throws.
#define BONSAI_CPU_PRIMITIVE(NAME)                                                                              \
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;               \
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {                             \
    throw std::runtime_error("[bonsai." NAME "] CPU only");                                                      \
  }                                                                                                              \
  const char* name() const override { return "Bonsai" NAME; }                                                   \
  bool is_equivalent(const mx::Primitive& other) const override;                                                \
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

class RMSNorm1 : public mx::Primitive {
 public:
  RMSNorm1(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}
  BONSAI_CPU_PRIMITIVE("RMSNorm")

 private:
  float eps_;
};

class RoPE1 : public mx::Primitive {
 public:
  RoPE1(mx::Stream stream, bool traditional, float base, float scale, int offset)
      : mx::Primitive(stream), traditional_(traditional), base_(base), scale_(scale), offset_(offset) {}
  BONSAI_CPU_PRIMITIVE("RoPE")

 private:
  bool traditional_;
  float base_, scale_;
  int offset_;
};

class AttendOne : public mx::Primitive {
 public:
  AttendOne(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}
  BONSAI_CPU_PRIMITIVE("AttendOne")

 private:
  float scale_;
};

class SwiGLU1 : public mx::Primitive {
 public:
  explicit SwiGLU1(mx::Stream stream) : mx::Primitive(stream) {}
  BONSAI_CPU_PRIMITIVE("SwiGLU")
};

#undef BONSAI_CPU_PRIMITIVE

}  // namespace bonsai
