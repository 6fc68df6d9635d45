// Checks every Communicator backend must pass. Each function is collective: call it on every rank
// of a group at once (one thread per rank for thread groups, every process for MPI). Failures
// are reported with gtest EXPECT_*, tagged with the rank.
#pragma once

#include <cstddef>
#include <string>

#include "dcpp/comm.h"

namespace dcpp::testing {

// Deterministic bytes, different for every (rank, tag) and of length n.
std::string CommPayload(int rank, int tag, size_t n);

// Barrier, Broadcast, Gather, AllGather and Scatter from every root, with empty, small and
// rank-dependent sizes, plus the argument errors (bad root, wrong Scatter part count) that every
// rank must report alike.
void ExpectCollectivesWork(Communicator& comm);

// SubGroup: the whole group reversed, the even ranks, a single rank; collectives inside each;
// and the lists that every rank must reject alike (duplicates, out of range, disagreement).
void ExpectSubGroupsWork(Communicator& comm);

// Broadcast, Gather, AllGather and Scatter of `bytes`-sized buffers from rank 0 (large-buffer
// check; memory use is about size() * bytes per rank).
void ExpectLargeCollectivesWork(Communicator& comm, size_t bytes);

}  // namespace dcpp::testing
