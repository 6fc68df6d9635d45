// MpiCommunicator: Communicator over MPI.
//
// Each collective runs in two steps on every rank:
//   1. exchange the byte counts as uint64 (MPI_Bcast / MPI_Allgather / MPI_Scatter), so every
//      rank knows the sizes and takes the same path in step 2. Scatter's counts also carry the
//      root's argument error, so every rank reports it;
//   2. move the bytes: one v-collective when the total fits MpiOptions::max_message_bytes
//      (MPI counts are int), else messages of at most that size (chunked MPI_Bcast, or
//      MPI_Send/MPI_Recv between the root and each rank in rank order).
#include "dcpp/mpi_comm.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

namespace dcpp {
namespace {

constexpr int kTag = 0x0dc9;  // point-to-point traffic on dcpp's private communicator
constexpr uint64_t kBadScatter = UINT64_MAX;

}  // namespace

// ------------------------------------------------------------------ MpiSession

Result<std::unique_ptr<MpiSession>> MpiSession::Init(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    MPI_Query_thread(&provided);
    return std::unique_ptr<MpiSession>(new MpiSession(false, provided));
  }
  if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
    return UnavailableError("MPI_Init_thread failed");
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    return FailedPreconditionError("MPI provides thread level " + std::to_string(provided) +
                                   ", below MPI_THREAD_SERIALIZED (" +
                                   std::to_string(MPI_THREAD_SERIALIZED) + ")");
  }
  return std::unique_ptr<MpiSession>(new MpiSession(true, provided));
}

MpiSession::~MpiSession() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

// ------------------------------------------------------------------ MpiCommunicator

Result<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Create(MPI_Comm comm,
                                                                 MpiOptions options) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    return FailedPreconditionError("MpiCommunicator::Create: MPI is not running");
  }
  if (options.max_message_bytes < 1 || options.max_message_bytes > INT_MAX) {
    return InvalidArgumentError("MpiOptions::max_message_bytes must be in [1, INT_MAX], not " +
                                std::to_string(options.max_message_bytes));
  }
  MPI_Comm dup = MPI_COMM_NULL;
  if (MPI_Comm_dup(comm, &dup) != MPI_SUCCESS) return AbortedError("MPI_Comm_dup failed");
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(dup, &rank);
  MPI_Comm_size(dup, &size);
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(dup, rank, size, options));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

Status MpiCommunicator::Check(int rc, const char* call) const {
  if (rc == MPI_SUCCESS) return Status::Ok();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  return AbortedError("rank " + std::to_string(rank_) + ": " + call +
                      " failed: " + std::string(text, static_cast<size_t>(len)));
}

Status MpiCommunicator::BroadcastBytes(char* p, size_t n, int root) {
  for (size_t off = 0; off < n; off += options_.max_message_bytes) {
    const int len = static_cast<int>(std::min(n - off, options_.max_message_bytes));
    DCPP_RETURN_IF_ERROR(Check(MPI_Bcast(p + off, len, MPI_BYTE, root, comm_), "MPI_Bcast"));
  }
  return Status::Ok();
}

Status MpiCommunicator::SendBytes(const char* p, size_t n, int to) {
  for (size_t off = 0; off < n; off += options_.max_message_bytes) {
    const int len = static_cast<int>(std::min(n - off, options_.max_message_bytes));
    DCPP_RETURN_IF_ERROR(Check(MPI_Send(p + off, len, MPI_BYTE, to, kTag, comm_), "MPI_Send"));
  }
  return Status::Ok();
}

Status MpiCommunicator::RecvBytes(char* p, size_t n, int from) {
  for (size_t off = 0; off < n; off += options_.max_message_bytes) {
    const int len = static_cast<int>(std::min(n - off, options_.max_message_bytes));
    DCPP_RETURN_IF_ERROR(
        Check(MPI_Recv(p + off, len, MPI_BYTE, from, kTag, comm_, MPI_STATUS_IGNORE), "MPI_Recv"));
  }
  return Status::Ok();
}

Status MpiCommunicator::Barrier() { return Check(MPI_Barrier(comm_), "MPI_Barrier"); }

Status MpiCommunicator::Broadcast(std::string& buf, int root) {
  DCPP_RETURN_IF_ERROR(internal::CheckRoot(*this, root, "Broadcast"));
  uint64_t n = buf.size();
  DCPP_RETURN_IF_ERROR(Check(MPI_Bcast(&n, 1, MPI_UINT64_T, root, comm_), "MPI_Bcast"));
  if (rank_ != root) buf.resize(n);
  return BroadcastBytes(buf.data(), n, root);
}

Result<std::vector<uint64_t>> MpiCommunicator::ExchangeSizes(uint64_t my_size) {
  std::vector<uint64_t> sizes(size_);
  DCPP_RETURN_IF_ERROR(
      Check(MPI_Allgather(&my_size, 1, MPI_UINT64_T, sizes.data(), 1, MPI_UINT64_T, comm_),
            "MPI_Allgather"));
  return sizes;
}

// Counts and displacements of a v-collective; the caller has checked the total fits an int.
void MpiCommunicator::Layout(const std::vector<uint64_t>& sizes, std::vector<int>& counts,
                             std::vector<int>& displs) {
  counts.resize(sizes.size());
  displs.resize(sizes.size());
  for (size_t r = 0, off = 0; r < sizes.size(); ++r) {
    counts[r] = static_cast<int>(sizes[r]);
    displs[r] = static_cast<int>(off);
    off += sizes[r];
  }
}

Result<std::vector<std::string>> MpiCommunicator::Gather(const std::string& mine, int root) {
  DCPP_RETURN_IF_ERROR(internal::CheckRoot(*this, root, "Gather"));
  // Every rank learns every size, so all of them choose the same path below.
  const uint64_t my_size = mine.size();
  DCPP_ASSIGN_OR_RETURN(std::vector<uint64_t> sizes, ExchangeSizes(my_size));
  uint64_t total = 0;
  for (uint64_t s : sizes) total += s;
  std::vector<std::string> out;
  if (total <= options_.max_message_bytes) {
    std::vector<int> counts, displs;
    Layout(sizes, counts, displs);
    std::string all(rank_ == root ? total : 0, '\0');
    DCPP_RETURN_IF_ERROR(
        Check(MPI_Gatherv(mine.data(), static_cast<int>(my_size), MPI_BYTE, all.data(),
                          counts.data(), displs.data(), MPI_BYTE, root, comm_),
              "MPI_Gatherv"));
    if (rank_ == root) {
      out.reserve(size_);
      for (int r = 0; r < size_; ++r) out.push_back(all.substr(displs[r], counts[r]));
    }
    return out;
  }
  if (rank_ != root) {
    DCPP_RETURN_IF_ERROR(SendBytes(mine.data(), mine.size(), root));
    return out;
  }
  out.resize(size_);
  for (int r = 0; r < size_; ++r) {
    if (r == root) {
      out[r] = mine;
      continue;
    }
    out[r].resize(sizes[r]);
    DCPP_RETURN_IF_ERROR(RecvBytes(out[r].data(), sizes[r], r));
  }
  return out;
}

Result<std::vector<std::string>> MpiCommunicator::AllGather(const std::string& mine) {
  const uint64_t my_size = mine.size();
  DCPP_ASSIGN_OR_RETURN(std::vector<uint64_t> sizes, ExchangeSizes(my_size));
  uint64_t total = 0;
  for (uint64_t s : sizes) total += s;
  std::vector<std::string> out(size_);
  if (total <= options_.max_message_bytes) {
    std::vector<int> counts, displs;
    Layout(sizes, counts, displs);
    std::string all(total, '\0');
    DCPP_RETURN_IF_ERROR(
        Check(MPI_Allgatherv(mine.data(), static_cast<int>(my_size), MPI_BYTE, all.data(),
                             counts.data(), displs.data(), MPI_BYTE, comm_),
              "MPI_Allgatherv"));
    for (int r = 0; r < size_; ++r) out[r] = all.substr(displs[r], counts[r]);
    return out;
  }
  // Too large for int displacements: each rank broadcasts its part in turn.
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) {
      out[r] = mine;
    } else {
      out[r].resize(sizes[r]);
    }
    DCPP_RETURN_IF_ERROR(BroadcastBytes(out[r].data(), sizes[r], r));
  }
  return out;
}

Result<std::string> MpiCommunicator::Scatter(const std::vector<std::string>& parts, int root) {
  DCPP_RETURN_IF_ERROR(internal::CheckRoot(*this, root, "Scatter"));
  // Per rank: {its count, the total}; or {kBadScatter, parts.size()} when the root's argument is
  // wrong, so every rank returns the same error.
  std::vector<uint64_t> info;
  if (rank_ == root) {
    info.resize(2 * static_cast<size_t>(size_));
    if (parts.size() != static_cast<size_t>(size_)) {
      for (int r = 0; r < size_; ++r) {
        info[2 * r] = kBadScatter;
        info[2 * r + 1] = parts.size();
      }
    } else {
      uint64_t total = 0;
      for (const std::string& p : parts) total += p.size();
      for (int r = 0; r < size_; ++r) {
        info[2 * r] = parts[r].size();
        info[2 * r + 1] = total;
      }
    }
  }
  uint64_t my_info[2] = {0, 0};
  DCPP_RETURN_IF_ERROR(
      Check(MPI_Scatter(info.data(), 2, MPI_UINT64_T, my_info, 2, MPI_UINT64_T, root, comm_),
            "MPI_Scatter"));
  if (my_info[0] == kBadScatter) {
    return InvalidArgumentError("Scatter: root " + std::to_string(root) + " passed " +
                                std::to_string(my_info[1]) + " parts for a group of " +
                                std::to_string(size_));
  }
  const uint64_t count = my_info[0], total = my_info[1];
  std::string out;
  if (total <= options_.max_message_bytes) {
    std::string packed;
    std::vector<int> counts, displs;
    if (rank_ == root) {
      packed.reserve(total);
      for (const std::string& p : parts) {
        counts.push_back(static_cast<int>(p.size()));
        displs.push_back(static_cast<int>(packed.size()));
        packed += p;
      }
    }
    out.resize(count);
    DCPP_RETURN_IF_ERROR(
        Check(MPI_Scatterv(packed.data(), counts.data(), displs.data(), MPI_BYTE, out.data(),
                           static_cast<int>(count), MPI_BYTE, root, comm_),
              "MPI_Scatterv"));
    return out;
  }
  if (rank_ == root) {
    for (int r = 0; r < size_; ++r) {
      if (r != root) DCPP_RETURN_IF_ERROR(SendBytes(parts[r].data(), parts[r].size(), r));
    }
    return parts[root];
  }
  out.resize(count);
  DCPP_RETURN_IF_ERROR(RecvBytes(out.data(), count, root));
  return out;
}

Result<std::unique_ptr<Communicator>> MpiCommunicator::CreateSubGroup(
    const std::vector<int>& ranks) {
  auto it = std::find(ranks.begin(), ranks.end(), rank_);
  const int index = it == ranks.end() ? -1 : static_cast<int>(it - ranks.begin());
  MPI_Comm sub = MPI_COMM_NULL;
  DCPP_RETURN_IF_ERROR(
      Check(MPI_Comm_split(comm_, index < 0 ? MPI_UNDEFINED : 0, std::max(index, 0), &sub),
            "MPI_Comm_split"));
  if (sub == MPI_COMM_NULL) return std::unique_ptr<Communicator>();
  MPI_Comm_set_errhandler(sub, MPI_ERRORS_RETURN);
  int sub_rank = 0, sub_size = 0;
  MPI_Comm_rank(sub, &sub_rank);
  MPI_Comm_size(sub, &sub_size);
  return std::unique_ptr<Communicator>(new MpiCommunicator(sub, sub_rank, sub_size, options_));
}

}  // namespace dcpp
