// Weights in 2 MB pages (Linux transparent huge pages), for the decode step's weight stream.
//
// A decode step streams every weight once (~0.3 GB at 4 bits). MLX allocates each weight on its own, in 4 KB pages:
// the CPU's stream prefetcher stops at every 4 KB page boundary and every page costs a TLB miss, and one core then
// reads ~13 GB/s where the same loop over 2 MB pages reads ~22 (a 300 MB AVX-512 read loop on this 2-core EPYC;
// 2 cores: ~25 → ~31). NumPy advises huge pages for its large arrays, which is why `doctor`'s read bandwidth (a NumPy
// sum) measures the faster figure. `place_in_pages` copies a model's weights into one MLX allocation advised
// MADV_HUGEPAGE and returns arrays that view it (no new layout: every op reads them as before).
#pragma once

#include <vector>

#include "mlx/array.h"

namespace mx = mlx::core;

namespace bonsai {

// One allocation for `nbytes` of weights, advised MADV_HUGEPAGE where the kernel has it; arrays placed in it keep it
// alive. Pages are faulted in by the copies, so an arena costs memory only as it fills.
class PageArena {
 public:
  // advise: MADV_HUGEPAGE (else plain 4 KB pages: an arena just for packed weights)
  PageArena(size_t nbytes, bool advise);
  // a copy of `a` (evaluated first; any layout) at the next 64-byte-aligned offset; throws when the arena is full
  mx::array place(mx::array a);
  // a 4-bit weight (MLX layout: [N, K/8] uint32, float32 scales/biases [N, K/group_size]) as packed.h's tiles:
  // [pw [T, 8K] uint8, ps [T, G, 16], pb [T, G, 16]]
  std::vector<mx::array> place_packed(mx::array w, mx::array scales, mx::array biases, int group_size);
  // the arena bytes place_packed takes for an [N, K] weight
  static size_t packed_bytes(int N, int K, int group_size);
  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  bool advised() const { return advised_; }

 private:
  char* take(size_t n);  // the next n bytes, 64-byte aligned
  mx::array view(char* at, const mx::Shape& shape, mx::Dtype dtype);
  mx::array buffer_;  // the MLX allocation (counted in MLX's active memory)
  char* base_ = nullptr;
  size_t used_ = 0, capacity_ = 0;
  bool advised_ = false;
};

}  // namespace bonsai
