// DCP checkpoints on S3 exchanged with PyTorch 2.x's fsspec path (FsspecWriter/FsspecReader over
// s3fs, tests/s3/fsspec_peer.py), both ways, on one moto server the test starts; dcpp reshards.
// The CLI takes s3:// URLs: inspect, convert to a torch.save object that torch.load reads back
// through s3fs, convert back, diff.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/s3_store.h"
#include "testing/s3_server.h"
#include "testing/testing.h"

using ::testing::HasSubstr;

namespace dcpp {
namespace {

using ::dcpp::testing::S3TestServer;
using ::dcpp::testing::SourceDir;
using ::dcpp::testing::UniqueBucket;

S3TestServer& Server() { return ::dcpp::testing::SharedS3TestServer(); }

int RunPeer(const std::string& cmd, const std::string& url) {
  const std::string line = "timeout 240 " + ::dcpp::testing::Torch2PythonPath() + " " +
                           SourceDir() + "/tests/s3/fsspec_peer.py " + cmd + " " +
                           Server().endpoint() + " " + url + " 2>&1";
  return std::system(line.c_str());
}

// fp16 bits of a normal number exactly representable in fp16 (the peer's values are k / 4).
uint16_t Half(double v) {
  if (v == 0) return 0;
  int e = static_cast<int>(std::floor(std::log2(v)));
  auto mantissa = static_cast<uint16_t>(std::lround((v / std::ldexp(1.0, e) - 1) * 1024));
  return static_cast<uint16_t>(((e + 15) << 10) | mantissa);
}

// The values of fsspec_peer.py's expected().
struct Expected {
  Tensor w = Tensor::Zeros(DType::kFloat32, {64, 48});
  Tensor ids = Tensor::Zeros(DType::kInt64, {30, 7});
  Tensor bias = Tensor::Zeros(DType::kFloat64, {48});
  Tensor half = Tensor::Zeros(DType::kFloat16, {16, 8});
  Expected() {
    for (int i = 0; i < 64 * 48; ++i) w.data_as<float>()[i] = static_cast<float>(i * 0.5 - 7);
    for (int i = 0; i < 30 * 7; ++i) ids.data_as<int64_t>()[i] = i * 3 + 100;
    for (int i = 0; i < 48; ++i) bias.data_as<double>()[i] = i * 0.25 + 1;
    for (int i = 0; i < 16 * 8; ++i) half.data_as<uint16_t>()[i] = Half((i % 50) * 0.25);
  }
};

// Rows [lo, hi) of `full` for this rank, on dimension `dim`.
ShardedTensor Piece(const Tensor& full, int dim, int rank, int world, bool fill) {
  const int64_t n = full.shape()[dim];
  Shape off(full.dim(), 0), size = full.shape();
  off[dim] = n * rank / world;
  size[dim] = n * (rank + 1) / world - off[dim];
  Tensor t = Tensor::Zeros(full.dtype(), size);
  if (fill) {
    EXPECT_TRUE(CopyRegion(t.view(), Shape(full.dim(), 0), full.view(), off, size).ok());
  }
  return ShardedTensor{full.dtype(), full.shape(), {{off, t}}};
}

Value State(const Expected& e, int rank, int world, bool fill) {
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromSharded(Piece(e.w, 0, rank, world, fill)));
  sd.Set("ids", Value::FromSharded(Piece(e.ids, 1, rank, world, fill)));
  sd.Set("bias", Value::FromTensor(fill ? e.bias.Clone() : Tensor::Zeros(DType::kFloat64, {48})));
  sd.Set("half", Value::FromSharded(Piece(e.half, 0, rank, world, fill)));
  sd.Set("step", Value::Int(fill ? 1234 : 0));
  return sd;
}

void ExpectPieces(const Tensor& full, const ShardedTensor& st) {
  for (const auto& s : st.shards) {
    Tensor want = Tensor::Zeros(full.dtype(), s.tensor.shape());
    ASSERT_TRUE(
        CopyRegion(want.view(), Shape(full.dim(), 0), full.view(), s.offsets, s.tensor.shape())
            .ok());
    EXPECT_TRUE(want.BitwiseEqual(s.tensor)) << s.box().ToString();
  }
}

void UseServer() {
  S3Options o = Server().Options();
  RegisterStoreScheme("s3", S3StoreFactory(o));
}

TEST(FsspecInteropTest, PyTorchFsspecWriterSavesDcppLoadsWithTwoRanksResharded) {
  if (!S3StoreAvailable()) GTEST_SKIP() << "built without the S3 store";
  UseServer();
  const std::string url = "s3://" + UniqueBucket() + "/torch/step_5";
  // s3fs needs the bucket; dcpp's store creates it.
  DCPP_ASSERT_OK(OpenStore(url, {.create = true}).status());
  ASSERT_EQ(RunPeer("save", url), 0);
  Expected e;
  std::mutex mu;
  RunOnThreads(2, [&](Communicator& comm) {
    Value sd = State(e, comm.rank(), 2, false);
    LoadOptions lo;
    lo.comm = &comm;
    Status s = Load(sd, url, lo);
    std::lock_guard<std::mutex> lock(mu);
    DCPP_ASSERT_OK(s);
    ExpectPieces(e.w, sd.Find("w")->sharded());
    ExpectPieces(e.ids, sd.Find("ids")->sharded());
    ExpectPieces(e.half, sd.Find("half")->sharded());
    EXPECT_TRUE(sd.Find("bias")->tensor().BitwiseEqual(e.bias));
    EXPECT_EQ(sd.Find("step")->as_int(), 1234);
  });
}

TEST(FsspecInteropTest, DcppSavesWithThreeRanksPyTorchFsspecReaderLoads) {
  if (!S3StoreAvailable()) GTEST_SKIP() << "built without the S3 store";
  UseServer();
  const std::string url = "s3://" + UniqueBucket() + "/dcpp/step_7";
  Expected e;
  std::vector<Status> statuses(3);
  RunOnThreads(3, [&](Communicator& comm) {
    SaveOptions so;
    so.comm = &comm;
    statuses[comm.rank()] = Save(State(e, comm.rank(), 3, true), url, so).status();
  });
  for (const Status& s : statuses) DCPP_ASSERT_OK(s);
  EXPECT_EQ(RunPeer("load", url), 0);
}

// Runs a shell command (bounded by `timeout`), returning its exit code and output.
int Shell(const std::string& cmd, std::string* out) {
  FILE* p = ::popen(("timeout 240 " + cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
  int rc = ::pclose(p);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

TEST(S3CliTest, InspectConvertAndDiffTakeS3Urls) {
  if (!S3StoreAvailable()) GTEST_SKIP() << "built without the S3 store";
  UseServer();
  // The CLI finds the server the way a user's would: through the environment.
  ::setenv("AWS_ENDPOINT_URL_S3", Server().endpoint().c_str(), 1);
  ::setenv("AWS_ACCESS_KEY_ID", "testing", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
  const std::string bucket = UniqueBucket();
  const std::string ck = "s3://" + bucket + "/ck", pt = "s3://" + bucket + "/out/model.pt",
                    back = "s3://" + bucket + "/back";
  Expected e;
  std::vector<Status> statuses(2);
  RunOnThreads(2, [&](Communicator& comm) {
    SaveOptions so;
    so.comm = &comm;
    statuses[comm.rank()] = Save(State(e, comm.rank(), 2, true), ck, so).status();
  });
  for (const Status& s : statuses) DCPP_ASSERT_OK(s);
  const std::string cli = ::dcpp::testing::CliPath();
  std::string out;
  ASSERT_EQ(Shell(cli + " inspect " + ck, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("half"));
  out.clear();
  ASSERT_EQ(Shell(cli + " convert " + ck + " " + pt + " --to torch", &out), 0) << out;
  EXPECT_EQ(RunPeer("torchload", pt), 0);
  out.clear();
  ASSERT_EQ(Shell(cli + " inspect " + pt, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("ids"));
  out.clear();
  ASSERT_EQ(Shell(cli + " convert " + pt + " " + back + " --to dcp", &out), 0) << out;
  out.clear();
  EXPECT_EQ(Shell(cli + " diff " + ck + " " + back, &out), 0) << out;
  out.clear();
  EXPECT_EQ(Shell(cli + " inspect s3://" + bucket + "/missing", &out), 1) << out;
  EXPECT_THAT(out, HasSubstr("missing"));
}

}  // namespace
}  // namespace dcpp
