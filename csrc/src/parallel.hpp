// A fork-join loop over tasks on the kernel's own threads (created per call, no shared pool).
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "guarded.hpp"
#include "tracin/tracin.hpp"

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__linux__) && defined(__GLIBC__)  // pthread_attr_setaffinity_np: glibc only (not musl, bionic)
#include <pthread.h>
#define TRACIN_STEERED_THREADS 1
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

// A joinable thread running `body`. On Linux it is created with an affinity mask that leaves out
// its creator's CPU (where the creator's mask allows another) and widens its mask back to the
// creator's once it runs: Linux queues a new thread on its creator's CPU, where it waited about
// 1.8 ms for the load balancer to move it (2-core VM, kernel 6.18; 0.14 ms steered). top_k with
// m=256, n=1e4, d=128 on 2 threads took 11 ms instead of 6 (the bare sgemm: 4.9 ms). Elsewhere
// (musl, bionic, other systems) a std::thread. Throws std::system_error if no thread can be started
// (std::bad_alloc without memory).
class WorkerThread {
 public:
  explicit WorkerThread(std::function<void()> body) {
#if defined(TRACIN_STEERED_THREADS)
    auto state = std::make_unique<State>(State{std::move(body), {}, false});
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
      throw std::system_error(EAGAIN, std::generic_category(), "pthread_attr_init");
    CPU_ZERO(&state->mask);
    const int cpu = sched_getcpu();
    if (cpu >= 0 && cpu < CPU_SETSIZE && sched_getaffinity(0, sizeof(cpu_set_t), &state->mask) == 0 &&
        CPU_ISSET(cpu, &state->mask) && CPU_COUNT(&state->mask) > 1) {
      cpu_set_t others = state->mask;
      CPU_CLR(cpu, &others);
      state->widen = pthread_attr_setaffinity_np(&attr, sizeof(cpu_set_t), &others) == 0;
    }
    int rc = pthread_create(&handle_, &attr, &Start, state.get());
    pthread_attr_destroy(&attr);
    if (rc != 0 && state->widen) {  // the creator's mask changed meanwhile (no CPU left): start it unsteered
      state->widen = false;
      rc = pthread_create(&handle_, nullptr, &Start, state.get());
    }
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "pthread_create");
    state.release();  // Start owns it now
#else
    thread_ = std::thread(std::move(body));
#endif
  }
  WorkerThread(const WorkerThread&) = delete;
  WorkerThread& operator=(const WorkerThread&) = delete;
  ~WorkerThread() { Join(); }

  void Join() {
#if defined(TRACIN_STEERED_THREADS)
    if (joinable_) pthread_join(handle_, nullptr);
    joinable_ = false;
#else
    if (thread_.joinable()) thread_.join();
#endif
  }

 private:
#if defined(TRACIN_STEERED_THREADS)
  struct State {
    std::function<void()> body;
    cpu_set_t mask;  // the creator's affinity mask, restored when widen
    bool widen;
  };
  static void* Start(void* arg) {
    const std::unique_ptr<State> state(static_cast<State*>(arg));
    if (state->widen) sched_setaffinity(0, sizeof(cpu_set_t), &state->mask);
    state->body();  // the body catches its own exceptions (ParallelFor's Guarded)
    return nullptr;
  }
  pthread_t handle_{};
  bool joinable_ = true;
#else
  std::thread thread_;
#endif
};

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
  std::vector<std::unique_ptr<WorkerThread>> threads;
  threads.reserve(static_cast<std::size_t>(n_threads - 1));
  try {
    for (int t = 1; t < n_threads; ++t)
      threads.push_back(std::make_unique<WorkerThread>([&worker, t] { worker(t); }));
  } catch (const std::system_error&) {
    // Fewer threads than asked for: the ones running finish the work.
  } catch (const std::bad_alloc&) {
    // The same without memory for another thread.
  }
  worker(0);
  for (auto& t : threads) t->Join();
  return error;
}

}  // namespace tracin::detail
