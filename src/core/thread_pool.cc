#include "core/thread_pool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string_view>
#include <thread>

namespace dcpp::internal {
namespace {

class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool;  // never destroyed: detached workers outlive static teardown
    return *pool;
  }

  // Queues `task`, making sure at least `want` workers exist.
  void Submit(std::function<void()> task, size_t want) {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(task));
    want = std::min(want, kMaxThreads);
    while (threads_ < want) {
      ++threads_;
      std::thread([this] { Work(); }).detach();
    }
    cv_.notify_one();
  }

  size_t threads() {
    std::lock_guard<std::mutex> lock(mu_);
    return threads_;
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return !queue_.empty(); });
      auto task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  size_t threads_ = 0;
};

// What the caller and its helpers share; helpers that start late find no work and leave.
struct Job {
  size_t n;
  const std::function<Status(size_t)>* fn;
  std::vector<Status> statuses;
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  size_t running = 0;   // helpers inside RunLoop
  bool closed = false;  // the caller has stopped waiting: late helpers must not touch fn

  void RunLoop() {
    for (size_t i; (i = next.fetch_add(1)) < n;) statuses[i] = (*fn)(i);
  }
};

}  // namespace

std::vector<Status> ParallelFor(size_t n, size_t parallelism,
                                const std::function<Status(size_t)>& fn) {
  const size_t helpers = std::min(n, std::max<size_t>(parallelism, 1)) - (n > 0 ? 1 : 0);
  if (helpers == 0) {
    std::vector<Status> statuses(n);
    for (size_t i = 0; i < n; ++i) statuses[i] = fn(i);
    return statuses;
  }
  auto job = std::make_shared<Job>();
  job->n = n;
  job->fn = &fn;
  job->statuses.resize(n);
  for (size_t h = 0; h < helpers; ++h) {
    Pool::Get().Submit(
        [job] {
          {
            std::lock_guard<std::mutex> lock(job->mu);
            if (job->closed) return;
            ++job->running;
          }
          job->RunLoop();
          std::lock_guard<std::mutex> lock(job->mu);
          if (--job->running == 0) job->cv.notify_all();
        },
        helpers);
  }
  job->RunLoop();  // every index is claimed when this returns
  std::unique_lock<std::mutex> lock(job->mu);
  job->closed = true;
  job->cv.wait(lock, [&] { return job->running == 0; });
  return std::move(job->statuses);
}

Status FirstError(const std::vector<Status>& statuses) {
  for (const Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

size_t PoolThreadCount() { return Pool::Get().threads(); }

size_t CoresShare(size_t allowed, size_t machine, size_t local_processes) {
  allowed = std::max<size_t>(allowed, 1);
  // A mask narrower than the machine is the launcher's share already.
  if (allowed < machine || local_processes <= 1) return allowed;
  return std::max<size_t>(1, allowed / local_processes);
}

namespace {

size_t LocalProcessesFromLauncher() {
  for (const char* name : {"LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"}) {
    const char* v = std::getenv(name);
    if (v == nullptr) continue;
    const std::string_view text(v);
    size_t n = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
    if (ec == std::errc() && end == text.data() + text.size() && n > 0) return n;
  }
  return 0;
}

}  // namespace

size_t CoresForThisProcess() {
  static const size_t cores = [] {
    const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    const size_t machine = online > 0 ? static_cast<size_t>(online) : 1;
    size_t allowed = machine;
    cpu_set_t set;
    if (::sched_getaffinity(0, sizeof(set), &set) == 0) {
      allowed = static_cast<size_t>(CPU_COUNT(&set));
    }
    return CoresShare(allowed, machine, LocalProcessesFromLauncher());
  }();
  return cores;
}

}  // namespace dcpp::internal
