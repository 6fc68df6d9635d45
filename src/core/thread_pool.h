// The one thread pool of dcpp: I/O and codec work of every layer runs here.
//
// ParallelFor(n, parallelism, fn) runs fn(0..n-1) with at most `parallelism` calls at once: the
// calling thread works too, and pool threads join it as they become free. It returns when every
// index has run, with one Status per index. Workers are created on demand (up to kMaxThreads)
// and kept for later calls, so a second save does not pay for thread creation again.
//
// Nested ParallelFor calls cannot deadlock: a caller never waits for work that no thread has
// started; whatever is unclaimed it runs itself.
//
// Thread-safety: every function may be called from any thread. fn must be safe to call from
// several threads at once.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "dcpp/status.h"

namespace dcpp::internal {

inline constexpr size_t kMaxThreads = 64;

std::vector<Status> ParallelFor(size_t n, size_t parallelism,
                                const std::function<Status(size_t)>& fn);

// The first error of ParallelFor's statuses (by index), or OK.
Status FirstError(const std::vector<Status>& statuses);

// Worker threads the pool holds now (for tests and benchmarks).
size_t PoolThreadCount();

}  // namespace dcpp::internal
