// The core's work items on a framework thread pool (TF's intra-op pool for the OpKernels,
// XLA's for the FFI handlers): the calling thread plus at most (pool threads - 1) pool
// tasks claim chunks of items from a shared counter.
//
// Why not the framework's own ParallelFor: TF's runs the caller alongside every pool
// thread, one busy thread more than the pool has cores for; with as many threads as the
// pool has, no core is oversubscribed (which matters most for small inputs).
// Why the caller waits only for chunks to finish, never for a task to start: when the pool
// is busy (or its threads are all callers themselves) the caller runs every chunk alone,
// so it cannot deadlock. A task that starts late finds nothing to claim and touches only
// the shared state (kept alive by shared_ptr), never `fn`, which may be gone by then.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "segloss_cpu.h"

namespace fused_segloss {

struct ChunkQueue {
  int64_t n = 0, chunk = 1;
  const RangeFn* fn = nullptr;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Drain() {
    for (;;) {
      const int64_t begin = next.fetch_add(chunk);
      if (begin >= n) return;
      const int64_t end = std::min(n, begin + chunk);
      (*fn)(begin, end);
      if (done.fetch_add(end - begin) + (end - begin) == n) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

// Below this much estimated work (in the core's cost units, ~ns) a task costs more than it
// saves; no chunk is smaller than kMinChunkCost.
constexpr int64_t kMinParallelCost = 200000;
constexpr int64_t kMinChunkCost = 100000;

// Runs fn over [0, n) with `pool_threads` threads in all, the caller included;
// schedule(task) hands a std::function<void()> to the pool.
template <typename Schedule>
void ChunkedParallelFor(int64_t n, int64_t cost_per_item, int64_t pool_threads,
                        const Schedule& schedule, const RangeFn& fn) {
  if (n <= 0) return;
  const int64_t unit = std::max<int64_t>(cost_per_item, 1);
  if (pool_threads <= 1 || n == 1 || n * unit < kMinParallelCost) return fn(0, n);
  auto queue = std::make_shared<ChunkQueue>();
  queue->n = n;
  queue->fn = &fn;
  // About eight chunks per thread: dynamic balance on a shared, noisy machine.
  const int64_t by_balance = (n + 8 * pool_threads - 1) / (8 * pool_threads);
  queue->chunk = std::max<int64_t>({1, by_balance, (kMinChunkCost + unit - 1) / unit});
  const int64_t chunks = (n + queue->chunk - 1) / queue->chunk;
  const int64_t helpers = std::min(pool_threads - 1, chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) schedule([queue] { queue->Drain(); });
  queue->Drain();
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->all_done.wait(lock, [&] { return queue->done.load() == n; });
}

}  // namespace fused_segloss
