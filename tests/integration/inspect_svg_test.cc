// `dcpp inspect --svg`: the shard map of a checkpoint saved by 4 ranks, checked as SVG text and
// as pixels: headless Chromium renders it to a PNG, which must show the files' colours.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::Not;

int Shell(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

int Count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// 4 ranks: "emb" float32[64, 32] row-sharded, "proj" float32[32, 48] column-sharded,
// "bias" float32[48] replicated, "step" an int.
void SaveCheckpoint(const std::string& dir) {
  RunOnThreads(4, [&](Communicator& comm) {
    const int r = comm.rank();
    Value sd = Value::MakeDict();
    sd.Set("emb", Value::FromSharded({DType::kFloat32,
                                      {64, 32},
                                      {{{16 * r, 0}, Tensor::Zeros(DType::kFloat32, {16, 32})}}}));
    sd.Set("proj", Value::FromSharded({DType::kFloat32,
                                       {32, 48},
                                       {{{0, 12 * r}, Tensor::Zeros(DType::kFloat32, {32, 12})}}}));
    sd.Set("bias", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {48})));
    sd.Set("step", Value::Int(3));
    SaveOptions options;
    options.comm = &comm;
    Status s = Save(sd, dir, options).status();
    EXPECT_TRUE(s.ok()) << s.ToString();
  });
}

TEST(InspectSvgTest, DrawsChunksByFileAndReaderBoxes) {
  TempDir dir;
  SaveCheckpoint(dir.Join("ckpt"));
  const std::string cli = ::dcpp::testing::CliPath();
  const std::string svg = dir.Join("map.svg");
  ASSERT_EQ(Shell(cli + " inspect " + dir.Join("ckpt") + " --svg " + svg + " > /dev/null"), 0);
  std::string text = ReadAll(svg);
  EXPECT_THAT(text, HasSubstr("<svg"));
  EXPECT_EQ(Count(text, "class='chunk'"), 4 + 4 + 1);  // emb, proj, bias
  for (int r = 0; r < 4; ++r) {
    EXPECT_THAT(text, HasSubstr("__" + std::to_string(r) + "_0.distcp")) << r;
  }
  EXPECT_THAT(text, HasSubstr("float32[64, 32]"));
  EXPECT_THAT(text, HasSubstr("written by 4 ranks"));
  EXPECT_THAT(text, HasSubstr("rank 2 (__2_0.distcp)"));
  EXPECT_THAT(text, Not(HasSubstr("class='want'")));

  // --match keeps one tensor; --against (or --ranks/--dim) overlays 3 readers along dim 1.
  ASSERT_EQ(Shell(cli + " inspect " + dir.Join("ckpt") + " --svg " + svg +
                  " --match 'em*' --ranks 3 --dim 1 > /dev/null"),
            0);
  text = ReadAll(svg);
  EXPECT_EQ(Count(text, "class='chunk'"), 4);
  EXPECT_EQ(Count(text, "class='want'"), 3);
  // Reader 0 wants columns [0, 10) of all 64 rows: a piece of each of the 4 row chunks.
  EXPECT_THAT(text, HasSubstr("reader 0 wants offsets [0, 0] sizes [64, 10]: 4 reads, 2.5 KiB "
                              "from rank 0 640 B, rank 1 640 B, rank 2 640 B, rank 3 640 B"));
  EXPECT_THAT(text, HasSubstr("not matching"));

  EXPECT_EQ(Shell(cli + " inspect " + dir.Join("ckpt") + " --svg " + svg +
                  " --against ranks=zero 2> /dev/null"),
            2);
}

// Headless Chromium renders the picture; the screenshot must not be blank: enough non-white
// pixels, and the colours of the 4 writing ranks.
TEST(InspectSvgTest, RendersInHeadlessChromium) {
  const char* chromium = "/usr/bin/chromium";
  if (!std::filesystem::exists(chromium)) GTEST_SKIP() << "chromium is not installed";
  TempDir dir;
  SaveCheckpoint(dir.Join("ckpt"));
  const std::string svg = dir.Join("map.svg"), png = dir.Join("map.png");
  ASSERT_EQ(Shell(::dcpp::testing::CliPath() + " inspect " + dir.Join("ckpt") + " --svg " + svg +
                  " --ranks 3 --dim 1 > /dev/null"),
            0);
  const std::string render = "timeout 120 " + std::string(chromium) +
                             " --headless --no-sandbox --disable-gpu --hide-scrollbars"
                             " --user-data-dir=" +
                             dir.Join("profile") + " --window-size=960,900 --screenshot=" + png +
                             " file://" + svg + " > " + dir.Join("chromium.log") + " 2>&1";
  ASSERT_EQ(Shell(render), 0) << ReadAll(dir.Join("chromium.log"));
  ASSERT_TRUE(std::filesystem::exists(png)) << ReadAll(dir.Join("chromium.log"));
  if (const char* keep = std::getenv("DCPP_KEEP_SCREENSHOT")) {
    std::filesystem::copy_file(png, keep, std::filesystem::copy_options::overwrite_existing);
  }
  // Pixels are counted with PIL + numpy from the venv.
  const std::string check =
      "import sys, numpy as np; from PIL import Image\n"
      "a = np.asarray(Image.open(sys.argv[1]).convert('RGB')).astype(int)\n"
      "nonwhite = (a.sum(axis=2) < 720).mean()\n"
      "palette = [(0x4e,0x79,0xa7),(0xf2,0x8e,0x2b),(0x59,0xa1,0x4f),(0xe1,0x57,0x59)]\n"
      "seen = [int((np.abs(a - np.array(c)).sum(axis=2) < 12).sum()) for c in palette]\n"
      "print('non-white fraction', round(nonwhite, 3), 'pixels of the file colours', seen)\n"
      "sys.exit(0 if nonwhite > 0.05 and min(seen) > 500 else 1)\n";
  std::ofstream(dir.Join("check.py")) << check;
  EXPECT_EQ(Shell("timeout 60 " + ::dcpp::testing::Torch2PythonPath() + " " + dir.Join("check.py") +
                  " " + png),
            0);
}

}  // namespace
}  // namespace dcpp
