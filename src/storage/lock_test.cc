// The local store's lock (flock) and WriteAtomic's temporaries, across processes: a lock dies
// with its holder, and a temporary whose writer is gone is removed by the next write of its key.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include "dcpp/storage.h"
#include "testing/testing.h"

namespace dcpp::testing {
namespace {

using ::testing::HasSubstr;

// Runs `child` in a forked process that then waits to be killed; returns its pid once `child`
// has run (it signals through a pipe).
pid_t ForkHolding(const std::function<void()>& child) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    child();
    char c = 1;
    (void)!::write(fds[1], &c, 1);
    for (;;) ::pause();
  }
  ::close(fds[1]);
  char c = 0;
  (void)!::read(fds[0], &c, 1);
  ::close(fds[0]);
  return pid;
}

void KillAndReap(pid_t pid) {
  ::kill(pid, SIGKILL);
  int st = 0;
  ::waitpid(pid, &st, 0);
}

TEST(LocalStoreLockTest, AKilledHolderReleasesTheLockAndTheMessageNamesIt) {
  TempDir dir;
  auto store = OpenLocalStore(dir.Join("ck"), true).value();
  std::unique_ptr<StoreLock> child_lock;
  pid_t pid = ForkHolding([&] {
    auto l = store->TryLock(".dcpp.lock", LockMode::kExclusive);
    if (l.ok()) child_lock = std::move(*l);
  });
  ASSERT_GT(pid, 0);
  EXPECT_THAT(
      store->TryLock(".dcpp.lock", LockMode::kExclusive),
      StatusIs(StatusCode::kUnavailable, HasSubstr("pid " + std::to_string(pid) + " on host")));
  EXPECT_THAT(store->TryLock(".dcpp.lock", LockMode::kShared),
              StatusIs(StatusCode::kUnavailable, HasSubstr(dir.Join("ck/.dcpp.lock"))));
  KillAndReap(pid);  // kill -9: the kernel drops the flock with the process
  DCPP_ASSERT_OK_AND_ASSIGN(auto mine, store->TryLock(".dcpp.lock", LockMode::kExclusive));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string holder, store->ReadAll(".dcpp.lock"));
  EXPECT_EQ(holder.substr(0, holder.find(' ', 4)), "pid " + std::to_string(::getpid()));
}

TEST(LocalStoreLockTest, TwoOpensInOneProcessConflict) {
  TempDir dir;
  auto a = OpenLocalStore(dir.Join("ck"), true).value();
  auto b = OpenLocalStore(dir.Join("ck"), false).value();
  DCPP_ASSERT_OK_AND_ASSIGN(auto held, a->TryLock(".dcpp.lock", LockMode::kExclusive));
  EXPECT_THAT(b->TryLock(".dcpp.lock", LockMode::kExclusive),
              StatusIs(StatusCode::kUnavailable, HasSubstr("cannot run at once")));
  held.reset();
  DCPP_EXPECT_OK(b->TryLock(".dcpp.lock", LockMode::kExclusive).status());
}

TEST(TemporaryNameTest, RoundTripsAndRejectsOtherNames) {
  const std::string t = TemporaryName("model.pt");
  TemporaryNameParts p;
  ASSERT_TRUE(ParseTemporaryName(t, &p)) << t;
  EXPECT_EQ(p.key, "model.pt");
  EXPECT_EQ(p.pid, ::getpid());
  EXPECT_NE(TemporaryName("model.pt"), t);  // unique per call
  ASSERT_TRUE(ParseTemporaryName(".metadata.tmp.h-1.12.0", &p));
  EXPECT_EQ(p.key, ".metadata");
  EXPECT_EQ(p.host, "h-1");
  EXPECT_EQ(p.pid, 12);
  for (const char* other : {"model.pt", "model.pt.tmp", ".tmp.h.1.2", "a.tmp.h.x.2", "a.tmp..1.2",
                            "a.tmp.h.1.", "notes.tmp.txt"}) {
    EXPECT_FALSE(ParseTemporaryName(other, &p)) << other;
  }
}

TEST(WriteAtomicTest, TemporariesOfDeadWritersAreRemovedByTheNextWriteOfTheKey) {
  TempDir dir;
  auto store = OpenLocalStore(dir.Join("out"), true).value();
  // A writer killed mid-write leaves its temporary (the child writes one and is killed).
  std::string dead_tmp;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ForkHolding([&] {
    std::string name = TemporaryName("model.pt");
    (void)store->WriteAll(name, "partial", false);
    (void)!::write(fds[1], name.data(), name.size());
  });
  ::close(fds[1]);
  char buf[512];
  ssize_t n = ::read(fds[0], buf, sizeof(buf));
  ::close(fds[0]);
  ASSERT_GT(n, 0);
  dead_tmp.assign(buf, static_cast<size_t>(n));
  // A temporary of a live writer (this process) and of another host, and a user's file.
  const std::string live_tmp = TemporaryName("model.pt");
  DCPP_ASSERT_OK(store->WriteAll(live_tmp, "in flight", false));
  DCPP_ASSERT_OK(store->WriteAll("model.pt.tmp.otherhost.1.0", "x", false));
  DCPP_ASSERT_OK(store->WriteAll("model.pt.tmp.notes", "user", false));
  // While the writer lives its temporary stays.
  DCPP_ASSERT_OK(store->WriteAtomic("model.pt", "v1"));
  EXPECT_TRUE(store->Exists(dead_tmp).value());
  KillAndReap(pid);
  DCPP_ASSERT_OK(store->WriteAtomic("other.pt", "o"));  // another key: not its business
  EXPECT_TRUE(store->Exists(dead_tmp).value());
  DCPP_ASSERT_OK(store->WriteAtomic("model.pt", "v2"));
  EXPECT_FALSE(store->Exists(dead_tmp).value());
  EXPECT_TRUE(store->Exists(live_tmp).value());
  EXPECT_TRUE(store->Exists("model.pt.tmp.otherhost.1.0").value());
  EXPECT_TRUE(store->Exists("model.pt.tmp.notes").value());
  EXPECT_EQ(store->ReadAll("model.pt").value(), "v2");
}

}  // namespace
}  // namespace dcpp::testing
