// The products behind BonsaiQuantizedMatmul and the decode block (qmm.h): which kernel this CPU runs, the pool, and
// product_rows / packed_products (few rows on the row or tile kernels, many rows on dequantized tiles + sgemm).
#include "qmm.h"

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#if defined(__linux__)
#include <sched.h>
#endif
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "packed.h"
#include "strided.h"
#include "mlx/backend/cpu/encoder.h"
#include "threadpool.h"

extern "C" {
// Resolved when the extension loads: the BLAS loaded into the process with RTLD_GLOBAL (OpenBLAS, or the pip
// OpenBLAS through bonsai's shim), else the reference BLAS libmlx.so itself links.
void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
}

namespace bonsai {

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Inputs with fewer rows than this use the row kernels; more go through dequantized tiles and sgemm
// (`python bench/cpu_qmm.py` measures the crossover).
int many_rows() {
  static int v = [] {
    const char* e = std::getenv("BONSAI_QMM_MANY_ROWS");
    return e ? std::max(1, std::atoi(e)) : 8;
  }();
  return v;
}
// products with fewer weight bits than this run on the calling thread alone (about 128 × 896 at 4 bits)
constexpr int64_t kSerialBits = int64_t(1) << 19;
// float32 elements of weight dequantized per tile (4 MB): small next to a layer, large enough for sgemm
constexpr int64_t kTileElems = 1 << 20;

// One thread per physical core this process may run on (SMT siblings share the FMA units and the memory
// bandwidth a row kernel is bound by); BONSAI_QMM_THREADS overrides it.
int default_threads() {
  const char* e = std::getenv("BONSAI_QMM_THREADS");
  if (e && std::atoi(e) > 0) return std::atoi(e);
  int logical = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    std::set<std::pair<std::string, std::string>> cores;
    int allowed = 0;
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (!CPU_ISSET(c, &set)) continue;
      ++allowed;
      const std::string t = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
      std::ifstream pkg(t + "physical_package_id"), core(t + "core_id");
      std::string a, b;
      if (pkg >> a && core >> b) cores.insert({a, b});
    }
    if (!cores.empty()) return static_cast<int>(cores.size());
    if (allowed) return allowed;
  }
#endif
  return logical > 0 ? logical : 1;
}

ThreadPool& pool() {
  static ThreadPool p(default_threads());
  return p;
}

RowKernel row_kernel() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && !std::getenv("BONSAI_QMM_PORTABLE")) return rows_avx2;
#endif
#if defined(__aarch64__)
  if (!std::getenv("BONSAI_QMM_PORTABLE")) return rows_neon;  // NEON is part of every aarch64 CPU
#endif
  return rows_portable;
}

#if defined(__x86_64__) || defined(_M_X64)
// AVX-512 with VNNI (kernels_avx512.cpp), unless BONSAI_QMM_AVX512=off
bool avx512_vnni() {
  static const bool on = [] {
    const char* e = std::getenv("BONSAI_QMM_AVX512");
    if (e && std::string(e) == "off") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return on;
}
#endif

// Whether few-row products round the activations to int8 (kernels.h): BONSAI_QMM_ACTIVATIONS=float at start-up or
// set_activations("float") turns it off (the exact float kernels, e.g. to compare).
std::atomic<bool>& int8_on() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("BONSAI_QMM_ACTIVATIONS");
    return !(e && std::string(e) == "float");
  }()};
  return on;
}

// The int8-activation kernel of this CPU for `bits`-bit weights, or nullptr (none here, or turned off): few-row
// products then use row_kernel(). 4-bit weights only: there the rounding moves a tiny student's next-token
// log-probabilities by ~1/20 of what quantizing the weights does (tests/test_qmm.py); with 8-bit weights it would
// move them about as much as the weights' own quantization, and the float kernel is already near the memory
// ceiling there (`python bench/cpu_inference.py`).
RowKernel q8_kernel(int bits = 4) {
  if (bits != 4 || !int8_on().load(std::memory_order_relaxed)) return nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  if (row_kernel() == rows_avx2) return avx512_vnni() ? rows_q8_avx512 : rows_q8_avx2;
#endif
  return nullptr;
}

}  // namespace

DequantKernel dequant_kernel() {
#if defined(__x86_64__) || defined(_M_X64)
  if (row_kernel() == rows_avx2) return dequantize_rows_avx2;
#endif
#if defined(__aarch64__)
  if (row_kernel() == rows_neon) return dequantize_rows_neon;
#endif
  return dequantize_rows;
}

AttendRow attend_kernel(int Dh) {
#if defined(__x86_64__) || defined(_M_X64)
  if (avx512_vnni() && Dh % 16 == 0 && Dh <= 128) return attend_row_avx512;
#endif
  return nullptr;
}

bool packed_kernel() {
#if defined(__x86_64__) || defined(_M_X64)
  return q8_kernel() == rows_q8_avx512;
#else
  return false;
#endif
}

std::string kernel_isa() {
  auto k = row_kernel();
#if defined(__x86_64__) || defined(_M_X64)
  if (k == rows_avx2) return avx512_vnni() && q8_kernel() ? "avx2+fma / avx512-vnni" : "avx2+fma";
#endif
#if defined(__aarch64__)
  if (k == rows_neon) return "neon";
#endif
  return "portable";
}

int num_threads() { return pool().size(); }
void parallel_for(int n, const std::function<void(int, int)>& f, int align) { pool().parallel_for(n, f, true, align); }
std::string activations() { return q8_kernel() ? "int8" : "float"; }
void set_activations(const std::string& kind) {
  if (kind != "int8" && kind != "float")
    throw std::invalid_argument("[bonsai.set_activations] expected \"int8\" or \"float\", got \"" + kind + "\"");
  int8_on().store(kind == "int8");
}
int int8_rows() { return q8_kernel() ? many_rows() : 0; }
void set_num_threads(int n) { pool().resize(n); }

void product_rows(const float* xp, const uint32_t* wp, const float* sp, const float* bp, float* yp, int M, int N,
                  int K, int gs, int bits, bool transpose, int row_kernel_rows, bool packed) {
  {
    const int G = K / gs;
#if defined(__x86_64__) || defined(_M_X64)
    if (packed && transpose && packed_kernel()) {
      // packed tiles, any number of rows (decode, a batch, a prompt): the int8 activations in natural order, then the
      // tile kernel over slices of tiles (each tile read once for all rows: `python bench/cpu_qmm.py --rows 288`)
      std::vector<float> xd(static_cast<size_t>(M) * (K / 32)), xdsum(static_cast<size_t>(M) * G);
      std::vector<int8_t> xq(static_cast<size_t>(M) * K);
      quantize_activations(xp, M, K, gs, bits, xq.data(), nullptr, xd.data(), xdsum.data());
      QmmArgs a{xp, xp, nullptr, wp, sp, bp, yp, M, N, K, gs, bits};
      a.xq = xq.data();
      a.xd = xd.data();
      a.xdsum = xdsum.data();
      const int T = packed_tiles(N);
      if (static_cast<int64_t>(N) * K * bits < kSerialBits)
        rows_q8_packed_avx512(a, 0, T);
      else
        pool().parallel_for(T, [&](int t0, int t1) { rows_q8_packed_avx512(a, t0, t1); }, true, 1);
      return;
    }
#endif
    if (!packed && transpose && M < (row_kernel_rows > 0 ? row_kernel_rows : many_rows())) {
      // few rows: per-group sums of x, then the int8 activations (q8 kernels) or the 4-bit chunk order (float
      // kernels), then the row kernel over output slices
      std::vector<float> xsum, xperm, xd, xdsum;
      std::vector<int8_t> xq, xqp;
      RowKernel kernel = q8_kernel(bits);
      QmmArgs a{xp, xp, nullptr, wp, sp, bp, yp, M, N, K, gs, bits};
      if (kernel) {
        xq.resize(static_cast<size_t>(M) * K);
        xqp.resize(static_cast<size_t>(M) * K);
        xd.resize(static_cast<size_t>(M) * (K / 32));
        xdsum.resize(static_cast<size_t>(M) * G);
        quantize_activations(xp, M, K, gs, bits, xq.data(), xqp.data(), xd.data(), xdsum.data());
        a.xq = xq.data();
        a.xqp = xqp.data();
        a.xd = xd.data();
        a.xdsum = xdsum.data();
      } else {
        kernel = row_kernel();
        xsum.resize(static_cast<size_t>(M) * G);
        for (int m = 0; m < M; ++m)
          for (int g = 0; g < G; ++g) {
            float s = 0.0f;
            for (int k = g * gs; k < (g + 1) * gs; ++k) s += xp[static_cast<int64_t>(m) * K + k];
            xsum[static_cast<size_t>(m) * G + g] = s;
          }
        a.xsum = xsum.data();
        if (bits == 4) {
          xperm.resize(static_cast<size_t>(M) * K);
          for (int m = 0; m < M; ++m)
            for (int c = 0; c < K; c += 32)
              for (int i = 0; i < 16; ++i) {
                xperm[static_cast<size_t>(m) * K + c + i] = xp[static_cast<int64_t>(m) * K + c + 2 * i];
                xperm[static_cast<size_t>(m) * K + c + 16 + i] = xp[static_cast<int64_t>(m) * K + c + 2 * i + 1];
              }
          a.xperm = xperm.data();
        }
      }
      if (static_cast<int64_t>(N) * K * bits < kSerialBits) {
        kernel(a, 0, N);  // a small product (k_proj, v_proj): waking the pool costs more than it saves
      } else {
        pool().parallel_for(N, [&](int n0, int n1) { kernel(a, n0, n1); });
      }
      return;
    }
    // many rows (or x @ W; or packed tiles without their kernel): dequantize a tile of weight rows at a time and
    // multiply it with the BLAS
    const int tile = static_cast<int>(std::max<int64_t>(16, std::min<int64_t>(N, kTileElems / K)) / 16 * 16);
    if (packed) {  // the tiles dequantize transposed: buf [K, nt] (dequantize_packed_t)
      // 64-byte aligned, so that each tile row's 16 values are one cache line, not two
      std::vector<float> raw(static_cast<size_t>(tile) * K + 16);
      float* bufp = raw.data() + (16 - (reinterpret_cast<uintptr_t>(raw.data()) / 4) % 16) % 16;
      const auto* pw = reinterpret_cast<const uint8_t*>(wp);
      for (int n0 = 0; n0 < N; n0 += tile) {
        const int nt = std::min(tile, N - n0);
        pool().parallel_for(nt, [&](int a, int b) {
#if defined(__x86_64__) || defined(_M_X64)
          if (packed_kernel())
            return dequantize_packed_t_avx512(pw, sp, bp, K, gs, n0 + a, n0 + b, N, bufp + a, nt);
#endif
          dequantize_packed_t(pw, sp, bp, K, gs, n0 + a, n0 + b, bufp + a, nt);
        }, /*spin=*/false, kTileRows);
        if (transpose)  // y[:, n0:n0+nt] = x [M, K] @ buf [K, nt]
          cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, M, nt, K, 1.0f, xp, K, bufp, nt, 0.0f, yp + n0, N);
        else  // y [M, K] += x[:, n0:n0+nt] @ buf^T
          cblas_sgemm(kRowMajor, kNoTrans, kTrans, M, K, nt, 1.0f, xp + n0, N, bufp, nt, n0 ? 1.0f : 0.0f, yp, K);
      }
      return;
    }
    std::vector<float> buf(static_cast<size_t>(tile) * K);
    DequantKernel dequant = dequant_kernel();
    for (int n0 = 0; n0 < N; n0 += tile) {
      const int nt = std::min(tile, N - n0);
      pool().parallel_for(nt, [&](int a, int b) {
        dequant(wp, sp, bp, K, gs, bits, n0 + a, n0 + b, buf.data() + static_cast<size_t>(a) * K);
      }, /*spin=*/false);
      if (transpose) {  // y[:, n0:n0+nt] = x [M, K] @ tile [nt, K]^T
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, M, nt, K, 1.0f, xp, K, buf.data(), K, 0.0f, yp + n0, N);
      } else {  // y [M, K] += x[:, n0:n0+nt] @ tile [nt, K]
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, M, K, nt, 1.0f, xp + n0, N, buf.data(), K, n0 ? 1.0f : 0.0f, yp,
                    K);
      }
    }
  }
}

void packed_products(const float* xp, int M, int K, int gs, const std::vector<PackedLinear>& ls, int row_kernel_rows) {
#if defined(__x86_64__) || defined(_M_X64)
  (void)row_kernel_rows;
  if (packed_kernel()) {
    const int G = K / gs;
    std::vector<float> xd(static_cast<size_t>(M) * (K / 32)), xdsum(static_cast<size_t>(M) * G);
    std::vector<int8_t> xq(static_cast<size_t>(M) * K);
    quantize_activations(xp, M, K, gs, 4, xq.data(), nullptr, xd.data(), xdsum.data());
    std::vector<QmmArgs> args;
    std::vector<int> first = {0};  // linear i's tiles are [first[i], first[i + 1]) of one index
    for (const auto& l : ls) {
      QmmArgs a{xp, xp, nullptr, reinterpret_cast<const uint32_t*>(l.w), l.scales, l.biases, l.y, M, l.N, K, gs, 4};
      a.xq = xq.data();
      a.xd = xd.data();
      a.xdsum = xdsum.data();
      args.push_back(a);
      first.push_back(first.back() + packed_tiles(l.N));
    }
    pool().parallel_for(first.back(), [&](int t0, int t1) {
      for (size_t i = 0; i < args.size(); ++i) {
        const int a = std::max(t0, first[i]), b = std::min(t1, first[i + 1]);
        if (a < b) rows_q8_packed_avx512(args[i], a - first[i], b - first[i]);
      }
    }, true, 1);
    return;
  }
#endif
  for (const auto& l : ls)
    product_rows(xp, reinterpret_cast<const uint32_t*>(l.w), l.scales, l.biases, l.y, M, l.N, K, gs, 4, true,
                 row_kernel_rows, true);
}

}  // namespace bonsai
