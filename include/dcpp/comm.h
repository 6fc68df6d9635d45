// Communicator: the collectives a distributed save or load needs, over byte buffers.
//
// A group of `size()` ranks, numbered 0..size()-1. Every method except rank() and size() is a
// collective: every rank of the group must call the same collectives in the same order, with
// the same root (and, for SubGroup, the same rank list). Buffers may be empty and of any size,
// including more than 2 GiB.
//
// Errors are Status values, never exceptions. An argument error that every rank can see
// (a root out of range, a bad SubGroup list) is reported on every rank without communicating.
// An error only the root can see (Scatter given the wrong number of parts) is carried to every
// rank, so no rank waits for a peer that gave up. A failed transport (MPI error, a rank that did
// not arrive within the thread group's timeout) is Aborted: retry the whole operation.
//
// Thread rules: a communicator is used by one thread at a time, and the collectives of one
// group are issued in one order (design §4, "MPI from one thread"). Different ranks of a thread
// group are used from different threads, one rank per thread.
//
// Backends: SingleCommunicator (one process alone), thread groups (MakeThreadCommunicators,
// RunOnThreads: N ranks as N threads of one process, for tests), MpiCommunicator (mpi_comm.h).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dcpp/status.h"

namespace dcpp {

class Communicator {
 public:
  Communicator() = default;
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Returns once every rank has entered the barrier.
  virtual Status Barrier() = 0;
  // Copies `buf` of rank `root` into `buf` of every other rank (resizing it).
  virtual Status Broadcast(std::string& buf, int root) = 0;
  // On `root`: every rank's `mine`, indexed by rank. On other ranks: an empty vector.
  virtual Result<std::vector<std::string>> Gather(const std::string& mine, int root) = 0;
  // On every rank: every rank's `mine`, indexed by rank.
  virtual Result<std::vector<std::string>> AllGather(const std::string& mine) = 0;
  // Rank r receives parts[r] of `root`, which must pass size() parts; other ranks' `parts` are
  // ignored.
  virtual Result<std::string> Scatter(const std::vector<std::string>& parts, int root) = 0;

  // A communicator over the listed ranks of this one, in list order: ranks[i] becomes rank i.
  // Ranks not in the list get nullptr. The list must be non-empty, without duplicates, in range
  // and the same on every rank (checked: otherwise InvalidArgument on every rank).
  Result<std::unique_ptr<Communicator>> SubGroup(const std::vector<int>& ranks);

 protected:
  // Collective: the backend part of SubGroup, called on every rank with a validated list.
  virtual Result<std::unique_ptr<Communicator>> CreateSubGroup(const std::vector<int>& ranks) = 0;
};

// One process alone: rank 0 of 1. Collectives are local copies.
class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  Status Barrier() override { return Status::Ok(); }
  Status Broadcast(std::string& buf, int root) override;
  Result<std::vector<std::string>> Gather(const std::string& mine, int root) override;
  Result<std::vector<std::string>> AllGather(const std::string& mine) override;
  Result<std::string> Scatter(const std::vector<std::string>& parts, int root) override;

 protected:
  Result<std::unique_ptr<Communicator>> CreateSubGroup(const std::vector<int>& ranks) override;
};

struct ThreadCommOptions {
  // A rank waiting longer than this for its peers to enter a collective gives up with Aborted,
  // and the whole group is then broken: every later collective on it fails at once.
  std::chrono::milliseconds timeout{60000};
};

// N communicators sharing one in-process group; element r is rank r and is to be used by one
// thread. Collectives meet at a mutex/condition-variable rendezvous, one round at a time, so
// results are deterministic. Mismatched collectives (rank 0 in Gather, rank 1 in Barrier) are
// detected and reported as InvalidArgument on every rank.
Result<std::vector<std::unique_ptr<Communicator>>> MakeThreadCommunicators(
    int size, ThreadCommOptions options = {});

// Runs fn on `size` threads, thread r with rank r of a fresh thread group, and joins them. If fn
// throws on a rank, the group is broken (so its peers return Aborted instead of waiting) and
// the first exception is rethrown here after every thread has finished. A test helper: the only
// function in this header that may throw.
void RunOnThreads(int size, const std::function<void(Communicator&)>& fn,
                  ThreadCommOptions options = {});

namespace internal {
// InvalidArgument unless 0 <= root < comm.size(); `op` names the collective.
Status CheckRoot(const Communicator& comm, int root, std::string_view op);
}  // namespace internal

}  // namespace dcpp
