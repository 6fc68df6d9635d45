// The collective save and load protocols, as steps (steps.h states the rule that keeps every
// rank out of a hang).
//
// Save, on every rank (C = coordinator):
//   1. plan: writer.SetUp, planner.SetUp, CreateLocalPlan, writer.PrepareLocalPlan;
//   2. agree: Gather(status + local plan) to C; C builds the global plan and metadata (or the
//      error of the ranks that failed) and Scatters each rank its plan (or that error);
//   3. write: FinishPlan, WriteData;
//   4. commit: Gather(status + write results) to C; C commits `.metadata` only if all succeeded,
//      then Broadcasts the outcome (status + metadata) so every rank returns the same thing;
//      every rank then ends the save (EndSave: the destination's lock, taken by C's SetUp, is
//      released). A failed SetUp on C reaches every rank in step 2, before any data is written.
//   Rank-local mode (use_collectives=false): steps 2 and 4 run on each rank alone (each writes
//   `__{rank}.metadata`), and the ranks then agree on the outcome.
// Load: 1. plan (ReadMetadata, SetUp, CreateLocalPlan) and agree; 2. with broadcast_replicated,
// all-gather which tensors each rank loads whole and pick one owner each; 3. ReadData and agree;
// 4. owners broadcast the shared tensors, and the ranks agree.
#include "dcpp/checkpoint.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "checkpoint/steps.h"
#include "core/log.h"
#include "core/thread_pool.h"
#include "core/wire.h"
#include "dcpp/comm.h"

namespace dcpp {
namespace internal {

// ------------------------------------------------------------------ fault points

namespace {

std::mutex& HookMutex() {
  static std::mutex mu;
  return mu;
}
FaultHook& Hook() {
  static FaultHook hook;
  return hook;
}

}  // namespace

void SetFaultHookForTesting(FaultHook hook) {
  std::lock_guard<std::mutex> lock(HookMutex());
  Hook() = std::move(hook);
}

Status FaultPoint(std::string_view point, int rank) {
  FaultHook hook;
  {
    std::lock_guard<std::mutex> lock(HookMutex());
    if (!Hook()) return Status::Ok();
    hook = Hook();
  }
  return hook(point, rank);
}

// ------------------------------------------------------------------ collective steps

namespace {

std::string Envelope(const Status& s, std::string_view payload) {
  WireWriter w;
  w.Status(s);
  w.Raw(payload);
  return w.Release();
}

Carried Open(std::string_view b) {
  WireReader r(b, "collective message");
  Status carried;
  Status decoded = r.ReadStatus(&carried);
  if (!decoded.ok()) return {decoded, {}};
  return {carried, std::string(r.Rest())};
}

// One error for every rank: the failed ranks, each with its cause. The code is the first failed
// rank's, so the caller still learns what kind of failure it was.
Status CombineFailures(const std::vector<Carried>& parts, std::string_view phase) {
  std::vector<size_t> failed;
  for (size_t r = 0; r < parts.size(); ++r) {
    if (!parts[r].status.ok()) failed.push_back(r);
  }
  if (failed.empty()) return Status::Ok();
  if (failed.size() == 1 && parts.size() == 1) return parts[0].status;
  // Every rank carrying one status already shared by an earlier step: it stands as it is.
  const bool shared = failed.size() == parts.size() &&
                      std::all_of(parts.begin(), parts.end(), [&](const Carried& p) {
                        return p.status.code() == parts[0].status.code() &&
                               p.status.message() == parts[0].status.message();
                      });
  if (shared) return parts[0].status;
  std::ostringstream msg;
  msg << phase << " failed on rank" << (failed.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < failed.size(); ++i) msg << (i ? ", " : "") << failed[i];
  for (size_t r : failed) msg << "; rank " << r << ": " << parts[r].status.message();
  return Status(parts[failed[0]].status.code(), msg.str());
}

std::vector<Carried> OpenAll(const std::vector<std::string>& messages) {
  std::vector<Carried> out;
  out.reserve(messages.size());
  for (const auto& m : messages) out.push_back(Open(m));
  return out;
}

std::string RankField(const Communicator& comm) { return "rank=" + std::to_string(comm.rank()); }

// Runs one rank-local step unless an earlier one failed; its fault point comes first. With
// DCPP_LOG=debug each step is logged with its duration, under its fault point's name.
void RunLocalStep(std::string_view point, int rank, Status& status,
                  const std::function<Status()>& step) {
  if (status.ok()) status = FaultPoint(point, rank);
  if (!status.ok()) return;
  if (CurrentLogLevel() < LogLevel::kDebug) {
    status = step();
    return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  status = step();
  char f[64];
  std::snprintf(
      f, sizeof f, "rank=%d ms=%.3f", rank,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  LogLine(LogLevel::kDebug, point, f);
}

}  // namespace

Status AgreeStep(Communicator& comm, std::string_view phase, const Status& mine) {
  auto all = comm.AllGather(Envelope(mine, ""));
  if (!all.ok()) return all.status();
  return CombineFailures(OpenAll(*all), phase);
}

Carried CentralStep(Communicator& comm, int coordinator, std::string_view phase, Carried mine,
                    const Decide& decide, bool same_reply) {
  auto gathered =
      comm.Gather(Envelope(mine.status, mine.status.ok() ? mine.payload : ""), coordinator);
  // A failed collective breaks the group for every rank; nothing more can be exchanged.
  if (!gathered.ok()) return {gathered.status(), {}};
  std::vector<std::string> replies;
  if (comm.rank() == coordinator) {
    std::vector<Carried> parts = OpenAll(*gathered);
    Status combined = CombineFailures(parts, phase);
    std::vector<std::string> payloads(comm.size());
    Status decided = decide(parts, combined, &payloads);
    // The coordinator's own failure names it, as a failed rank's does.
    if (combined.ok() && !decided.ok()) {
      combined = decided.WithContext("coordinator (rank " + std::to_string(coordinator) + ")");
    }
    if (same_reply) {
      replies.push_back(Envelope(combined, combined.ok() ? payloads[0] : ""));
    } else {
      for (int r = 0; r < comm.size(); ++r) {
        replies.push_back(Envelope(combined, combined.ok() ? payloads[r] : ""));
      }
    }
  }
  if (same_reply) {
    std::string outcome = replies.empty() ? std::string() : std::move(replies[0]);
    Status b = comm.Broadcast(outcome, coordinator);
    if (!b.ok()) return {b, {}};
    return Open(outcome);
  }
  auto part = comm.Scatter(replies, coordinator);
  if (!part.ok()) return {part.status(), {}};
  return Open(*part);
}

Carried BroadcastStep(Communicator& comm, int root, Carried mine) {
  std::string buf = comm.rank() == root
                        ? Envelope(mine.status, mine.status.ok() ? mine.payload : "")
                        : std::string();
  Status b = comm.Broadcast(buf, root);
  if (!b.ok()) return {b, {}};
  return Open(buf);
}

// ------------------------------------------------------------------ save

SaveSteps::SaveSteps(const StateDict& state_dict, StorageWriter& writer, const SaveOptions& options,
                     Communicator& comm)
    : state_dict_(state_dict),
      writer_(writer),
      options_(options),
      comm_(comm),
      rank_(comm.rank()),
      is_coordinator_(comm.rank() == options.coordinator_rank),
      rank_local_(!options.use_collectives),
      planning_alone_(rank_local_ || comm.size() == 1),
      context_("rank " + std::to_string(comm.rank()) + ": saving \"" + writer.checkpoint_id() +
               "\""),
      default_planner_(SavePlannerOptions{.require_full_coverage = options.use_collectives}),
      planner_(options.planner ? *options.planner : default_planner_) {
  if (options.coordinator_rank < 0 || options.coordinator_rank >= comm.size()) {
    // Every rank sees the same group and options, so every rank fails here alike.
    status_ = InvalidArgumentError("coordinator rank " + std::to_string(options.coordinator_rank) +
                                   " is not in a group of " + std::to_string(comm.size()));
  }
}

void SaveSteps::Local(std::string_view point, const std::function<Status()>& step) {
  RunLocalStep(point, rank_, status_, step);
}

void SaveSteps::Plan() {
  PhaseTimer t("save.local_plan", RankField(comm_));
  Local("save.writer.set_up",
        [&] { return writer_.SetUp(is_coordinator_, rank_, options_.use_collectives); });
  Local("save.planner.set_up", [&] { return planner_.SetUp(state_dict_, is_coordinator_); });
  Local("save.planner.create_local_plan", [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(plan_, planner_.CreateLocalPlan());
    return Status::Ok();
  });
  Local("save.writer.prepare_local_plan", [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(plan_, writer_.PrepareLocalPlan(std::move(plan_)));
    return Status::Ok();
  });
}

Status SaveSteps::DecideGlobalPlan(const std::vector<Carried>& parts,
                                   std::vector<std::string>* replies) {
  std::vector<SavePlan> plans;
  for (size_t r = 0; r < parts.size(); ++r) {
    Status injected = FaultPoint("save.coordinator.decode_plan", rank_);
    auto p = injected.ok() ? DecodeSavePlan(parts[r].payload) : Result<SavePlan>(injected);
    if (!p.ok()) return p.status().WithContext("plan of rank " + std::to_string(r));
    plans.push_back(std::move(*p));
  }
  DCPP_RETURN_IF_ERROR(GlobalPlan(plans, replies->size()));
  for (size_t r = 0; r < plans.size(); ++r) (*replies)[r] = EncodeSavePlan(plans[r]);
  return Status::Ok();
}

Status SaveSteps::GlobalPlan(std::vector<SavePlan>& plans, size_t group_size) {
  DCPP_RETURN_IF_ERROR(FaultPoint("save.planner.create_global_plan", rank_));
  DCPP_ASSIGN_OR_RETURN(auto global, planner_.CreateGlobalPlan(std::move(plans)));
  metadata_ = std::move(global.second);
  DCPP_RETURN_IF_ERROR(FaultPoint("save.writer.prepare_global_plan", rank_));
  DCPP_ASSIGN_OR_RETURN(plans, writer_.PrepareGlobalPlan(std::move(global.first)));
  if (plans.size() != group_size) {
    return InternalError("the global plan has " + std::to_string(plans.size()) +
                         " parts for a group of " + std::to_string(group_size));
  }
  return Status::Ok();
}

void SaveSteps::Agree() {
  PhaseTimer t("save.global_plan", RankField(comm_));
  if (planning_alone_) {
    // This rank is its own coordinator (rank-local mode, or a group of one): its plan goes to
    // the coordinator's step and back in memory. Encoding and decoding it cost a fifth of a
    // one-rank save of 20 000 small tensors.
    Local("save.local.global_plan", [&] {
      std::vector<SavePlan> plans;
      plans.push_back(std::move(plan_));
      Status s = GlobalPlan(plans, 1);
      if (s.ok()) plan_ = std::move(plans[0]);
      return s;
    });
    return;
  }
  Carried mine{status_, status_.ok() ? EncodeSavePlan(plan_) : std::string()};
  Carried answer = CentralStep(
      comm_, options_.coordinator_rank, "planning", std::move(mine),
      [&](const std::vector<Carried>& parts, Status combined, std::vector<std::string>* replies) {
        return combined.ok() ? DecideGlobalPlan(parts, replies) : combined;
      },
      /*same_reply=*/false);
  status_ = answer.status;  // shared by every rank from here on
  Local("save.decode_plan", [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(plan_, DecodeSavePlan(answer.payload));
    return Status::Ok();
  });
}

void SaveSteps::Write() {
  PhaseTimer t("save.write", RankField(comm_));
  Local("save.planner.finish_plan", [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(plan_, planner_.FinishPlan(std::move(plan_)));
    return Status::Ok();
  });
  auto write = [&] {
    Local("save.writer.write_data", [&]() -> Status {
      DCPP_ASSIGN_OR_RETURN(results_, writer_.WriteData(plan_, planner_));
      return Status::Ok();
    });
  };
  if (status_.ok() && (planning_alone_ || is_coordinator_)) {
    // The rank that will commit lets its writer start on the commit (encoding the metadata)
    // while the data is written: the writes wait on the disk, and the CPU has room.
    (void)internal::ParallelFor(2, 2, [&](size_t part) -> Status {
      if (part == 0) {
        write();
      } else {
        writer_.PrepareFinish(metadata_);
      }
      return Status::Ok();
    });
  } else {
    write();
  }
  int64_t bytes = 0;
  for (const auto& r : results_) bytes += r.size_in_bytes;
  t.Add("items", std::to_string(results_.size()));
  t.Add("bytes", std::to_string(bytes));
}

Status SaveSteps::DecideCommit(const std::vector<Carried>& parts,
                               std::vector<std::string>* replies) {
  std::vector<std::vector<WriteResult>> all;
  for (size_t r = 0; r < parts.size(); ++r) {
    Status injected = FaultPoint("save.coordinator.decode_results", rank_);
    auto decoded = injected.ok() ? DecodeWriteResults(parts[r].payload)
                                 : Result<std::vector<WriteResult>>(injected);
    if (!decoded.ok()) {
      return decoded.status().WithContext("write results of rank " + std::to_string(r));
    }
    all.push_back(std::move(*decoded));
  }
  DCPP_RETURN_IF_ERROR(CommitResults(all));
  // Only the other ranks read the reply (the coordinator returns metadata_ itself): encoding
  // it for nobody cost as much as writing `.metadata` for a state of many small tensors.
  // (A rank that plans alone never gets here: see Commit.)
  std::string committed = writer_.TakeCommittedMetadata();
  if (committed.empty()) {
    DCPP_ASSIGN_OR_RETURN(committed, EncodeMetadata(metadata_));
  }
  (*replies)[0] = std::move(committed);
  return Status::Ok();
}

Status SaveSteps::CommitResults(const std::vector<std::vector<WriteResult>>& all) {
  DCPP_RETURN_IF_ERROR(FaultPoint("save.writer.finish", rank_));
  DCPP_RETURN_IF_ERROR(writer_.Finish(metadata_, all));
  // A failed clean-up leaves stray files, but the checkpoint is committed and valid.
  if (!writer_.CleanUp().ok()) LogLine(LogLevel::kInfo, "save.cleanup_failed", "");
  return Status::Ok();
}

Result<Metadata> SaveSteps::Commit() {
  PhaseTimer t("save.commit", RankField(comm_));
  if (planning_alone_) {
    Local("save.local.commit", [&] {
      std::vector<std::vector<WriteResult>> all(1);
      all[0] = std::move(results_);
      Status s = CommitResults(all);
      writer_.TakeCommittedMetadata();  // no other rank needs the bytes
      return s;
    });
    status_ = AgreeStep(comm_, "saving", status_);
    writer_.EndSave();
    if (!status_.ok()) return status_.WithContext(context_);
    return std::move(metadata_);  // the steps are done: the caller takes it
  }
  Carried mine{status_, status_.ok() ? EncodeWriteResults(results_) : std::string()};
  Carried outcome = CentralStep(
      comm_, options_.coordinator_rank, "writing", std::move(mine),
      [&](const std::vector<Carried>& parts, Status combined, std::vector<std::string>* replies) {
        return combined.ok() ? DecideCommit(parts, replies) : combined;
      },
      /*same_reply=*/true);
  // The coordinator committed and cleaned up under the lock; every rank knows the outcome.
  writer_.EndSave();
  status_ = outcome.status;
  if (!status_.ok()) return status_.WithContext(context_);
  if (is_coordinator_) return std::move(metadata_);
  auto md = ParseMetadata(outcome.payload);
  if (!md.ok()) return md.status().WithContext(context_);
  return md;
}

// ------------------------------------------------------------------ load

LoadSteps::LoadSteps(StateDict& state_dict, StorageReader& reader, const LoadOptions& options,
                     Communicator& comm)
    : state_dict_(state_dict),
      reader_(reader),
      options_(options),
      comm_(comm),
      rank_(comm.rank()),
      is_coordinator_(comm.rank() == options.coordinator_rank),
      context_("rank " + std::to_string(comm.rank()) + ": loading \"" + reader.checkpoint_id() +
               "\""),
      default_planner_(options.planner_options),
      planner_(options.planner ? *options.planner : default_planner_) {}

void LoadSteps::Local(std::string_view point, const std::function<Status()>& step) {
  RunLocalStep(point, rank_, status_, step);
}

void LoadSteps::Plan() {
  PhaseTimer t("load.plan", RankField(comm_));
  Local("load.reader.read_metadata", [&]() -> Status {
    auto md = reader_.ReadMetadata();
    if (!md.ok() && md.status().code() == StatusCode::kNotFound) {
      // A rank-local checkpoint has only __{rank}.metadata files.
      auto own = reader_.ReadMetadata(rank_);
      if (own.ok()) md = std::move(own);
    }
    DCPP_ASSIGN_OR_RETURN(metadata_, std::move(md));
    return Status::Ok();
  });
  Local("load.planner.set_up",
        [&] { return planner_.SetUp(&state_dict_, metadata_, is_coordinator_); });
  Local("load.reader.set_up", [&] { return reader_.SetUp(metadata_, is_coordinator_, rank_); });
  Local("load.planner.create_local_plan", [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(plan_, planner_.CreateLocalPlan());
    return Status::Ok();
  });
  t.Add("items", std::to_string(plan_.items.size()));
  status_ = AgreeStep(comm_, "planning", status_);
}

void LoadSteps::PlanSharedReads() {
  if (!options_.broadcast_replicated || comm_.size() == 1) return;  // the same on every rank
  // The tensors this rank loads whole, with their destinations.
  std::set<std::string> mine;
  Local("load.planner.resolve_tensor", [&]() -> Status {
    for (const auto& item : plan_.items) {
      if (item.type != LoadItemType::kTensor || mine.count(item.dest_index.fqn)) continue;
      const auto* m = metadata_.state_dict_metadata.Find(item.dest_index.fqn);
      const auto* t = m ? std::get_if<TensorStorageMetadata>(m) : nullptr;
      if (!t) continue;
      DCPP_ASSIGN_OR_RETURN(TensorView v, planner_.ResolveTensor(item));
      if (v.shape() == t->size) {
        mine.insert(item.dest_index.fqn);
        shared_dest_[item.dest_index.fqn] = v;
      }
    }
    return Status::Ok();
  });
  std::string encoded;
  for (const auto& f : mine) {
    encoded += f;
    encoded.push_back('\0');
  }
  auto all = comm_.AllGather(Envelope(status_, status_.ok() ? encoded : ""));
  if (!all.ok()) {
    status_ = all.status();
    return;
  }
  std::vector<Carried> parts = OpenAll(*all);
  status_ = CombineFailures(parts, "planning shared reads");
  if (!status_.ok()) return;
  // Tensors loaded whole by every rank get an owner each, balancing bytes; sorted by fqn, so the
  // list is the same on every rank.
  std::map<std::string, int> count;
  for (const auto& part : parts) {
    const std::string& a = part.payload;
    size_t start = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i] == '\0') {
        ++count[a.substr(start, i - start)];
        start = i + 1;
      }
    }
  }
  std::vector<int64_t> load(comm_.size(), 0);
  for (const auto& [fqn, n] : count) {
    if (n != comm_.size()) continue;
    int owner = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    const auto& t = std::get<TensorStorageMetadata>(*metadata_.state_dict_metadata.Find(fqn));
    load[owner] += NumElements(t.size) * static_cast<int64_t>(ElementSize(t.properties.dtype));
    shared_.emplace_back(fqn, owner);
  }
  for (auto it = shared_dest_.begin(); it != shared_dest_.end();) {
    it = count[it->first] == comm_.size() ? std::next(it) : shared_dest_.erase(it);
  }
  std::map<std::string, int> owner(shared_.begin(), shared_.end());
  auto& items = plan_.items;
  items.erase(std::remove_if(items.begin(), items.end(),
                             [&](const ReadItem& r) {
                               auto it = owner.find(r.dest_index.fqn);
                               return it != owner.end() && it->second != rank_;
                             }),
              items.end());
}

void LoadSteps::Read() {
  {
    PhaseTimer t("load.read", RankField(comm_));
    Local("load.reader.read_data", [&] { return reader_.ReadData(plan_, planner_); });
  }
  status_ = AgreeStep(comm_, "reading", status_);
}

Status LoadSteps::Broadcast() {
  PhaseTimer t("load.broadcast", RankField(comm_));
  // shared_ is empty on every rank unless every step so far succeeded everywhere.
  Status unpacked;  // this rank's failures as a receiver, agreed on below
  for (const auto& entry : shared_) {
    const std::string& fqn = entry.first;  // not a structured binding: lambdas below capture it
    const int owner = entry.second;
    const TensorView& dst = shared_dest_[fqn];
    Carried mine;
    if (owner == rank_) {
      // Pack the tensor into the broadcast buffer (one copy, strided or not).
      mine.payload.resize(dst.nbytes());
      mine.status = FaultPoint("load.broadcast.pack", rank_);
      if (mine.status.ok()) {
        mine.status = CopyTensor(TensorView(mine.payload.data(), dst.dtype(), dst.shape()), dst);
      }
      if (!mine.status.ok()) mine.status = mine.status.WithContext("rank " + std::to_string(rank_));
    }
    Carried got = BroadcastStep(comm_, owner, std::move(mine));
    if (!got.status.ok()) {
      // Every rank received the owner's failure: all stop here together.
      status_ = Status(got.status.code(), "broadcast of \"" + fqn + "\" from rank " +
                                              std::to_string(owner) +
                                              " failed: " + std::string(got.status.message()));
      break;
    }
    if (owner != rank_ && unpacked.ok()) {
      unpacked = [&]() -> Status {
        if (got.payload.size() != dst.nbytes()) {
          return InternalError("broadcast of \"" + fqn + "\" has " +
                               std::to_string(got.payload.size()) + " bytes");
        }
        TensorView src(got.payload.data(), dst.dtype(), dst.shape());
        DCPP_RETURN_IF_ERROR(FaultPoint("load.broadcast.unpack", rank_));
        return CopyTensor(dst, src);
      }();
    }
  }
  if (status_.ok()) status_ = unpacked;
  if (!shared_.empty()) status_ = AgreeStep(comm_, "receiving broadcasts", status_);
  return status_.ok() ? status_ : status_.WithContext(context_);
}

}  // namespace internal

// ------------------------------------------------------------------ entry points

Result<Metadata> Save(const StateDict& state_dict, StorageWriter& writer,
                      const SaveOptions& options) {
  SingleCommunicator single;
  Communicator& comm = options.comm ? *options.comm : single;
  internal::PhaseTimer total(
      "save", "rank=" + std::to_string(comm.rank()) + " path=\"" + writer.checkpoint_id() + "\"");
  internal::SaveSteps steps(state_dict, writer, options, comm);
  steps.Plan();
  steps.Agree();
  steps.Write();
  return steps.Commit();
}

Status Load(StateDict& state_dict, StorageReader& reader, const LoadOptions& options) {
  SingleCommunicator single;
  Communicator& comm = options.comm ? *options.comm : single;
  internal::PhaseTimer total(
      "load", "rank=" + std::to_string(comm.rank()) + " path=\"" + reader.checkpoint_id() + "\"");
  internal::LoadSteps steps(state_dict, reader, options, comm);
  steps.Plan();
  steps.PlanSharedReads();
  steps.Read();
  return steps.Broadcast();
}

Result<Metadata> Save(const StateDict& state_dict, const std::string& path,
                      const SaveOptions& options) {
  auto writer = FileSystemWriter::Open(path, options.writer);
  if (!writer.ok()) {
    // Still take part in the collectives so the other ranks learn of the failure.
    internal::StatusWriter failed(path, writer.status());
    return Save(state_dict, failed, options);
  }
  return Save(state_dict, **writer, options);
}

Status Load(StateDict& state_dict, const std::string& path, const LoadOptions& options) {
  auto reader = FileSystemReader::Open(path, options.reader);
  if (!reader.ok()) {
    internal::StatusReader failed(path, reader.status());
    return Load(state_dict, failed, options);
  }
  return Load(state_dict, **reader, options);
}

// ------------------------------------------------------------------ Stateful objects

namespace {

Result<StateDict> Collect(const AppState& app_state) {
  StateDict sd = Value::MakeDict();
  for (const auto& [name, obj] : app_state) {
    if (!obj) return InvalidArgumentError("app state \"" + name + "\" is null");
    if (sd.Find(name)) return InvalidArgumentError("app state \"" + name + "\" appears twice");
    sd.Set(name, obj->GetStateDict());
  }
  return sd;
}

}  // namespace

Result<Metadata> Save(const AppState& app_state, const std::string& path,
                      const SaveOptions& options) {
  auto sd = Collect(app_state);
  if (!sd.ok()) {
    // Still join the collectives, so the other ranks learn of the failure instead of waiting.
    internal::StatusWriter failed(path, sd.status());
    return Save(Value::MakeDict(), failed, options);
  }
  return Save(*sd, path, options);
}

Status Load(const AppState& app_state, const std::string& path, const LoadOptions& options) {
  auto collected = Collect(app_state);
  if (!collected.ok()) {
    internal::StatusReader failed(path, collected.status());
    StateDict empty = Value::MakeDict();
    return Load(empty, failed, options);
  }
  StateDict& sd = *collected;
  DCPP_RETURN_IF_ERROR(Load(sd, path, options));
  for (const auto& [name, obj] : app_state) {
    DCPP_RETURN_IF_ERROR(
        obj->LoadStateDict(*sd.Find(name)).WithContext("loading \"" + name + "\""));
  }
  return Status::Ok();
}

}  // namespace dcpp
