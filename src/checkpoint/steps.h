// The save and load protocols as sequences of named steps, and the collective step helpers that
// join them (internal: Save/Load/AsyncSave are the public entry points).
//
// The rule that keeps every rank out of a hang: each rank carries one Status through the steps.
// A local step does its work only while that status is OK, and records a failure in it. A
// collective step always takes part, sending the carried status with its payload, and returns
// what every rank learns from it: afterwards all ranks hold the same status. So a rank may stop
// only on a status that came out of a collective step, and every step method below runs its
// collective unconditionally.
//
// Fault points: before every fallible call the protocol asks FaultPoint(name, rank), where a
// test can inject an error instead of the call (SetFaultHookForTesting), to fail each step on
// each rank in turn.
//
// Thread-safety: a SaveSteps/LoadSteps is used by one thread at a time; its collective steps
// must be issued in the same order on every rank, from the thread that owns the communicator.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"

namespace dcpp::internal {

// ---- fault points ----

using FaultHook = std::function<Status(std::string_view point, int rank)>;
// Installs (or, with nullptr, removes) the hook; call while no save or load runs.
void SetFaultHookForTesting(FaultHook hook);
// The hook's error for (point, rank), or OK (always OK without a hook).
Status FaultPoint(std::string_view point, int rank);

// ---- collective steps ----

// This rank's status with a payload, as one message.
struct Carried {
  Status status;
  std::string payload;
};

// Every rank's status meets every other's: returns the combined failure (naming the failed
// ranks and their causes, `phase` saying where), the same on every rank, or OK.
Status AgreeStep(Communicator& comm, std::string_view phase, const Status& mine);

// Every rank sends its status and payload to `coordinator`, which calls `decide` with all of
// them (decide is called even if some failed, with the combined failure) and answers with one
// status and one payload for each rank (`replies` sized comm.size(); if `same_reply`, only
// replies[0] is used and broadcast). Returns this rank's answer.
using Decide = std::function<Status(const std::vector<Carried>& parts, Status combined,
                                    std::vector<std::string>* replies)>;
Carried CentralStep(Communicator& comm, int coordinator, std::string_view phase, Carried mine,
                    const Decide& decide, bool same_reply);

// `root` sends its status and payload to every rank.
Carried BroadcastStep(Communicator& comm, int root, Carried mine);

// ---- stand-ins ----

// Stand-ins for a writer/reader that could not be opened: every step fails with the same status,
// so this rank still joins the collectives and the others learn why.
class StatusWriter final : public StorageWriter {
 public:
  StatusWriter(std::string id, Status s) : id_(std::move(id)), s_(std::move(s)) {}
  Status SetUp(bool, int, bool) override { return s_; }
  Result<SavePlan> PrepareLocalPlan(SavePlan) override { return s_; }
  Result<std::vector<SavePlan>> PrepareGlobalPlan(std::vector<SavePlan>) override { return s_; }
  Result<std::vector<WriteResult>> WriteData(const SavePlan&, SavePlanner&) override { return s_; }
  Status Finish(Metadata&, const std::vector<std::vector<WriteResult>>&) override { return s_; }
  std::string checkpoint_id() const override { return id_; }

 private:
  std::string id_;
  Status s_;
};

class StatusReader final : public StorageReader {
 public:
  StatusReader(std::string id, Status s) : id_(std::move(id)), s_(std::move(s)) {}
  Result<Metadata> ReadMetadata(int) override { return s_; }
  Status SetUp(const Metadata&, bool, int) override { return s_; }
  Status ReadData(const LoadPlan&, LoadPlanner&) override { return s_; }
  std::string checkpoint_id() const override { return id_; }

 private:
  std::string id_;
  Status s_;
};

// ---- the protocols ----

class SaveSteps {
 public:
  SaveSteps(const StateDict& state_dict, StorageWriter& writer, const SaveOptions& options,
            Communicator& comm);
  SaveSteps(const SaveSteps&) = delete;
  SaveSteps& operator=(const SaveSteps&) = delete;

  // 1. plan (local): writer and planner SetUp, CreateLocalPlan, PrepareLocalPlan.
  void Plan();
  // 2. agree (collective): local plans gathered; the coordinator builds the global plan and the
  //    metadata; each rank gets its final plan. Rank-local mode plans alone.
  void Agree();
  // 3. write (local): FinishPlan, WriteData.
  void Write();
  // 4. gather + commit (collective): write results gathered; the coordinator commits
  //    `.metadata` only if every rank succeeded, and the outcome goes to every rank. Rank-local
  //    mode commits its own `__{rank}.metadata`, then the ranks agree on the outcome.
  Result<Metadata> Commit();

  const Status& status() const { return status_; }

 private:
  void Local(std::string_view point, const std::function<Status()>& step);
  Status DecideGlobalPlan(const std::vector<Carried>& parts, std::vector<std::string>* replies);
  // The coordinator's part of Agree over decoded plans (replaced by the final ones).
  Status GlobalPlan(std::vector<SavePlan>& plans, size_t group_size);
  Status DecideCommit(const std::vector<Carried>& parts, std::vector<std::string>* replies);
  Status CommitResults(const std::vector<std::vector<WriteResult>>& all);

  const StateDict& state_dict_;
  StorageWriter& writer_;
  const SaveOptions& options_;
  Communicator& comm_;
  const int rank_;
  const bool is_coordinator_;
  const bool rank_local_;
  // Rank-local mode or a group of one: no plan or result crosses a communicator.
  const bool planning_alone_;
  const std::string context_;
  DefaultSavePlanner default_planner_;
  SavePlanner& planner_;

  Status status_;
  SavePlan plan_;
  Metadata metadata_;
  std::vector<WriteResult> results_;
};

class LoadSteps {
 public:
  LoadSteps(StateDict& state_dict, StorageReader& reader, const LoadOptions& options,
            Communicator& comm);
  LoadSteps(const LoadSteps&) = delete;
  LoadSteps& operator=(const LoadSteps&) = delete;

  // 1. plan (local): ReadMetadata (a rank-local checkpoint's own `__{rank}.metadata` if there is
  //    no `.metadata`), planner and reader SetUp, CreateLocalPlan; then the ranks agree.
  void Plan();
  // 2. share (collective, with broadcast_replicated and more than one rank): the tensors every
  //    rank loads whole get one owner each, which alone reads them.
  void PlanSharedReads();
  // 3. read (local): ReadData; then the ranks agree.
  void Read();
  // 4. broadcast (collective): each owner sends its shared tensors to the others; then the
  //    ranks agree.
  Status Broadcast();

 private:
  void Local(std::string_view point, const std::function<Status()>& step);

  StateDict& state_dict_;
  StorageReader& reader_;
  const LoadOptions& options_;
  Communicator& comm_;
  const int rank_;
  const bool is_coordinator_;
  const std::string context_;
  DefaultLoadPlanner default_planner_;
  LoadPlanner& planner_;

  Status status_;
  Metadata metadata_;
  LoadPlan plan_;
  std::vector<std::pair<std::string, int>> shared_;  // fqn, owner; the same on every rank
  std::map<std::string, TensorView> shared_dest_;
};

}  // namespace dcpp::internal
