// Staging: copies a state dict's tensors into one reusable host arena (internal to AsyncSave).
//
// The arena is mapped once (anonymous memory, or POSIX shared memory), every page touched right
// away so later copies take no faults, optionally mlock'ed, and reused while the state fits. Each
// tensor gets a 64-byte aligned slot, in traversal order, so the same shapes land at the same
// offsets save after save.
//
// Thread-safety: a Stager is used by one save at a time (AsyncSave's in-flight rule); the staged
// state dict stays valid until the next Stage call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "dcpp/async_save.h"
#include "dcpp/state_dict.h"

namespace dcpp::internal {

struct StageResult {
  StateDict staged;  // the caller's tree, tensors replaced by views into the arena
  int64_t staged_bytes = 0;
  int64_t unstaged_bytes = 0;  // tensors over the budget, still the caller's
  int64_t allocations = 0;     // arenas mapped by this call
  int64_t page_faults = 0;     // faults of this thread during the call
};

class Stager {
 public:
  Stager() = default;
  ~Stager();
  Stager(const Stager&) = delete;
  Stager& operator=(const Stager&) = delete;

  Result<StageResult> Stage(const StateDict& state_dict, const StagingOptions& options);

  // The arena's mapping, for a writer process that maps the same shared memory.
  std::byte* base() const { return base_; }
  size_t capacity() const { return capacity_; }
  int shm_fd() const { return shm_fd_; }  // -1 unless backed by shared memory
  // Unique in the process for each mapping of an arena, 0 while none is mapped. A new mapping
  // may reuse the old one's address and size, so only this tells a writer process to map anew.
  uint64_t id() const { return id_; }

  static int64_t TotalAllocations();
  static int64_t BytesHeld();

 private:
  Status Reserve(size_t bytes, const StagingOptions& options);
  void Release();

  std::byte* base_ = nullptr;
  size_t capacity_ = 0;
  int shm_fd_ = -1;
  uint64_t id_ = 0;
  bool locked_ = false;
  bool shared_ = false;
  bool pinned_ = false;
};

// CUDA (staging_cuda.cc, built when a CUDA toolkit is found; otherwise these are Unimplemented).
Status CudaPinHost(void* p, size_t n);
void CudaUnpinHost(void* p);
Status CudaCopyToHost(void* dst, const void* src, size_t n);

}  // namespace dcpp::internal
