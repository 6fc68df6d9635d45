// MPI backend of Communicator (target dcpp::mpi), for jobs spread over processes and machines.
//
// MpiSession initializes MPI requesting MPI_THREAD_SERIALIZED (collectives may come from any one
// thread at a time, design §4) and finalizes it when destroyed, unless MPI was already running.
// MpiCommunicator::Create duplicates the given MPI communicator, so dcpp's messages never match
// the application's, and sets MPI_ERRORS_RETURN on the copy so MPI failures become Status values
// (Aborted, naming the MPI call and the rank) instead of aborting the job.
//
// Sizes: every collective first exchanges the buffer sizes as 64-bit integers. Payloads up to
// MpiOptions::max_message_bytes in total go through one v-collective (MPI_Gatherv, Allgatherv,
// Scatterv); larger ones are split into messages of at most that many bytes, so buffers beyond
// MPI's 2 GiB int counts work.
//
// Thread-safety: one thread at a time per communicator, and the same order of collectives on every
// rank. Destroy every MpiCommunicator before the MpiSession (MPI_Comm_free needs MPI running).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/comm.h"
#include "dcpp/status.h"

namespace dcpp {

class MpiSession {
 public:
  // Calls MPI_Init_thread(MPI_THREAD_SERIALIZED) unless MPI is initialized already.
  // FailedPrecondition if the library provides less than MPI_THREAD_SERIALIZED.
  static Result<std::unique_ptr<MpiSession>> Init(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  // The thread level MPI provides (MPI_THREAD_SINGLE ... MPI_THREAD_MULTIPLE).
  int thread_level() const { return thread_level_; }

 private:
  MpiSession(bool owns, int thread_level) : owns_(owns), thread_level_(thread_level) {}
  bool owns_;  // this session called MPI_Init_thread and so calls MPI_Finalize
  int thread_level_;
};

struct MpiOptions {
  // Largest single MPI message, and largest total payload sent through one v-collective.
  // Between 1 and INT_MAX. Tests lower it to exercise the split path.
  size_t max_message_bytes = size_t{1} << 30;
};

class MpiCommunicator final : public Communicator {
 public:
  // Collective over `comm`: duplicates it. FailedPrecondition if MPI is not initialized.
  static Result<std::unique_ptr<MpiCommunicator>> Create(MPI_Comm comm = MPI_COMM_WORLD,
                                                         MpiOptions options = {});
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Status Barrier() override;
  Status Broadcast(std::string& buf, int root) override;
  Result<std::vector<std::string>> Gather(const std::string& mine, int root) override;
  Result<std::vector<std::string>> AllGather(const std::string& mine) override;
  Result<std::string> Scatter(const std::vector<std::string>& parts, int root) override;

  // The communicator dcpp owns (a duplicate of the one given to Create).
  MPI_Comm comm() const { return comm_; }

 protected:
  Result<std::unique_ptr<Communicator>> CreateSubGroup(const std::vector<int>& ranks) override;

 private:
  MpiCommunicator(MPI_Comm comm, int rank, int size, MpiOptions options)
      : comm_(comm), rank_(rank), size_(size), options_(options) {}
  Status Check(int rc, const char* call) const;
  // Broadcasts n bytes at p from root in messages of at most max_message_bytes.
  Status BroadcastBytes(char* p, size_t n, int root);
  // Every rank's byte count, on every rank.
  Result<std::vector<uint64_t>> ExchangeSizes(uint64_t my_size);
  static void Layout(const std::vector<uint64_t>& sizes, std::vector<int>& counts,
                     std::vector<int>& displs);
  Status SendBytes(const char* p, size_t n, int to);
  Status RecvBytes(char* p, size_t n, int from);

  MPI_Comm comm_;
  int rank_;
  int size_;
  MpiOptions options_;
};

}  // namespace dcpp
