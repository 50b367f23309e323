// A small persistent thread pool for the quantized kernels: `parallel_for(n, f)` splits [0, n) into one contiguous
// range per thread (the calling thread takes the first). Workers sleep on a condition variable between calls (no
// spinning), so they never compete with OpenBLAS's threads, which run only inside sgemm calls made between ours.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace bonsai {

class ThreadPool {
 public:
  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    stop();
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = false;
    for (int i = 1; i < std::max(n, 1); ++i) workers_.emplace_back([this, i] { loop(i); });
  }

  void parallel_for(int n, const std::function<void(int, int)>& f) {
    const int t = std::min(size(), std::max(n, 1));
    if (t <= 1) {
      f(0, n);
      return;
    }
    std::unique_lock<std::mutex> call(call_mu_);  // one parallel_for at a time
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      n_ = n;
      parts_ = t;
      pending_ = t - 1;
      ++generation_;
    }
    cv_.notify_all();
    f(0, n / t);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int index) {
    unsigned long seen = 0;
    for (;;) {
      const std::function<void(int, int)>* job;
      int n, parts;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_ || generation_ != seen; });
        if (quit_) return;
        seen = generation_;
        job = job_;
        n = n_;
        parts = parts_;
      }
      if (index < parts) {
        (*job)(static_cast<int>(static_cast<int64_t>(n) * index / parts),
               static_cast<int>(static_cast<int64_t>(n) * (index + 1) / parts));
        std::lock_guard<std::mutex> lk(mu_);
        if (--pending_ == 0) done_.notify_one();
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
  int n_ = 0, parts_ = 0, pending_ = 0;
  unsigned long generation_ = 0;
  bool quit_ = false;
};

}  // namespace bonsai
