// `dcpp gc PATH [--dry-run]`: lists, then removes, what a failed save left; refuses a directory
// that is not a checkpoint and one whose lock another process holds (exit 1, message on stderr).
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "dcpp/checkpoint.h"
#include "dcpp/storage.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

namespace fs = std::filesystem;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

// Runs `args` through the CLI; returns the exit code, stdout and stderr in `out`/`err`.
int Gc(const TempDir& tmp, const std::string& args, std::string* out, std::string* err) {
  const std::string o = tmp.Join("out.txt"), e = tmp.Join("err.txt");
  int rc = std::system((::dcpp::testing::CliPath() + " gc " + args + " >" + o + " 2>" + e).c_str());
  auto read = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  *out = read(o);
  *err = read(e);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

TEST(GcCliTest, DryRunListsThenGcRemovesOnlyLeftovers) {
  TempDir tmp;
  const std::string dir = tmp.Join("ck");
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(::dcpp::testing::PatternTensor(DType::kFloat32, {16, 16}, 1)));
  DCPP_ASSERT_OK(Save(sd, dir).status());
  for (const char* f : {"__1_0.distcp", ".metadata.tmp", "notes.txt"}) {
    DCPP_ASSERT_OK(::dcpp::testing::WriteFileBytes(dir + "/" + f, "x"));
  }
  std::string out, err;
  ASSERT_EQ(Gc(tmp, dir + " --dry-run", &out, &err), 0) << err;
  EXPECT_EQ(out, "would remove .metadata.tmp\nwould remove __1_0.distcp\nwould remove 2 files\n");
  EXPECT_TRUE(fs::exists(dir + "/__1_0.distcp"));
  ASSERT_EQ(Gc(tmp, dir, &out, &err), 0) << err;
  EXPECT_EQ(out, "removed .metadata.tmp\nremoved __1_0.distcp\nremoved 2 files\n");
  EXPECT_FALSE(fs::exists(dir + "/__1_0.distcp"));
  EXPECT_TRUE(fs::exists(dir + "/notes.txt"));
  EXPECT_TRUE(fs::exists(dir + "/.metadata"));
  ASSERT_EQ(Gc(tmp, dir, &out, &err), 0) << err;
  EXPECT_EQ(out, "removed 0 files\n");
  // Refused while the lock is held, and for a directory that is not a checkpoint.
  {
    auto store = OpenStore(dir).value();
    auto held = store->TryLock(".dcpp.lock", LockMode::kExclusive);
    DCPP_ASSERT_OK(held.status());
    EXPECT_EQ(Gc(tmp, dir, &out, &err), 1);
    EXPECT_THAT(err, HasSubstr("is locked by another save or clean-up (pid "));
  }
  const std::string mine = tmp.Join("mine");
  fs::create_directories(mine);
  DCPP_ASSERT_OK(::dcpp::testing::WriteFileBytes(mine + "/__0_0.distcp", "mine"));
  EXPECT_EQ(Gc(tmp, mine, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("is not a checkpoint"));
  EXPECT_TRUE(fs::exists(mine + "/__0_0.distcp"));
}

}  // namespace
}  // namespace dcpp
