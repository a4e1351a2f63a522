// A fork-join loop over tasks on the kernel's own threads (created per call, no shared pool).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "guarded.hpp"
#include "tracin/tracin.hpp"

#if defined(__linux__)
#include <sched.h>
#endif

namespace tracin::detail {

// The CPUs this process may run on: its affinity mask on Linux (taskset, cgroups cpusets, SLURM
// bindings), which hardware_concurrency ignores; the machine's count elsewhere or if the mask is
// unreadable (more CPUs than a cpu_set_t holds).
inline int AvailableCpus() {
#if defined(__linux__)
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) {
    const int count = CPU_COUNT(&mask);
    if (count > 0) return count;
  }
#endif
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Threads for a call: `requested` if positive, else every CPU this process may run on.
inline int ResolveThreads(int requested) {
  if (requested > 0) return requested;
  return AvailableCpus();
}

inline bool IsCancelled(const std::atomic<bool>* cancel) {
  return cancel != nullptr && cancel->load(std::memory_order_relaxed);
}

inline Status Cancelled() { return {StatusCode::kCancelled, "cancelled through Options::cancel"}; }

// Runs body(task, thread) for task in [0, n_tasks) on up to n_threads threads, tasks handed out
// dynamically. A body taking (task, upcoming, thread) is also told the task its thread runs next
// (n_tasks if none), e.g. to prefetch its data. `stop` lets a body end the loop early; `cancel`
// (Options::cancel, may be null) is checked before every task and ends the loop with kCancelled.
// Exceptions become a Status.
template <class Body>
Status ParallelFor(std::int64_t n_tasks, int n_threads, std::atomic<bool>& stop,
                   const std::atomic<bool>* cancel, Body&& body) {
  n_threads = static_cast<int>(std::min<std::int64_t>(n_threads, std::max<std::int64_t>(n_tasks, 1)));
  std::atomic<std::int64_t> next{0};
  std::mutex error_mutex;
  Status error;
  auto worker = [&](int thread) {
    const Status status = Guarded([&] {
      std::int64_t task = next++;
      while (task < n_tasks && !stop.load(std::memory_order_relaxed)) {
        if (IsCancelled(cancel)) return Cancelled();
        const std::int64_t upcoming = std::min<std::int64_t>(next++, n_tasks);
        if constexpr (std::is_invocable_v<Body&, std::int64_t, std::int64_t, int>)
          body(task, upcoming, thread);
        else
          body(task, thread);
        task = upcoming;
      }
      return Status::Ok();
    });
    if (!status.ok()) {
      std::lock_guard<std::mutex> lock(error_mutex);
      error = status;
      stop = true;
    }
  };
  if (n_threads <= 1) {
    worker(0);
    return error;
  }
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n_threads - 1));
  try {
    for (int t = 1; t < n_threads; ++t) threads.emplace_back(worker, t);
  } catch (const std::system_error&) {
    // Fewer threads than asked for: the ones running finish the work.
  }
  worker(0);
  for (auto& t : threads) t.join();
  return error;
}

}  // namespace tracin::detail
