// Save and Load: the entry points of dcpp, for one process or all ranks of a job together.
//
// Every rank of the communicator calls Save (or Load) with its own state dict; the calls are
// collective and must be made in the same order on every rank. Without a communicator the call
// is a one-process save/load. The protocol (design.md §3):
//   save: local plans -> coordinator builds the global plan and metadata -> every rank writes its
//         items -> results gathered -> the coordinator commits `.metadata` only if every rank
//         succeeded;
//   load: read metadata -> plan reads by chunk overlap -> read only the needed byte ranges into
//         the caller's tensors, in place.
// Errors travel as values: if any rank fails in any phase, every rank returns the same Status
// naming the failed ranks and their causes, no rank hangs, and nothing is committed.
//
// Thread-safety: call from one thread per rank (the one that owns the communicator).
#pragma once

#include <memory>
#include <string>

#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "dcpp/planner.h"
#include "dcpp/state_dict.h"
#include "dcpp/status.h"

namespace dcpp {

class Communicator;

struct SaveOptions {
  Communicator* comm = nullptr;  // null: this process alone
  int coordinator_rank = 0;
  SavePlanner* planner = nullptr;  // null: DefaultSavePlanner
  // PyTorch's use_collectives=false: every rank plans alone and writes `__{rank}.metadata`.
  bool use_collectives = true;
  FileSystemWriterOptions writer;  // used by the path overload
};

struct LoadOptions {
  Communicator* comm = nullptr;
  int coordinator_rank = 0;
  LoadPlanner* planner = nullptr;      // null: DefaultLoadPlanner
  LoadPlannerOptions planner_options;  // for the default planner
  FileSystemReaderOptions reader;      // used by the path overload
  // Tensors that every rank loads whole (replicated parameters) are read from storage by one
  // rank each, spread over the ranks, and broadcast: each byte is read once per job.
  bool broadcast_replicated = false;
};

// Saves `state_dict` as a DCP checkpoint in directory `path`; returns the committed metadata.
Result<Metadata> Save(const StateDict& state_dict, const std::string& path,
                      const SaveOptions& options = {});
Result<Metadata> Save(const StateDict& state_dict, StorageWriter& writer,
                      const SaveOptions& options = {});

// Loads into `state_dict` in place: tensors (and local chunks of sharded tensors) are filled,
// other leaves replaced by the stored values. An empty dict loads everything as stored.
Status Load(StateDict& state_dict, const std::string& path, const LoadOptions& options = {});
Status Load(StateDict& state_dict, StorageReader& reader, const LoadOptions& options = {});

// Application state of Stateful objects (a model, an optimizer, a data loader), saved as one
// state dict {name: object.GetStateDict()}. Loading asks each object for its current state dict
// (its tensors are the destinations), loads into it, then hands it back through LoadStateDict.
using AppState = std::vector<std::pair<std::string, Stateful*>>;

Result<Metadata> Save(const AppState& app_state, const std::string& path,
                      const SaveOptions& options = {});
Status Load(const AppState& app_state, const std::string& path, const LoadOptions& options = {});

}  // namespace dcpp
