// Standalone check of the vectorized row and dequantize kernels against the portable ones (no MLX needed), so the
// NEON kernels can be checked on x86 under qemu: tests/test_qmm.py builds and runs this.
//   g++ -O2 [-mavx2 -mfma] test_kernels.cpp kernels_portable.cpp kernels_{avx2,neon}.cpp [kernels_avx512.o] -o t
// (x86: kernels_avx512.cpp compiled on its own with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -c)
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels.h"

using namespace bonsai;

int main() {
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  int failures = 0, cases = 0;
  for (int bits : {4, 8})
    for (int gs : {32, 64, 128})
      for (int M : {1, 2, 3, 5})
        for (int N : {1, 7, 33}) {
          const int K = 384, G = K / gs, words = K * bits / 32;
          std::vector<uint32_t> w(static_cast<size_t>(N) * words);
          for (auto& v : w) v = rng();
          std::vector<float> sc(N * G), bi(N * G), x(M * K), xs(M * G, 0.0f), xp(M * K), y0(M * N), y1(M * N);
          for (auto& v : sc) v = u(rng);
          for (auto& v : bi) v = u(rng);
          for (auto& v : x) v = u(rng);
          for (int m = 0; m < M; ++m)
            for (int k = 0; k < K; ++k) xs[m * G + k / gs] += x[m * K + k];
          for (int m = 0; m < M; ++m)
            for (int c = 0; c < K; c += 32)
              for (int i = 0; i < 16; ++i) {
                xp[m * K + c + i] = x[m * K + c + 2 * i];
                xp[m * K + c + 16 + i] = x[m * K + c + 2 * i + 1];
              }
          QmmArgs a{x.data(), xp.data(), xs.data(), w.data(), sc.data(), bi.data(), y0.data(), M, N, K, gs, bits};
          rows_portable(a, 0, N);
          a.y = y1.data();
#if defined(__aarch64__)
          rows_neon(a, 0, N);
#else
          rows_avx2(a, 0, N);
#endif
          std::vector<float> d0(static_cast<size_t>(N) * K), d1(static_cast<size_t>(N) * K);
          dequantize_rows(w.data(), sc.data(), bi.data(), K, gs, bits, 0, N, d0.data());
#if defined(__aarch64__)
          dequantize_rows_neon(w.data(), sc.data(), bi.data(), K, gs, bits, 0, N, d1.data());
#else
          dequantize_rows_avx2(w.data(), sc.data(), bi.data(), K, gs, bits, 0, N, d1.data());
#endif
          float scale = 1e-6f, err = 0.0f, derr = 0.0f;
          for (int i = 0; i < M * N; ++i) {
            scale = std::fmax(scale, std::fabs(y0[i]));
            err = std::fmax(err, std::fabs(y0[i] - y1[i]));
          }
          for (size_t i = 0; i < d0.size(); ++i) derr = std::fmax(derr, std::fabs(d0[i] - d1[i]));
          ++cases;
          if (err > 1e-5f * scale || derr > 1e-5f) {
            ++failures;
            std::printf("FAIL bits %d gs %d M %d N %d: row error %g (scale %g), dequantize error %g\n", bits, gs, M, N,
                        err, scale, derr);
          }
        }
  std::printf("%d of %d cases within 1e-5\n", cases - failures, cases);
#if defined(__x86_64__) || defined(_M_X64)
  // the int8-activation kernels (4-bit weights): AVX2 against the portable one on the same int8 activations, K with
  // an even and an odd number of 32-blocks
  int q8_failures = 0, q8_cases = 0, v_failures = 0, v_cases = 0;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  for (int gs : {32, 64, 128})
    for (int K : {384, 416, 448})
      for (int M : {1, 2, 3, 5})
        for (int N : {1, 7, 33}) {
          if (K % gs) continue;
          const int bits = 4, G = K / gs, words = K * bits / 32;
          std::vector<uint32_t> w(static_cast<size_t>(N) * words);
          for (auto& v : w) v = rng();
          std::vector<float> sc(N * G), bi(N * G), x(M * K), xs(M * G, 0.0f), xd(M * K / 32), xds(M * G);
          std::vector<float> y0(M * N), y1(M * N);
          std::vector<int8_t> xq(M * K), xqp(M * K);
          for (auto& v : sc) v = u(rng);
          for (auto& v : bi) v = u(rng);
          for (auto& v : x) v = u(rng);
          quantize_activations(x.data(), M, K, gs, bits, xq.data(), xqp.data(), xd.data(), xds.data());
          QmmArgs a{x.data(), x.data(), xs.data(), w.data(), sc.data(), bi.data(), y0.data(), M, N, K, gs, bits};
          a.xq = xq.data();
          a.xqp = xqp.data();
          a.xd = xd.data();
          a.xdsum = xds.data();
          rows_q8_portable(a, 0, N);
          a.y = y1.data();
          rows_q8_avx2(a, 0, N);
          float scale = 1e-6f, err = 0.0f;
          for (int i = 0; i < M * N; ++i) {
            scale = std::fmax(scale, std::fabs(y0[i]));
            err = std::fmax(err, std::fabs(y0[i] - y1[i]));
          }
          ++q8_cases;
          if (err > 1e-5f * scale) {
            ++q8_failures;
            std::printf("FAIL q8 gs %d K %d M %d N %d: error %g (scale %g)\n", gs, K, M, N, err, scale);
          }
          if (!avx512) continue;
          rows_q8_avx512(a, 0, N);  // into y1 again
          err = 0.0f;
          for (int i = 0; i < M * N; ++i) err = std::fmax(err, std::fabs(y0[i] - y1[i]));
          ++v_cases;
          if (err > 1e-5f * scale) {
            ++v_failures;
            std::printf("FAIL q8 avx512 gs %d K %d M %d N %d: error %g (scale %g)\n", gs, K, M, N, err, scale);
          }
        }
  std::printf("q8: %d of %d cases within 1e-5\n", q8_cases - q8_failures, q8_cases);
  if (avx512) std::printf("q8 avx512: %d of %d cases within 1e-5\n", v_cases - v_failures, v_cases);
  else std::printf("q8 avx512: this CPU has no AVX-512 VNNI\n");
  failures += q8_failures + v_failures;
#endif
  return failures ? 1 : 0;
}
