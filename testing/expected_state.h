// Checks of a DCP checkpoint against a torch.save file of the values it must hold.
//
// A peer (PyTorch) writes the checkpoint and, beside it, a torch.save file of the same state with
// every sharded tensor gathered whole; these helpers load the checkpoint with dcpp on any number
// of ranks, each rank asking for its own slab of every tensor, and compare bit for bit. They
// return differences as text (empty: equal) so callers on several threads or MPI ranks can
// report them. Thread-safety: plain functions; ExpectedState is read-only once made.
#pragma once

#include <string>
#include <vector>

#include "dcpp/comm.h"
#include "dcpp/state_dict.h"
#include "dcpp/status.h"
#include "dcpp/value.h"

namespace dcpp::testing {

struct ExpectedEntry {
  std::string fqn;  // as DCP flattens the nested state ("optim.state.net.0.weight.exp_avg")
  ObjectPath path;  // its place in the nested state
  Value value;      // a whole tensor, or a plain value
};
using ExpectedState = std::vector<ExpectedEntry>;

// Every entry of the torch.save file at `path`.
Result<ExpectedState> ReadExpectedState(const std::string& path);

// Loads the checkpoint at `dir` on this rank of `comm` (null: one process) into a flat state dict
// of the expected fqns: every tensor of rank >= 1 as this rank's slab along dimension
// min(split_dim, rank - 1) (ranks split it as evenly as they can; some may hold nothing), other
// entries whole; then compares every loaded value with `expected`.
std::vector<std::string> LoadAndCompare(const std::string& dir, const ExpectedState& expected,
                                        Communicator* comm, int split_dim);

// (offset, size) of `rank`'s slab when `world` ranks split `extent` elements as evenly as they can.
std::pair<int64_t, int64_t> Slab(int64_t extent, int rank, int world);

}  // namespace dcpp::testing
