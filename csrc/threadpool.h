// A small persistent thread pool for the quantized kernels: `parallel_for(n, f)` runs f over [0, n) in chunks that
// the calling thread and the workers claim from one atomic counter.
//
// Claimed chunks, not one fixed range per thread: on a 2-core machine the pool's threads share the cores with MLX's
// stream thread and with Python building the next decode step's graph (mlx-lm's async_eval), and a worker preempted
// while holding a fixed half of a product stalled the caller for a scheduler time slice. Here whoever runs takes
// the next chunk, and the caller waits (yielding its core) only for chunks already being computed. A decode step
// makes ~170 short calls, so waking workers must be cheap: after each call they spin briefly (~50 µs) on an atomic,
// then sleep on a condition variable. Sleeping workers never compete with OpenBLAS's threads, which run only inside
// the sgemm calls made between ours.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BONSAI_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define BONSAI_PAUSE() asm volatile("yield")
#else
#define BONSAI_PAUSE() ((void)0)
#endif

namespace bonsai {

class ThreadPool {
 public:
  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    stop();
    quit_ = false;
    const uint32_t now = generation_.load();  // new workers wait for the next call, not the last one again
    for (int i = 1; i < std::max(n, 1); ++i) workers_.emplace_back([this, now] { loop(now); });
  }

  // spin: whether workers should spin for the next call afterwards (row kernels: yes; before an sgemm: no, its
  // OpenBLAS threads need the cores). Chunk boundaries are multiples of `align` (the kernels' row blocks).
  void parallel_for(int n, const std::function<void(int, int)>& f, bool spin = true, int align = 4) {
    const int t = size();
    if (t <= 1 || n <= align) {
      f(0, n);
      return;
    }
    std::lock_guard<std::mutex> call(call_mu_);  // one parallel_for at a time
    // about 8 chunks per thread: small enough that a preempted worker holds little, large enough to amortize
    const int per = std::max(align, (n / (8 * t) + align - 1) / align * align);
    job_ = &f;
    n_.store(n, std::memory_order_relaxed);
    chunk_.store(per, std::memory_order_relaxed);
    chunks_.store((n + per - 1) / per, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    spin_.store(spin, std::memory_order_relaxed);
    const uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
    work_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);  // (generation, next chunk)
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.store(gen, std::memory_order_release);
    }
    cv_.notify_all();
    while (run_chunk(gen)) {
    }
    // every chunk is claimed; wait for the ones workers are still computing
    const int chunks = chunks_.load(std::memory_order_relaxed);
    for (int i = 0; done_.load(std::memory_order_acquire) != chunks; ++i) {
      if (i < kSpins) BONSAI_PAUSE();
      else std::this_thread::yield();  // a preempted worker holds a chunk: give it this core
    }
  }

 private:
  static constexpr int kSpins = 20000;  // ~50 µs of pause instructions

  // claim and run the next chunk of call `gen`; false when there is none (or that call is over)
  bool run_chunk(uint32_t gen) {
    uint64_t v = work_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(v >> 32) != gen) return false;
      const int idx = static_cast<int>(v & 0xFFFFFFFFu);
      if (idx >= chunks_.load(std::memory_order_relaxed)) return false;  // published before work_ (release)
      if (work_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
        // the caller cannot return (nor job_ change) before this chunk is counted done
        const int per = chunk_.load(std::memory_order_relaxed);
        const int a = idx * per;
        (*job_)(a, std::min(n_.load(std::memory_order_relaxed), a + per));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }

  void loop(uint32_t seen) {
    for (;;) {
      int spin = spin_.load(std::memory_order_acquire) ? 0 : kSpins;
      while (generation_.load(std::memory_order_acquire) == seen && !quit_.load(std::memory_order_acquire)) {
        if (spin++ < kSpins) {
          BONSAI_PAUSE();
          continue;
        }
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_.load() || generation_.load() != seen; });
      }
      if (quit_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      while (run_chunk(seen)) {
      }
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, call_mu_;
  std::condition_variable cv_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<int> n_{0}, chunk_{1}, chunks_{0};
  std::atomic<uint64_t> work_{0};
  std::atomic<int> done_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> quit_{false}, spin_{true};
};

}  // namespace bonsai
