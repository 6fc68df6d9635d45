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

// This process's share of the machine's cores, for sizing parallel work. Processes a launcher
// bound to some cores (sched_getaffinity) get those; processes free to run anywhere share the
// cores with the other processes their launcher started on this machine, as it reports them
// (torchrun's LOCAL_WORLD_SIZE, Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE, MPICH's MPI_LOCALNRANKS).
// At least 1. Read once.
size_t CoresForThisProcess();
// The rule behind it: `allowed` cores in the affinity mask of a machine with `machine` cores,
// `local_processes` started on it (0 when no launcher said).
size_t CoresShare(size_t allowed, size_t machine, size_t local_processes);

}  // namespace dcpp::internal
