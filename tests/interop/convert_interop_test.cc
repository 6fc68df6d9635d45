// torch.save (written by PyTorch) -> dcpp convert --to dcp -> dcpp convert --to torch ->
// torch.load gives back the same values; dcpp diff agrees along the way.
#include <cstdlib>
#include <fstream>
#include <iterator>

#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::SourceDir;
using ::dcpp::testing::TempDir;

int Shell(const std::string& cmd) { return WEXITSTATUS(std::system((cmd + " 2>&1").c_str())); }

std::string Cli() { return ::dcpp::testing::CliPath(); }

std::string Peer() {
  const char* p = std::getenv("DCPP_PYTHON");
  return std::string(p ? p : "/usr/bin/python3") + " " + SourceDir() +
         "/tests/interop/convert_peer.py";
}

TEST(ConvertInteropTest, TorchToDcpToTorchRoundTripsThroughPyTorch) {
  TempDir dir;
  const std::string pt = dir.Join("model.pt"), dcp = dir.Join("model_dcp"),
                    back = dir.Join("back.pt");
  ASSERT_EQ(Shell(Peer() + " write " + pt), 0);
  ASSERT_EQ(Shell(Cli() + " convert " + pt + " " + dcp + " --to dcp"), 0);
  ASSERT_EQ(Shell(Cli() + " inspect " + dcp + " > /dev/null"), 0);
  ASSERT_EQ(Shell(Cli() + " convert " + dcp + " " + back + " --to torch"), 0);
  EXPECT_EQ(Shell(Peer() + " check " + back), 0);
  EXPECT_EQ(Shell(Cli() + " diff " + pt + " " + dcp), 0);
  EXPECT_EQ(Shell(Cli() + " diff " + dcp + " " + back), 0);
  // The check itself fails on a different file.
  ASSERT_EQ(Shell(Cli() + " convert " + dcp + " " + dir.Join("x") + " --to dcp"), 1);
}

TEST(ConvertInteropTest, DiffReportsWhereCheckpointsDiffer) {
  TempDir dir;
  const std::string a = dir.Join("a.pt"), b = dir.Join("b.pt");
  ASSERT_EQ(Shell(Peer() + " write " + a), 0);
  ASSERT_EQ(Shell(::dcpp::testing::PythonPath() + " -c \"import torch; sd = torch.load('" + a +
                  "'); "
                  "sd['model']['embed.weight'][3, 2] += 1e-3; sd['epoch'] = 5; torch.save(sd, '" +
                  b + "')\""),
            0);
  EXPECT_EQ(Shell(Cli() + " diff " + a + " " + b + " > " + dir.Join("out.txt")), 1);
  std::ifstream in(dir.Join("out.txt"));
  std::string out((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_THAT(out, ::testing::HasSubstr("\"model.embed.weight\": 1 of 77 values differ"));
  EXPECT_THAT(out, ::testing::HasSubstr("first at flat index 23"));
  EXPECT_THAT(out, ::testing::HasSubstr("\"epoch\": 4 vs 5"));
  EXPECT_EQ(Shell(Cli() + " diff " + a + " " + b + " --atol 0.01 > /dev/null"),
            1);  // epoch still differs
}

}  // namespace
}  // namespace dcpp
