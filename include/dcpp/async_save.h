// AsyncSave: a save whose caller blocks only while its tensors are copied into staging buffers;
// planning, writing and the commit of `.metadata` run on a background executor.
//
// AsyncSave returns a handle with two futures:
//   * staged: the caller may modify (or free) the tensors of the state dict once it is ready;
//   * committed: the checkpoint is durable (the metadata), or the same error on every rank,
//     naming the failed ranks, with the last good checkpoint untouched.
// staged always becomes ready before committed. Without a staging budget (the default) staged
// is ready when AsyncSave returns.
//
// Staging: a process-wide Stager copies every tensor into one host arena, allocated on the
// first save, pre-faulted, optionally mlock'ed or backed by POSIX shared memory, and reused by
// every later save whose bytes fit: a second save of the same shapes allocates nothing and takes
// no page faults (AsyncSaveStats counts both). With StagingOptions::budget_bytes smaller than
// the state, the tensors that fit are staged and the rest are written straight from the
// caller's memory: staged then resolves only after the write step, and the caller must wait for
// it (AsyncSaveStats::unstaged_bytes says how much waited).
//
// Threads and collectives: every collective of an async save (plan agreement, gather of write
// results, commit broadcast) is issued by one dcpp background thread, the "save thread", in the
// order the saves were started; staging on the caller's thread is local. With one save in
// flight per process (the default policy) the collectives of two saves never interleave.
// While `committed` is pending, the save thread owns `SaveOptions::comm`: the caller must not
// use that communicator. A program that also calls MPI itself either
//   (a) passes a communicator of its own for checkpoints (MpiCommunicator::Create duplicates
//       the MPI communicator) and runs MPI at MPI_THREAD_MULTIPLE (initialize MPI with
//       MPI_Init_thread(MPI_THREAD_MULTIPLE) before MpiSession::Init, which keeps that level), or
//   (b) under MPI_THREAD_SERIALIZED, makes no MPI call of its own while `committed` is pending
//       (wait on it before its next collective).
// Without a communicator (one process) there is no such constraint.
//
// Policy: one async save in flight per process. A new AsyncSave while one runs waits for its
// commit (InFlightPolicy::kWait) or fails at once with FailedPrecondition (kFail).
//
// Executors: kThread runs the save on the save thread of this process. kProcess (path overload
// only) also plans and commits on the save thread, but the bytes are written by a long-lived
// writer process (the `dcpp_writer` binary: $DCPP_WRITER, beside the executable, or the build
// tree's) that maps the shared-memory staging arena and writes straight from it (no second copy,
// none of the trainer's threads or allocator involved). If that process dies, committed fails
// with Unavailable naming its pid and signal, nothing is committed (the last good checkpoint is
// untouched), and the next save starts a new one.
//
// Thread-safety: AsyncSave may be called from any one thread per rank (the one that would
// otherwise call Save); the handle's futures may be waited on from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <future>
#include <string>

#include "dcpp/checkpoint.h"

namespace dcpp {

struct StagingOptions {
  bool use_mlock = false;          // lock the arena in RAM (needs RLIMIT_MEMLOCK)
  bool use_shared_memory = false;  // back the arena by POSIX shared memory (kProcess implies it)
  // CUDA pinned host memory (cudaHostRegister of the arena, once). Only in a dcpp built with a
  // CUDA toolkit, which also stages contiguous CUDA tensors; otherwise Unimplemented.
  bool use_pinned_memory = false;
  // Bytes of staging at most; 0: as much as the state needs.
  size_t budget_bytes = 0;
};

enum class AsyncExecutor { kThread, kProcess };
enum class InFlightPolicy { kWait, kFail };

struct AsyncSaveOptions {
  SaveOptions save;  // communicator, planner, writer options: as for Save
  StagingOptions staging;
  AsyncExecutor executor = AsyncExecutor::kThread;
  InFlightPolicy in_flight = InFlightPolicy::kWait;
};

// What staging cost, measured on the caller's thread.
struct AsyncSaveStats {
  double blocking_seconds = 0;    // time AsyncSave blocked its caller (waiting + staging)
  double waiting_seconds = 0;     // of which: waiting for the previous save (kWait)
  int64_t staged_bytes = 0;       // copied into the arena
  int64_t unstaged_bytes = 0;     // over the budget: written from the caller's memory
  int64_t arena_allocations = 0;  // arenas mapped by this save (0 when the last one was reused)
  int64_t page_faults = 0;        // minor + major faults of the staging copy on the caller's thread
};

struct AsyncSaveHandle {
  std::shared_future<Status> staged;
  std::shared_future<Result<Metadata>> committed;
  AsyncSaveStats stats;
};

// Saves `state_dict` as a DCP checkpoint in directory `path` (or through `writer`, which must
// outlive `committed`), asynchronously. Every rank of options.save.comm calls it, in the same
// order.
AsyncSaveHandle AsyncSave(const StateDict& state_dict, const std::string& path,
                          const AsyncSaveOptions& options = {});
AsyncSaveHandle AsyncSave(const StateDict& state_dict, StorageWriter& writer,
                          const AsyncSaveOptions& options = {});

// Blocks until no async save of this process is in flight.
void WaitForAsyncSaves();

// Staging arenas mapped by this process so far, and bytes held now (for tests and benchmarks).
int64_t StagingArenaAllocations();
int64_t StagingArenaBytes();
// The pid of rank `rank`'s writer process (kProcess), or -1 when none runs.
int WriterProcessPid(int rank = 0);
// Waits for the async saves in flight, then ends the writer processes (at shutdown, or to start
// them afresh); a later kProcess save starts a new one.
void StopWriterProcesses();

}  // namespace dcpp
