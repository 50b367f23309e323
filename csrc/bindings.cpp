// Python bindings of the quantized matmul (bonsai_mlx/cpu/qmm.py is the Python side).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "decode_block.h"
#include "fused.h"
#include "pages.h"
#include "qmm.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_qmm, m) {
  m.doc() = "bonsai-mlx: vectorized quantized matmul for MLX's affine format on the CPU";
  m.def("quantized_matmul", &bonsai::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "transpose"_a = true,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "bias"_a = nb::none(), "row_kernel_rows"_a = 0,
        "packed_n"_a = 0, "stream"_a = nb::none(),
        "x @ dequantize(w).T (transpose) or x @ dequantize(w), float32, as mx.quantized_matmul computes it.");
  m.def("rms_norm", &bonsai::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "mx.fast.rms_norm as one CPU op (float32, no vjp).");
  m.def("rope", &bonsai::rope, "x"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a, nb::kw_only(),
        "stream"_a = nb::none(), "mx.fast.rope over the whole last axis as one CPU op (float32, no vjp).");
  m.def("attend_one", &bonsai::attend_one, "q"_a, "keys"_a, "values"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(), "softmax(scale q·Kᵀ)·V for one query position, GQA, as one CPU op (no vjp).");
  m.def("swiglu", &bonsai::swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up as one CPU op (float32, no vjp).");
  m.def(
      "decode_block",
      [](const std::vector<mx::array>& inputs, float eps, int n_heads, int n_kv_heads, int head_dim,
         bool rope_traditional, float rope_base, float rope_scale, const std::vector<int>& offsets, float attn_scale,
         int group_size, int bits, int bias_mask, const std::vector<int>& packed_n) {
        bonsai::BlockParams p{eps, n_heads, n_kv_heads, head_dim, rope_traditional, rope_base, rope_scale,
                              offsets, attn_scale, group_size, bits, bias_mask, packed_n};
        return bonsai::decode_block(inputs, p);
      },
      "inputs"_a, nb::kw_only(), "eps"_a, "n_heads"_a, "n_kv_heads"_a, "head_dim"_a, "rope_traditional"_a,
      "rope_base"_a, "rope_scale"_a, "offsets"_a, "attn_scale"_a, "group_size"_a, "bits"_a, "bias_mask"_a, "packed_n"_a = std::vector<int>{},
      "One token per sequence through a quantized Qwen2/Llama block (csrc/decode_block.h): "
      "[output, new key 0, new value 0, new key 1, ...].");
  nb::class_<bonsai::PageArena>(m, "PageArena",
                                 "One MLX allocation advised into 2 MB pages, for weights (csrc/pages.h).")
      .def(nb::init<size_t, bool>(), "nbytes"_a, "advise"_a = true)
      .def("place", &bonsai::PageArena::place, "a"_a, "A copy of the array `a` in the arena.")
      .def("place_packed", &bonsai::PageArena::place_packed, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
           "A 4-bit weight as 16-row tiles (csrc/packed.h) in the arena: [packed, scales, biases].")
      .def_static("packed_bytes", &bonsai::PageArena::packed_bytes, "n"_a, "k"_a, "group_size"_a)
      .def_prop_ro("used", &bonsai::PageArena::used)
      .def_prop_ro("capacity", &bonsai::PageArena::capacity)
      .def_prop_ro("advised", &bonsai::PageArena::advised);
  m.def("packed_kernel", &bonsai::packed_kernel,
        "Whether 4-bit weights packed as 16-row tiles (csrc/packed.h) have their kernel on this CPU.");
  m.def("kernel_isa", &bonsai::kernel_isa, "The row kernel in use: avx2+fma, neon or portable.");
  m.def("activations", &bonsai::activations,
        "int8: 4-bit products of fewer than int8_rows() rows round the activations to int8 per block of 32; "
        "float: exact.");
  m.def("set_activations", &bonsai::set_activations, "kind"_a, "int8 (the default where a kernel exists) or float.");
  m.def("int8_rows", &bonsai::int8_rows, "Row count below which the int8-activation kernel runs (0: never).");
  m.def("num_threads", &bonsai::num_threads, "Threads of the kernel's pool.");
  m.def("set_num_threads", &bonsai::set_num_threads, "n"_a, "Resize the kernel's pool.");
}
