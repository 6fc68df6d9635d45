// The collective save and load protocols.
//
// Save, on every rank (C = coordinator):
//   1. local step: writer.SetUp, planner.SetUp, CreateLocalPlan, writer.PrepareLocalPlan;
//   2. Gather(status + local plan) to C; C builds the global plan and metadata (or the error of
//      the ranks that failed) and Scatters each rank its plan (or that error);
//   3. every rank writes its items (FinishPlan, WriteData);
//   4. Gather(status + write results) to C; C commits `.metadata` only if all succeeded, then
//      Broadcasts the outcome (status + metadata) so every rank returns the same thing.
// Load: ReadMetadata, SetUp, CreateLocalPlan, then an all-gather of statuses; ReadData, then an
// all-gather of statuses. Every message carries a Status, so a rank that failed keeps taking
// part in the collectives and no rank waits forever on it.
#include "dcpp/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <sstream>

#include "core/log.h"
#include "core/wire.h"
#include "dcpp/comm.h"

namespace dcpp {

namespace {

using internal::PhaseTimer;

// A status travelling with a payload.
std::string Envelope(const Status& s, std::string_view payload) {
  internal::WireWriter w;
  w.Status(s);
  w.Raw(payload);
  return w.Release();
}

struct Opened {
  Status status;
  std::string_view payload;
};

Opened OpenEnvelope(std::string_view b) {
  internal::WireReader r(b, "collective message");
  Status carried;
  Status decoded = r.ReadStatus(&carried);
  if (!decoded.ok()) return {decoded, {}};
  return {carried, r.Rest()};
}

// One error for every rank: the failed ranks, each with its cause. The code is the first failed
// rank's, so the caller still learns what kind of failure it was.
Status CombineFailures(const std::vector<Opened>& parts, std::string_view phase) {
  std::vector<size_t> failed;
  for (size_t r = 0; r < parts.size(); ++r) {
    if (!parts[r].status.ok()) failed.push_back(r);
  }
  if (failed.empty()) return Status::Ok();
  if (failed.size() == 1 && parts.size() == 1) return parts[0].status;
  std::ostringstream msg;
  msg << phase << " failed on rank" << (failed.size() > 1 ? "s " : " ");
  for (size_t i = 0; i < failed.size(); ++i) msg << (i ? ", " : "") << failed[i];
  for (size_t r : failed) msg << "; rank " << r << ": " << parts[r].status.message();
  return Status(parts[failed[0]].status.code(), msg.str());
}

std::string RankField(const Communicator& comm) { return "rank=" + std::to_string(comm.rank()); }

}  // namespace

// ------------------------------------------------------------------ save

Result<Metadata> Save(const StateDict& state_dict, StorageWriter& writer,
                      const SaveOptions& options) {
  SingleCommunicator single;
  Communicator& comm = options.comm ? *options.comm : single;
  const int rank = comm.rank();
  const int coord = options.coordinator_rank;
  if (coord < 0 || coord >= comm.size()) {
    return InvalidArgumentError("coordinator rank " + std::to_string(coord) +
                                " is not in a group of " + std::to_string(comm.size()));
  }
  const bool is_coord = rank == coord;
  const std::string ctx =
      "rank " + std::to_string(rank) + ": saving \"" + writer.checkpoint_id() + "\"";
  DefaultSavePlanner default_planner(
      SavePlannerOptions{.require_full_coverage = options.use_collectives});
  SavePlanner& planner = options.planner ? *options.planner : default_planner;
  PhaseTimer total("save", RankField(comm) + " path=\"" + writer.checkpoint_id() + "\"");

  // 1. Local step.
  SavePlan local_plan;
  Status local = [&]() -> Status {
    PhaseTimer t("save.local_plan", RankField(comm));
    DCPP_RETURN_IF_ERROR(writer.SetUp(is_coord, rank, options.use_collectives));
    DCPP_RETURN_IF_ERROR(planner.SetUp(state_dict, is_coord));
    DCPP_ASSIGN_OR_RETURN(local_plan, planner.CreateLocalPlan());
    DCPP_ASSIGN_OR_RETURN(local_plan, writer.PrepareLocalPlan(std::move(local_plan)));
    return Status::Ok();
  }();

  if (!options.use_collectives) {
    // Rank-local mode: plan, write and commit alone, then meet at a barrier.
    Status s = local;
    Metadata md;
    if (s.ok()) {
      auto global = planner.CreateGlobalPlan({local_plan});
      s = global.status();
      if (s.ok()) {
        md = std::move(global->second);
        auto plans = writer.PrepareGlobalPlan(std::move(global->first));
        s = plans.status();
        if (s.ok()) {
          auto final_plan = planner.FinishPlan(std::move((*plans)[0]));
          s = final_plan.status();
          if (s.ok()) {
            auto results = writer.WriteData(*final_plan, planner);
            s = results.status();
            if (s.ok()) s = writer.Finish(md, {*results});
          }
        }
      }
    }
    Status b = comm.Barrier();
    if (!s.ok()) return s.WithContext(ctx);
    if (!b.ok()) return b.WithContext(ctx);
    return md;
  }

  // 2. Global step.
  std::string my_part;
  Metadata metadata;
  {
    PhaseTimer t("save.global_plan", RankField(comm));
    DCPP_ASSIGN_OR_RETURN(
        std::vector<std::string> gathered,
        comm.Gather(Envelope(local, local.ok() ? EncodeSavePlan(local_plan) : ""), coord));
    std::vector<std::string> parts;
    if (is_coord) {
      std::vector<Opened> opened;
      for (const auto& g : gathered) opened.push_back(OpenEnvelope(g));
      Status global = CombineFailures(opened, "planning");
      std::vector<SavePlan> plans;
      if (global.ok()) {
        for (size_t r = 0; r < opened.size() && global.ok(); ++r) {
          auto p = DecodeSavePlan(opened[r].payload);
          if (p.ok()) {
            plans.push_back(std::move(*p));
          } else {
            global = p.status().WithContext("plan of rank " + std::to_string(r));
          }
        }
      }
      if (global.ok()) {
        auto g = planner.CreateGlobalPlan(std::move(plans));
        if (g.ok()) {
          metadata = std::move(g->second);
          auto prepared = writer.PrepareGlobalPlan(std::move(g->first));
          if (prepared.ok()) {
            plans = std::move(*prepared);
          } else {
            global = prepared.status();
          }
        } else {
          global = g.status();
        }
      }
      for (int r = 0; r < comm.size(); ++r) {
        parts.push_back(global.ok() ? Envelope(global, EncodeSavePlan(plans[r]))
                                    : Envelope(global, ""));
      }
    }
    DCPP_ASSIGN_OR_RETURN(my_part, comm.Scatter(parts, coord));
  }
  Opened central = OpenEnvelope(my_part);
  if (!central.status.ok()) return central.status.WithContext(ctx);

  // 3. Write.
  std::vector<WriteResult> results;
  Status wrote = [&]() -> Status {
    PhaseTimer t("save.write", RankField(comm));
    DCPP_ASSIGN_OR_RETURN(SavePlan plan, DecodeSavePlan(central.payload));
    DCPP_ASSIGN_OR_RETURN(plan, planner.FinishPlan(std::move(plan)));
    DCPP_ASSIGN_OR_RETURN(results, writer.WriteData(plan, planner));
    int64_t bytes = 0;
    for (const auto& r : results) bytes += r.size_in_bytes;
    t.Add("items", std::to_string(results.size()));
    t.Add("bytes", std::to_string(bytes));
    return Status::Ok();
  }();

  // 4. Commit.
  std::string outcome;
  {
    PhaseTimer t("save.commit", RankField(comm));
    DCPP_ASSIGN_OR_RETURN(
        std::vector<std::string> gathered,
        comm.Gather(Envelope(wrote, wrote.ok() ? EncodeWriteResults(results) : ""), coord));
    if (is_coord) {
      std::vector<Opened> opened;
      for (const auto& g : gathered) opened.push_back(OpenEnvelope(g));
      Status commit = CombineFailures(opened, "writing");
      std::vector<std::vector<WriteResult>> all;
      for (size_t r = 0; r < opened.size() && commit.ok(); ++r) {
        auto decoded = DecodeWriteResults(opened[r].payload);
        if (decoded.ok()) {
          all.push_back(std::move(*decoded));
        } else {
          commit = decoded.status().WithContext("write results of rank " + std::to_string(r));
        }
      }
      std::string encoded;
      if (commit.ok()) commit = writer.Finish(metadata, all);
      if (commit.ok()) {
        // A failed clean-up leaves stray files but the checkpoint is committed and valid.
        Status c = writer.CleanUp();
        if (!c.ok()) internal::LogLine(internal::LogLevel::kInfo, "save.cleanup_failed", "");
        auto e = EncodeMetadata(metadata);
        if (e.ok()) {
          encoded = std::move(*e);
        } else {
          commit = e.status();
        }
      }
      outcome = Envelope(commit, encoded);
    }
    DCPP_RETURN_IF_ERROR(comm.Broadcast(outcome, coord).WithContext(ctx));
  }
  Opened done = OpenEnvelope(outcome);
  if (!done.status.ok()) return done.status.WithContext(ctx);
  if (is_coord) return metadata;
  auto md = ParseMetadata(done.payload);
  if (!md.ok()) return md.status().WithContext(ctx);
  return md;
}

namespace {

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

}  // namespace

Result<Metadata> Save(const StateDict& state_dict, const std::string& path,
                      const SaveOptions& options) {
  auto writer = FileSystemWriter::Open(path, options.writer);
  if (!writer.ok()) {
    // Still take part in the collectives so the other ranks learn of the failure.
    StatusWriter failed(path, writer.status());
    return Save(state_dict, failed, options);
  }
  return Save(state_dict, **writer, options);
}

// ------------------------------------------------------------------ load

namespace {

// All-gathers statuses; returns the combined failure (the same on every rank).
Status AgreeOnStatus(Communicator& comm, const Status& mine, std::string_view phase) {
  auto all = comm.AllGather(Envelope(mine, ""));
  if (!all.ok()) return all.status();
  std::vector<Opened> opened;
  for (const auto& a : *all) opened.push_back(OpenEnvelope(a));
  return CombineFailures(opened, phase);
}

// All-gathers which tensors each rank loads whole; those loaded whole by every rank are assigned
// an owner (balancing bytes) that alone reads them. Returns (fqn, owner) sorted by fqn.
Result<std::vector<std::pair<std::string, int>>> PlanReplicatedReads(
    Communicator& comm, const Metadata& metadata, const LoadPlan& plan, LoadPlanner& planner,
    std::map<std::string, TensorView>& dest) {
  std::set<std::string> mine;
  for (const auto& item : plan.items) {
    if (item.type != LoadItemType::kTensor || mine.count(item.dest_index.fqn)) continue;
    const auto* m = metadata.state_dict_metadata.Find(item.dest_index.fqn);
    const auto* t = m ? std::get_if<TensorStorageMetadata>(m) : nullptr;
    if (!t) continue;
    DCPP_ASSIGN_OR_RETURN(TensorView v, planner.ResolveTensor(item));
    if (v.shape() == t->size) {
      mine.insert(item.dest_index.fqn);
      dest[item.dest_index.fqn] = v;
    }
  }
  std::string encoded;
  for (const auto& f : mine) {
    encoded += f;
    encoded.push_back('\0');
  }
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> all, comm.AllGather(encoded));
  std::map<std::string, int> count;
  for (const auto& a : all) {
    size_t start = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i] == '\0') {
        ++count[a.substr(start, i - start)];
        start = i + 1;
      }
    }
  }
  std::vector<int64_t> load(comm.size(), 0);
  std::vector<std::pair<std::string, int>> out;
  for (const auto& [fqn, n] : count) {
    if (n != comm.size()) continue;
    int owner = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    const auto& t = std::get<TensorStorageMetadata>(*metadata.state_dict_metadata.Find(fqn));
    load[owner] += NumElements(t.size) * static_cast<int64_t>(ElementSize(t.properties.dtype));
    out.emplace_back(fqn, owner);
  }
  for (auto it = dest.begin(); it != dest.end();) {
    it = count[it->first] == comm.size() ? std::next(it) : dest.erase(it);
  }
  return out;
}

}  // namespace

Status Load(StateDict& state_dict, StorageReader& reader, const LoadOptions& options) {
  SingleCommunicator single;
  Communicator& comm = options.comm ? *options.comm : single;
  const int rank = comm.rank();
  const bool is_coord = rank == options.coordinator_rank;
  const std::string ctx =
      "rank " + std::to_string(rank) + ": loading \"" + reader.checkpoint_id() + "\"";
  DefaultLoadPlanner default_planner(options.planner_options);
  LoadPlanner& planner = options.planner ? *options.planner : default_planner;
  PhaseTimer total("load", RankField(comm) + " path=\"" + reader.checkpoint_id() + "\"");

  Metadata metadata;
  LoadPlan plan;
  Status local = [&]() -> Status {
    PhaseTimer t("load.plan", RankField(comm));
    auto md = reader.ReadMetadata();
    if (!md.ok() && md.status().code() == StatusCode::kNotFound) {
      // A rank-local checkpoint has only __{rank}.metadata files.
      auto own = reader.ReadMetadata(rank);
      if (own.ok()) md = std::move(own);
    }
    DCPP_ASSIGN_OR_RETURN(metadata, std::move(md));
    DCPP_RETURN_IF_ERROR(planner.SetUp(&state_dict, metadata, is_coord));
    DCPP_RETURN_IF_ERROR(reader.SetUp(metadata, is_coord, rank));
    DCPP_ASSIGN_OR_RETURN(plan, planner.CreateLocalPlan());
    t.Add("items", std::to_string(plan.items.size()));
    return Status::Ok();
  }();
  DCPP_RETURN_IF_ERROR(AgreeOnStatus(comm, local, "planning").WithContext(ctx));

  // Read-once-then-broadcast: tensors every rank loads whole are read by one owner each.
  std::vector<std::pair<std::string, int>> shared;  // fqn, owner (same order on every rank)
  std::map<std::string, TensorView> shared_dest;
  if (options.broadcast_replicated && comm.size() > 1) {
    DCPP_ASSIGN_OR_RETURN(shared, PlanReplicatedReads(comm, metadata, plan, planner, shared_dest));
    std::map<std::string, int> owner(shared.begin(), shared.end());
    auto& items = plan.items;
    items.erase(std::remove_if(items.begin(), items.end(),
                               [&](const ReadItem& r) {
                                 auto it = owner.find(r.dest_index.fqn);
                                 return it != owner.end() && it->second != rank;
                               }),
                items.end());
  }

  Status read = [&]() -> Status {
    PhaseTimer t("load.read", RankField(comm));
    return reader.ReadData(plan, planner);
  }();
  DCPP_RETURN_IF_ERROR(AgreeOnStatus(comm, read, "reading").WithContext(ctx));

  if (!shared.empty()) {
    PhaseTimer t("load.broadcast", RankField(comm));
    for (const auto& [fqn, owner] : shared) {
      const TensorView& dst = shared_dest[fqn];
      std::string buf;
      if (owner == rank) {
        // Pack the tensor into the broadcast buffer (one copy, strided or not).
        buf.resize(dst.nbytes());
        DCPP_RETURN_IF_ERROR(CopyTensor(TensorView(buf.data(), dst.dtype(), dst.shape()), dst));
      }
      DCPP_RETURN_IF_ERROR(comm.Broadcast(buf, owner).WithContext(ctx));
      if (owner != rank) {
        if (buf.size() != dst.nbytes()) {
          return InternalError(ctx + ": broadcast of \"" + fqn + "\" has " +
                               std::to_string(buf.size()) + " bytes");
        }
        TensorView src(buf.data(), dst.dtype(), dst.shape());
        DCPP_RETURN_IF_ERROR(CopyTensor(dst, src));
      }
    }
  }
  return Status::Ok();
}

Status Load(StateDict& state_dict, const std::string& path, const LoadOptions& options) {
  auto reader = FileSystemReader::Open(path, options.reader);
  if (!reader.ok()) {
    StatusReader failed(path, reader.status());
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
    StatusWriter failed(path, sd.status());
    return Save(Value::MakeDict(), failed, options);
  }
  return Save(*sd, path, options);
}

Status Load(const AppState& app_state, const std::string& path, const LoadOptions& options) {
  auto collected = Collect(app_state);
  if (!collected.ok()) {
    StatusReader failed(path, collected.status());
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
