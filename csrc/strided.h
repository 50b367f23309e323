// A row-major copy of a strided MLX array (a transposed or sliced view), made inside a primitive's CPU task, so that
// the graph needs no extra contiguous() node for the common, already contiguous case (qmm.cpp, fused.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace bonsai {

template <typename T>
const T* row_major(const mlx::core::array& a, std::vector<T>& buf) {
  if (a.flags().row_contiguous) return a.data<T>();
  buf.resize(a.size());
  const T* src = a.data<T>();
  const int nd = static_cast<int>(a.ndim());
  std::vector<int64_t> idx(nd, 0);
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * a.strides()[d];
    buf[i] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) break;
      idx[d] = 0;
    }
  }
  return buf.data();
}

}  // namespace bonsai
