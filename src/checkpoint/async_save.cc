// AsyncSave (async_save.h): staging on the caller's thread, the save steps on the save thread.
//
// On every rank:
//   1. in-flight policy: wait for (or refuse, with kFail) the previous async save of this process;
//   2. stage (local, caller's thread): copy the tensors into the process's staging arena; the
//      caller is released here (staged is ready) unless a budget left tensors unstaged;
//   3. on the save thread, over the staged copy: SaveSteps Plan -> Agree -> Write (staged is
//      ready after Write when tensors were left unstaged) -> Commit; committed gets the outcome.
// A rank whose staging or writer opening failed still runs the steps, with a writer that fails
// every call, so it takes part in every collective and the others learn why (steps.h).
#include "dcpp/async_save.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "checkpoint/staging.h"
#include "checkpoint/steps.h"
#include "checkpoint/writer_process.h"
#include "core/log.h"
#include "dcpp/comm.h"
#include "dcpp/layout.h"

namespace dcpp {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The one background thread of async saves: tasks run one after another, in submission order,
// so the collectives of successive saves keep one order on every rank.
class SaveThread {
 public:
  SaveThread() {
    std::thread([this] { Loop(); }).detach();
  }
  void Submit(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
    cv_.notify_one();
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
};

// One async save in flight per process.
struct InFlight {
  std::mutex mu;
  std::condition_variable cv;
  bool busy = false;

  void Release() {
    std::lock_guard<std::mutex> lock(mu);
    busy = false;
    cv.notify_all();
  }
};

// What one rank of this process holds: its in-flight slot, its save thread and its arena. A
// process is one rank under MPI; thread-rank groups (tests, benchmarks) hold one per rank so
// their ranks' saves can be in flight together.
struct RankContext {
  InFlight in_flight;
  SaveThread thread;
  internal::Stager stager;
  internal::WriterProcess writer_process;  // kProcess only, started on first use
};

std::mutex& ContextsMutex() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}
std::map<int, RankContext*>& Contexts() {
  static auto* m = new std::map<int, RankContext*>();  // never destroyed: saves may run at exit
  return *m;
}
RankContext& ContextOf(int rank) {
  std::lock_guard<std::mutex> lock(ContextsMutex());
  RankContext*& c = Contexts()[rank];
  if (c == nullptr) c = new RankContext();
  return *c;
}

// kProcess: plans and commits through `inner` on the save thread; the bytes are written by the
// rank's writer process, from the shared-memory arena.
class ProcessWriter final : public StorageWriter {
 public:
  ProcessWriter(std::unique_ptr<StorageWriter> inner, std::string path,
                FileSystemWriterOptions options, RankContext& context)
      : inner_(std::move(inner)), path_(std::move(path)), options_(options), context_(context) {}
  Status SetUp(bool is_coordinator, int rank, bool use_collectives) override {
    rank_ = rank;
    use_collectives_ = use_collectives;
    return inner_->SetUp(is_coordinator, rank, use_collectives);
  }
  Result<SavePlan> PrepareLocalPlan(SavePlan p) override {
    return inner_->PrepareLocalPlan(std::move(p));
  }
  Result<std::vector<SavePlan>> PrepareGlobalPlan(std::vector<SavePlan> p) override {
    return inner_->PrepareGlobalPlan(std::move(p));
  }
  Result<std::vector<WriteResult>> WriteData(const SavePlan& plan, SavePlanner& planner) override {
    return context_.writer_process.WriteData(path_, options_, rank_, use_collectives_, plan,
                                             planner, context_.stager);
  }
  Status Finish(Metadata& m, const std::vector<std::vector<WriteResult>>& r) override {
    return inner_->Finish(m, r);
  }
  Status CleanUp() override { return inner_->CleanUp(); }
  void EndSave() override { inner_->EndSave(); }
  std::string checkpoint_id() const override { return inner_->checkpoint_id(); }

 private:
  std::unique_ptr<StorageWriter> inner_;
  std::string path_;
  FileSystemWriterOptions options_;
  RankContext& context_;
  int rank_ = 0;
  bool use_collectives_ = true;
};

// Opens the writer on the save thread.
using WriterSource =
    std::function<std::unique_ptr<StorageWriter>(StorageWriter** use, RankContext& context)>;

AsyncSaveHandle Start(const StateDict& state_dict, std::string id, WriterSource writer_source,
                      bool to_path, const AsyncSaveOptions& options) {
  const auto t0 = Clock::now();
  auto staged_p = std::make_shared<std::promise<Status>>();
  auto committed_p = std::make_shared<std::promise<Result<Metadata>>>();
  AsyncSaveHandle handle;
  handle.staged = staged_p->get_future().share();
  handle.committed = committed_p->get_future().share();

  // 1. in-flight policy
  const int rank = options.save.comm ? options.save.comm->rank() : 0;
  RankContext& context = ContextOf(rank);
  InFlight& in_flight = context.in_flight;
  {
    std::unique_lock<std::mutex> lock(in_flight.mu);
    if (in_flight.busy && options.in_flight == InFlightPolicy::kFail) {
      Status s = FailedPreconditionError("async save of \"" + id +
                                         "\": another async save of this process is in flight");
      staged_p->set_value(s);
      committed_p->set_value(s);
      handle.stats.blocking_seconds = Seconds(t0, Clock::now());
      return handle;
    }
    in_flight.cv.wait(lock, [&] { return !in_flight.busy; });
    in_flight.busy = true;
  }
  const auto t1 = Clock::now();
  handle.stats.waiting_seconds = Seconds(t0, t1);

  // 2. stage
  Status failed;
  StateDict staged;
  bool staged_now = true;
  if (options.executor == AsyncExecutor::kProcess && !to_path) {
    // Every rank has the same options, so every rank fails alike in the steps below.
    failed = UnimplementedError("async save of \"" + id +
                                "\": the process executor writes to a path, not a caller's writer");
  } else {
    StagingOptions staging = options.staging;
    // The writer process reads the staged bytes from the arena itself.
    if (options.executor == AsyncExecutor::kProcess) staging.use_shared_memory = true;
    auto r = context.stager.Stage(state_dict, staging);
    if (r.ok()) {
      staged = std::move(r->staged);
      handle.stats.staged_bytes = r->staged_bytes;
      handle.stats.unstaged_bytes = r->unstaged_bytes;
      handle.stats.arena_allocations = r->allocations;
      handle.stats.page_faults = r->page_faults;
      staged_now = r->unstaged_bytes == 0;
    } else {
      failed = r.status();  // the save steps name the rank and the checkpoint
      staged = Value::MakeDict();
    }
  }
  if (staged_now) staged_p->set_value(failed);
  handle.stats.blocking_seconds = Seconds(t0, Clock::now());

  // 3. the steps, on the save thread
  context.thread.Submit([&context, staged = std::move(staged), id = std::move(id),
                         writer_source = std::move(writer_source), options, failed, staged_now,
                         staged_p, committed_p]() mutable {
    Result<Metadata> outcome = InternalError("async save of \"" + id + "\" did not finish");
    bool staged_sent = staged_now;
    try {
      StorageWriter* writer = nullptr;
      std::unique_ptr<StorageWriter> owned;
      std::unique_ptr<StorageWriter> failing;
      if (failed.ok()) owned = writer_source(&writer, context);
      if (!failed.ok() || writer == nullptr) {
        failing = std::make_unique<internal::StatusWriter>(
            id, failed.ok() ? InternalError("async save: no writer") : failed);
        writer = failing.get();
      }
      SingleCommunicator single;
      Communicator& comm = options.save.comm ? *options.save.comm : single;
      internal::PhaseTimer total("async_save", "rank=" + std::to_string(comm.rank()) + " path=\"" +
                                                   writer->checkpoint_id() + "\"");
      internal::SaveSteps steps(staged, *writer, options.save, comm);
      steps.Plan();
      steps.Agree();
      steps.Write();
      if (!staged_sent) {
        // The unstaged tensors are written: the caller may change them now.
        staged_p->set_value(Status::Ok());
        staged_sent = true;
      }
      outcome = steps.Commit();
    } catch (const std::exception& e) {
      outcome = InternalError("async save of \"" + id + "\": " + e.what());
    }
    // The slot is free before committed is visible, so a caller that waited on committed may
    // start the next save at once, even under kFail.
    context.in_flight.Release();
    if (!staged_sent) staged_p->set_value(outcome.status());
    committed_p->set_value(std::move(outcome));
  });
  return handle;
}

// A background save shares the machine with the training it runs beside: unless asked, its
// files keep to their writer threads (no write-behind helper per file).
FileSystemWriterOptions AsyncWriterOptions(FileSystemWriterOptions options) {
  if (options.write_parallelism == 0) options.write_parallelism = 1;
  return options;
}

}  // namespace

AsyncSaveHandle AsyncSave(const StateDict& state_dict, const std::string& path,
                          const AsyncSaveOptions& options) {
  return Start(
      state_dict, path,
      [path, writer_options = AsyncWriterOptions(options.save.writer),
       process = options.executor == AsyncExecutor::kProcess](StorageWriter** use,
                                                              RankContext& context) {
        std::unique_ptr<StorageWriter> out;
        auto w = FileSystemWriter::Open(path, writer_options);
        if (!w.ok()) {
          out = std::make_unique<internal::StatusWriter>(path, w.status());
        } else if (process) {
          out = std::make_unique<ProcessWriter>(std::move(*w), path, writer_options, context);
        } else {
          out = std::move(*w);
        }
        *use = out.get();
        return out;
      },
      /*to_path=*/true, options);
}

AsyncSaveHandle AsyncSave(const StateDict& state_dict, StorageWriter& writer,
                          const AsyncSaveOptions& options) {
  return Start(
      state_dict, writer.checkpoint_id(),
      [&writer](StorageWriter** use, RankContext&) {
        *use = &writer;
        return std::unique_ptr<StorageWriter>();
      },
      /*to_path=*/false, options);
}

void WaitForAsyncSaves() {
  std::vector<RankContext*> all;
  {
    std::lock_guard<std::mutex> lock(ContextsMutex());
    for (auto& [rank, c] : Contexts()) all.push_back(c);
  }
  for (RankContext* c : all) {
    std::unique_lock<std::mutex> lock(c->in_flight.mu);
    c->in_flight.cv.wait(lock, [&] { return !c->in_flight.busy; });
  }
}

int64_t StagingArenaAllocations() { return internal::Stager::TotalAllocations(); }
int64_t StagingArenaBytes() { return internal::Stager::BytesHeld(); }

}  // namespace dcpp

namespace dcpp {
int WriterProcessPid(int rank) {
  std::lock_guard<std::mutex> lock(ContextsMutex());
  auto it = Contexts().find(rank);
  return it == Contexts().end() ? -1 : it->second->writer_process.pid();
}

void StopWriterProcesses() {
  WaitForAsyncSaves();
  std::lock_guard<std::mutex> lock(ContextsMutex());
  for (auto& [rank, c] : Contexts()) c->writer_process.Stop();
}
}  // namespace dcpp
