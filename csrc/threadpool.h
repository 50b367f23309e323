// A small persistent thread pool for the quantized kernels: `parallel_for(n, f)` splits [0, n) into one contiguous
// range per thread (the calling thread takes the first). A decode step makes ~170 short calls (one per linear), so
// waking workers must be cheap: after each call they spin briefly (~50 µs) on an atomic counter, then sleep on a
// condition variable. Sleeping workers never compete with OpenBLAS's threads, which run only inside the sgemm calls
// made between ours.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
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
    const unsigned long now = generation_.load();  // new workers wait for the next call, not the last one again
    for (int i = 1; i < std::max(n, 1); ++i) workers_.emplace_back([this, i, now] { loop(i, now); });
  }

  // spin: whether workers should spin for the next call afterwards (row kernels: yes; before an sgemm: no, its
  // OpenBLAS threads need the cores)
  void parallel_for(int n, const std::function<void(int, int)>& f, bool spin = true) {
    const int t = std::min(size(), std::max(n, 1));
    if (t <= 1) {
      f(0, n);
      return;
    }
    std::lock_guard<std::mutex> call(call_mu_);  // one parallel_for at a time
    job_ = &f;
    n_ = n;
    parts_ = t;
    spin_.store(spin, std::memory_order_relaxed);
    pending_.store(t - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    f(0, static_cast<int>(static_cast<int64_t>(n) / t));
    for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin < kSpins) {
        BONSAI_PAUSE();
      } else {
        std::unique_lock<std::mutex> lk(mu_);
        done_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
      }
    }
  }

 private:
  static constexpr int kSpins = 20000;  // ~50 µs of pause instructions

  void loop(int index, unsigned long seen) {
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
      const int parts = parts_, n = n_;
      if (index < parts) {
        (*job_)(static_cast<int>(static_cast<int64_t>(n) * index / parts),
                static_cast<int>(static_cast<int64_t>(n) * (index + 1) / parts));
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lk(mu_);
          done_.notify_one();
        }
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
  std::condition_variable cv_, done_;
  const std::function<void(int, int)>* job_ = nullptr;
  int n_ = 0, parts_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<unsigned long> generation_{0};
  std::atomic<bool> quit_{false}, spin_{true};
};

}  // namespace bonsai
