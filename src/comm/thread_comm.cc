// Thread groups: N ranks of one process, each used by its own thread.
//
// Every collective is one round of a rendezvous guarded by the group's mutex:
//   1. arrive: the rank publishes pointers to its inputs (no copy) in the round's slot and waits,
//      up to the timeout, until all ranks have arrived. The last to arrive checks that all ranks
//      called the same collective with the same root and that the root's arguments are valid,
//      and records the verdict in the round;
//   2. copy: outside the lock, each rank copies what it needs from the other ranks' slots;
//   3. depart: each rank waits until every rank has copied, because the slots point into the
//      callers' buffers, which must stay alive until then. The last to leave retires the round.
// A rank that times out in step 1 withdraws its slot and breaks the group: ranks waiting in the
// same round, and every later collective, fail with the same Aborted status. Step 3 needs no
// timeout: every rank in it has arrived and is only copying.
#include <algorithm>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dcpp/comm.h"

namespace dcpp {
namespace {

enum class Kind { kBarrier, kBroadcast, kGather, kAllGather, kScatter, kSubGroup };

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kBarrier:
      return "Barrier";
    case Kind::kBroadcast:
      return "Broadcast";
    case Kind::kGather:
      return "Gather";
    case Kind::kAllGather:
      return "AllGather";
    case Kind::kScatter:
      return "Scatter";
    case Kind::kSubGroup:
      return "SubGroup";
  }
  return "?";
}

bool HasRoot(Kind kind) {
  return kind == Kind::kBroadcast || kind == Kind::kGather || kind == Kind::kScatter;
}

// What one rank brings to a round.
struct Slot {
  Kind kind = Kind::kBarrier;
  int root = -1;
  const std::string* data = nullptr;                // Broadcast (root), Gather, AllGather
  const std::vector<std::string>* parts = nullptr;  // Scatter (root)
  const std::vector<int>* ranks = nullptr;          // SubGroup
};

struct Group;

struct Round {
  explicit Round(int size) : slots(size), present(size, false) {}
  std::vector<Slot> slots;
  std::vector<bool> present;
  int arrived = 0;
  int departed = 0;
  bool complete = false;
  Status verdict;                                       // set by the last to arrive
  std::vector<std::unique_ptr<Communicator>> products;  // SubGroup: one per rank (or null)
};

class ThreadCommunicator;

struct Group {
  Group(int n, ThreadCommOptions o) : size(n), options(o) {}

  // Runs one round for `rank`; `copy` runs in step 2 when the verdict is OK.
  template <typename Copy>
  Status Exchange(int rank, const Slot& slot, Copy&& copy);

  void Break(Status why) {
    std::lock_guard<std::mutex> lock(mu);
    if (broken.ok()) broken = std::move(why);
    cv.notify_all();
  }

  const int size;
  const ThreadCommOptions options;
  std::mutex mu;
  std::condition_variable cv;
  std::shared_ptr<Round> current;  // the round being assembled, if any
  uint64_t rounds_done = 0;        // for error messages: "collective #n"
  Status broken;

 private:
  void Judge(Round& round);
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<Group> group, int rank)
      : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size; }

  Status Barrier() override {
    return group_->Exchange(rank_, Slot{Kind::kBarrier}, [](const Round&) {});
  }

  Status Broadcast(std::string& buf, int root) override {
    Slot slot{Kind::kBroadcast, root, &buf};
    return group_->Exchange(rank_, slot, [&](const Round& round) {
      if (rank_ != root) buf = *round.slots[root].data;
    });
  }

  Result<std::vector<std::string>> Gather(const std::string& mine, int root) override {
    std::vector<std::string> out;
    Slot slot{Kind::kGather, root, &mine};
    DCPP_RETURN_IF_ERROR(group_->Exchange(rank_, slot, [&](const Round& round) {
      if (rank_ != root) return;
      out.reserve(round.slots.size());
      for (const Slot& s : round.slots) out.push_back(*s.data);
    }));
    return out;
  }

  Result<std::vector<std::string>> AllGather(const std::string& mine) override {
    std::vector<std::string> out;
    Slot slot{Kind::kAllGather, -1, &mine};
    DCPP_RETURN_IF_ERROR(group_->Exchange(rank_, slot, [&](const Round& round) {
      out.reserve(round.slots.size());
      for (const Slot& s : round.slots) out.push_back(*s.data);
    }));
    return out;
  }

  Result<std::string> Scatter(const std::vector<std::string>& parts, int root) override {
    std::string out;
    Slot slot{Kind::kScatter, root, nullptr, &parts};
    DCPP_RETURN_IF_ERROR(group_->Exchange(
        rank_, slot, [&](const Round& round) { out = (*round.slots[root].parts)[rank_]; }));
    return out;
  }

  Group& group() { return *group_; }

 protected:
  Result<std::unique_ptr<Communicator>> CreateSubGroup(const std::vector<int>& ranks) override {
    std::unique_ptr<Communicator> mine;
    Slot slot{Kind::kSubGroup, -1, nullptr, nullptr, &ranks};
    DCPP_RETURN_IF_ERROR(group_->Exchange(rank_, slot, [&](Round& round) {
      // Each rank takes only its own element, so no lock is needed.
      mine = std::move(round.products[rank_]);
    }));
    return mine;
  }

 private:
  std::shared_ptr<Group> group_;
  int rank_;
};

void Group::Judge(Round& round) {
  const Slot& first = round.slots[0];
  for (int r = 1; r < size; ++r) {
    const Slot& s = round.slots[r];
    if (s.kind != first.kind || (HasRoot(first.kind) && s.root != first.root)) {
      auto describe = [](const Slot& x) {
        std::string d = KindName(x.kind);
        if (HasRoot(x.kind)) d += "(root " + std::to_string(x.root) + ")";
        return d;
      };
      round.verdict = InvalidArgumentError(
          "collective #" + std::to_string(rounds_done) + " mismatched: rank 0 called " +
          describe(first) + ", rank " + std::to_string(r) + " called " + describe(s));
      return;
    }
  }
  if (HasRoot(first.kind) && (first.root < 0 || first.root >= size)) {
    round.verdict = InvalidArgumentError(std::string(KindName(first.kind)) + ": root " +
                                         std::to_string(first.root) +
                                         " is not a rank of a group of " + std::to_string(size));
    return;
  }
  if (first.kind == Kind::kScatter) {
    const size_t n = round.slots[first.root].parts->size();
    if (n != static_cast<size_t>(size)) {
      round.verdict =
          InvalidArgumentError("Scatter: root " + std::to_string(first.root) + " passed " +
                               std::to_string(n) + " parts for a group of " + std::to_string(size));
    }
  }
  if (first.kind == Kind::kSubGroup) {
    // SubGroup has already agreed on a valid list; build the new group once, for everyone.
    const std::vector<int>& ranks = *first.ranks;
    auto sub = std::make_shared<Group>(static_cast<int>(ranks.size()), options);
    round.products.resize(size);
    for (size_t i = 0; i < ranks.size(); ++i) {
      round.products[ranks[i]] = std::make_unique<ThreadCommunicator>(sub, static_cast<int>(i));
    }
  }
}

template <typename Copy>
Status Group::Exchange(int rank, const Slot& slot, Copy&& copy) {
  std::unique_lock<std::mutex> lock(mu);
  if (!broken.ok()) return broken;
  if (!current) current = std::make_shared<Round>(size);
  std::shared_ptr<Round> round = current;
  round->slots[rank] = slot;
  round->present[rank] = true;
  if (++round->arrived == size) {
    Judge(*round);
    round->complete = true;
    cv.notify_all();
  } else {
    const auto deadline = std::chrono::steady_clock::now() + options.timeout;
    cv.wait_until(lock, deadline, [&] { return round->complete || !broken.ok(); });
    if (!round->complete) {
      round->present[rank] = false;
      --round->arrived;
      if (broken.ok()) {
        std::string missing;
        for (int r = 0; r < size; ++r) {
          if (!round->present[r] && r != rank)
            missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        }
        broken = AbortedError("collective #" + std::to_string(rounds_done) + " (" +
                              KindName(slot.kind) + "): rank " + std::to_string(rank) +
                              " timed out after " + std::to_string(options.timeout.count()) +
                              " ms waiting for rank(s) " + missing);
        cv.notify_all();
      }
      return broken;
    }
  }
  const Status verdict = round->verdict;
  lock.unlock();
  if (verdict.ok()) copy(*round);
  lock.lock();
  if (++round->departed == size) {
    current.reset();
    ++rounds_done;
    cv.notify_all();
  } else {
    cv.wait(lock, [&] { return round->departed == size; });
  }
  return verdict;
}

}  // namespace

Result<std::vector<std::unique_ptr<Communicator>>> MakeThreadCommunicators(
    int size, ThreadCommOptions options) {
  if (size < 1) {
    return InvalidArgumentError("a thread group needs at least one rank, not " +
                                std::to_string(size));
  }
  auto group = std::make_shared<Group>(size, options);
  std::vector<std::unique_ptr<Communicator>> comms;
  comms.reserve(size);
  for (int r = 0; r < size; ++r) comms.push_back(std::make_unique<ThreadCommunicator>(group, r));
  return comms;
}

void RunOnThreads(int size, const std::function<void(Communicator&)>& fn,
                  ThreadCommOptions options) {
  std::vector<std::unique_ptr<Communicator>> comms = MakeThreadCommunicators(size, options).value();
  std::mutex mu;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
  threads.reserve(size);
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(*comms[r]);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (!first_error) first_error = std::current_exception();
        }
        static_cast<ThreadCommunicator&>(*comms[r]).group().Break(
            AbortedError("rank " + std::to_string(r) + " threw an exception"));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace dcpp
