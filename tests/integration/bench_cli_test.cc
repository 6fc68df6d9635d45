// `dcpp bench --quick --json`: the orchestrator runs every case in its own process and prints
// one JSON array of rows; the PyTorch peer script produces figures for each operation. Only the
// shape of the output is checked here: speed is the benchmark's business, not a test's.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <vector>

#include "testing/testing.h"

namespace dcpp {
namespace {

std::string Capture(const std::string& cmd) {
  std::string out;
  FILE* p = popen(("timeout -k 5 240 " + cmd).c_str(), "r");
  if (!p) return out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  EXPECT_EQ(pclose(p), 0) << cmd;
  return out;
}

TEST(BenchCliTest, QuickJsonPrintsOneRowPerCase) {
  testing::TempDir tmp;
  const std::string out =
      Capture(testing::CliPath() + " bench --quick --json --dir " + tmp.Join("scratch"));
  auto rows = nlohmann::json::parse(out, nullptr, false);
  ASSERT_TRUE(rows.is_array()) << out;
  std::set<std::string> cases;
  for (const auto& r : rows) {
    ASSERT_TRUE(r.contains("case") && r.contains("figures") && r.contains("target") &&
                r.contains("pass"))
        << r.dump();
    cases.insert(r["case"].get<std::string>());
  }
  for (const char* c : {"save/large/t1", "save/large/t4", "load/large/t4", "save/small/t4",
                        "load/small/t1", "load/reshard/t4 (4 -> 3 ranks)", "limits/memcpy",
                        "planning/16x100", "commit-metadata/16x100", "bench/total"}) {
    EXPECT_TRUE(cases.count(c)) << c << " missing in " << out;
  }
  for (const auto& r : rows) {
    const auto& f = r["figures"];
    if (r["case"].get<std::string>().rfind("save/large", 0) == 0) {
      EXPECT_GT(f.value("dcpp_first_GBps", 0.0), 0) << r.dump();
      EXPECT_GT(f.value("fio_write_GBps", 0.0), 0) << r.dump();
    }
    if (r["case"] == "planning/16x100") {
      EXPECT_TRUE(r["pass"].get<bool>()) << r.dump();  // a plan cache hit, not a speed
    }
    if (r["case"] == "commit-metadata/16x100") {
      EXPECT_GT(f.value("metadata_MiB", 0.0), 0) << r.dump();
    }
    if (r["case"] == "bench/total") {
      EXPECT_GT(f.value("total_s", 0.0), 0) << r.dump();
      EXPECT_GT(f.value("planning_s", 0.0), 0) << r.dump();
    }
    if (r["case"] == "load/reshard/t4 (4 -> 3 ranks)") {
      EXPECT_GT(f.value("bytes_read_per_needed", 0.0), 0.99) << r.dump();
    }
  }
}

TEST(BenchCliTest, TorchPeerMeasuresEveryOperation) {
  testing::TempDir tmp;
  // One process runs the list in order (as the orchestrator does), one JSON line each.
  const std::string out = Capture(testing::Torch2PythonPath() + " " + testing::SourceDir() +
                                  "/bench/torch_peer.py --kind small --bytes 1048576 --ops "
                                  "dcp_save:2,dcp_load:2,torch_save,torch_load --dir " +
                                  tmp.path().string());
  std::vector<std::string> ops;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    auto v = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(v.is_object()) << line;
    ops.push_back(v.value("op", ""));
    EXPECT_GT(v.value("seconds", 0.0), 0) << line;
    // The state fills the budget without exceeding it: 1 MiB less the last partial tensor.
    EXPECT_GT(v.value("bytes", 0), 1000000) << line;
    EXPECT_LE(v.value("bytes", 0), 1 << 20) << line;
  }
  EXPECT_THAT(ops, ::testing::ElementsAre("dcp_save", "dcp_load", "torch_save", "torch_load"));
}

}  // namespace
}  // namespace dcpp
