// PageArena (pages.h).
#include "pages.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mlx/allocator.h"
#include "packed.h"
#include "strided.h"

namespace bonsai {

namespace {
constexpr size_t kHuge = size_t(1) << 21;
size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
// 2 MB more than asked for, so that the weights can start on a 2 MB boundary
int arena_bytes(size_t nbytes) {
  if (nbytes + kHuge > static_cast<size_t>(INT32_MAX))
    throw std::invalid_argument("[bonsai.PageArena] at most 2 GB per arena");
  return static_cast<int>(nbytes + kHuge);
}
}  // namespace

PageArena::PageArena(size_t nbytes, bool advise)
    : buffer_(mx::allocator::malloc(arena_bytes(nbytes)), {arena_bytes(nbytes)}, mx::uint8) {
  auto raw = reinterpret_cast<uintptr_t>(buffer_.data<char>());
  base_ = reinterpret_cast<char*>(align_up(raw, kHuge));
  capacity_ = nbytes;
  (void)advise;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // before any page of it is touched: faults then map whole 2 MB pages (THP "madvise" or "always"; "never": no-op)
  advised_ = advise && madvise(base_, align_up(nbytes, kHuge), MADV_HUGEPAGE) == 0;
#endif
}

char* PageArena::take(size_t n) {
  const size_t at = align_up(used_, 64);
  if (at + n > capacity_)
    throw std::invalid_argument("[bonsai.PageArena] full: " + std::to_string(at + n) + " > " +
                                std::to_string(capacity_) + " bytes");
  used_ = at + n;
  return base_ + at;
}

mx::array PageArena::view(char* dst, const mx::Shape& shape, mx::Dtype dtype) {
  // a row-major view of the arena's buffer (as MLX's own slices are): the buffer lives while any array placed in it
  // does. (MLX's raw-pointer array constructor would copy here: its CPU allocator keeps a header before each buffer.)
  mx::array out(shape, dtype, nullptr, {});
  mx::Strides strides(shape.size(), 1);
  for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * shape[d + 1];
  int wide = 0;
  for (auto v : shape) wide += v > 1;
  mx::array::Flags flags{true, true, wide <= 1};
  out.copy_shared_buffer(buffer_, strides, flags, out.size(),
                         static_cast<int64_t>(dst - buffer_.data<char>()) / static_cast<int64_t>(out.itemsize()));
  out.set_status(mx::array::Status::available);
  return out;
}

std::vector<mx::array> PageArena::place_packed(mx::array w, mx::array scales, mx::array biases, int group_size) {
  for (auto* a : {&w, &scales, &biases}) a->eval();
  if (w.ndim() != 2 || w.dtype() != mx::uint32 || scales.dtype() != mx::float32 || biases.dtype() != mx::float32 ||
      scales.ndim() != 2 || biases.shape() != scales.shape() || scales.shape(0) != w.shape(0) ||
      scales.shape(1) * group_size != w.shape(1) * 8 || (w.shape(1) * 8) % 32 != 0)
    throw std::invalid_argument("[bonsai.PageArena] place_packed takes a 4-bit weight [N, K/8] uint32 and its "
                                "float32 scales/biases [N, K/group_size], K a multiple of 32");
  const int N = w.shape(0), K = w.shape(1) * 8, G = K / group_size, T = packed_tiles(N);
  std::vector<uint32_t> wb;
  std::vector<float> sb, bb;
  char* pw = take(static_cast<size_t>(T) * 8 * K);
  char* ps = take(static_cast<size_t>(T) * G * kTileRows * 4);
  char* pb = take(static_cast<size_t>(T) * G * kTileRows * 4);
  pack_tiles(row_major(w, wb), row_major(scales, sb), row_major(biases, bb), N, K, group_size,
             reinterpret_cast<uint8_t*>(pw), reinterpret_cast<float*>(ps), reinterpret_cast<float*>(pb));
  return {view(pw, {T, 8 * K}, mx::uint8), view(ps, {T, G, kTileRows}, mx::float32),
          view(pb, {T, G, kTileRows}, mx::float32)};
}

size_t PageArena::packed_bytes(int N, int K, int group_size) {
  const size_t T = packed_tiles(N), G = K / group_size;
  return T * 8 * K + 2 * T * G * kTileRows * 4 + 3 * 64;
}

mx::array PageArena::place(mx::array a) {
  a.eval();
  const size_t n = a.nbytes();
  char* dst = take(n);
  if (a.flags().row_contiguous) {
    std::memcpy(dst, a.data<char>(), n);
  } else if (a.dtype() == mx::float32) {
    std::vector<float> tmp;
    std::memcpy(dst, row_major(a, tmp), n);
  } else if (a.dtype() == mx::uint32) {
    std::vector<uint32_t> tmp;
    std::memcpy(dst, row_major(a, tmp), n);
  } else {
    throw std::invalid_argument("[bonsai.PageArena] a strided array must be float32 or uint32");
  }
  return view(dst, a.shape(), a.dtype());
}

}  // namespace bonsai
