// The S3 store against a real S3-compatible server (moto, started by the test on loopback): the
// store conformance suite directly, behind a proxy that injects 500s, and at a bucket's root;
// errors (403, 404, a dead endpoint); multipart uploads and parallel ranged reads; and the
// checkpoint protocol over S3: multi-rank saves, resharded loads, and faults mid-save (500s, the
// endpoint dying) that must leave the last good checkpoint loadable.
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <random>
#include <thread>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/s3_store.h"
#include "dcpp/storage.h"
#include "dcpp/verify.h"
#include "testing/s3_server.h"
#include "testing/store_conformance.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::S3FaultProxy;
using ::dcpp::testing::S3TestServer;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::UniqueBucket;
using ::testing::HasSubstr;

#define DCPP_REQUIRE_S3()                                                  \
  do {                                                                     \
    if (!S3StoreAvailable()) GTEST_SKIP() << "built without the S3 store"; \
  } while (0)

using ::dcpp::testing::S3ServerKind;

S3TestServer& Server(S3ServerKind kind = S3ServerKind::kMoto) {
  return ::dcpp::testing::SharedS3TestServer(kind);
}

std::shared_ptr<Store> OpenOrDie(const std::string& url, const S3Options& options) {
  auto store = OpenS3Store(url, options, {.create = true});
  EXPECT_THAT(store.status(), ::dcpp::testing::IsOk());
  return store.ok() ? std::shared_ptr<Store>(*std::move(store)) : nullptr;
}

// ------------------------------------------------------------------ conformance

using ::dcpp::testing::RunStoreConformance;
using ::dcpp::testing::StoreBackend;
using ::dcpp::testing::StoreConformanceChecks;
using ::dcpp::testing::StoreConformanceTest;
using ::dcpp::testing::StoreConformanceTestName;

TEST_P(StoreConformanceTest, Check) {
  DCPP_REQUIRE_S3();
  RunStoreConformance(GetParam());
}

StoreBackend PrefixBackend() {
  return {"S3",
          [] { return OpenOrDie("s3://" + UniqueBucket() + "/ckpt/run", Server().Options()); }};
}

StoreBackend BucketRootBackend() {
  return {"S3BucketRoot", [] { return OpenOrDie("s3://" + UniqueBucket(), Server().Options()); }};
}

// A second server implementation (gofakes3 behind rclone): its answers differ from moto's where
// S3 leaves room (200 with a Content-Range for ranged GETs, other XML root names).
StoreBackend RcloneBackend() {
  return {"S3Rclone", [] {
            return OpenOrDie("s3://" + UniqueBucket() + "/ckpt/run",
                             Server(S3ServerKind::kRclone).Options());
          }};
}

// A third of the requests answer 500 the first time: retries must hide it completely.
StoreBackend FlakyBackend() {
  return {"S3Flaky500", []() -> std::shared_ptr<Store> {
            auto proxy = S3FaultProxy::Start(Server().port(),
                                             {"--fail-status", "500", "--fail-once-every", "3"});
            if (!proxy.ok()) {
              ADD_FAILURE() << proxy.status();
              return nullptr;
            }
            S3Options o = Server().Options();
            o.endpoint = (*proxy)->endpoint();
            std::shared_ptr<Store> store = OpenOrDie("s3://" + UniqueBucket() + "/p", o);
            if (store == nullptr) return nullptr;
            // The proxy lives as long as the store.
            struct Holder {
              std::shared_ptr<Store> store;
              std::unique_ptr<S3FaultProxy> proxy;
            };
            auto h = std::make_shared<Holder>(Holder{store, *std::move(proxy)});
            return std::shared_ptr<Store>(h, h->store.get());
          }};
}

INSTANTIATE_TEST_SUITE_P(S3, StoreConformanceTest,
                         ::testing::Combine(::testing::Values(PrefixBackend(), BucketRootBackend(),
                                                              FlakyBackend(), RcloneBackend()),
                                            ::testing::ValuesIn(StoreConformanceChecks())),
                         StoreConformanceTestName);

// ------------------------------------------------------------------ the store itself

std::string Bytes(size_t n, uint64_t seed) {
  std::string out(n, '\0');
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = rng();
    std::memcpy(out.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return out;
}

TEST(S3StoreTest, OpenStoreTakesEndpointAndCredentialsFromTheEnvironment) {
  DCPP_REQUIRE_S3();
  ::setenv("AWS_ENDPOINT_URL_S3", Server().endpoint().c_str(), 1);
  ::setenv("AWS_ACCESS_KEY_ID", "testing", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
  ::setenv("AWS_SESSION_TOKEN", "token", 1);
  ::setenv("AWS_REGION", "us-east-1", 1);
  S3Options env = S3OptionsFromEnv();
  EXPECT_EQ(env.endpoint, Server().endpoint());
  EXPECT_EQ(env.access_key_id, "testing");
  EXPECT_EQ(env.session_token, "token");
  EXPECT_EQ(env.region, "us-east-1");

  const std::string bucket = UniqueBucket();
  // Without create, a missing bucket is NotFound naming it.
  EXPECT_THAT(OpenStore("s3://" + bucket + "/x").status(),
              StatusIs(StatusCode::kNotFound, HasSubstr(bucket)));
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenStore("s3://" + bucket + "/x/", {.create = true}));
  DCPP_ASSERT_OK(store->WriteAll("model.pt", "bytes"));
  EXPECT_EQ(store->Describe("model.pt"), "s3://" + bucket + "/x/model.pt");
  DCPP_ASSERT_OK_AND_ASSIGN(StoreFile file, OpenStoreFile("s3://" + bucket + "/x/model.pt"));
  EXPECT_EQ(file.key, "model.pt");
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, file.store->ReadAll(file.key));
  EXPECT_EQ(back, "bytes");
  // AWS_ENDPOINT_URL is the fallback.
  ::unsetenv("AWS_ENDPOINT_URL_S3");
  ::setenv("AWS_ENDPOINT_URL", Server().endpoint().c_str(), 1);
  DCPP_ASSERT_OK_AND_ASSIGN(store, OpenStore("s3://" + bucket + "/x"));
  DCPP_ASSERT_OK_AND_ASSIGN(back, store->ReadAll("model.pt"));
  EXPECT_EQ(back, "bytes");
  ::unsetenv("AWS_ENDPOINT_URL");
  ::unsetenv("AWS_SESSION_TOKEN");
}

TEST(S3StoreTest, BadUrlsAreInvalidArgument) {
  DCPP_REQUIRE_S3();
  S3Options o = Server().Options();
  EXPECT_THAT(OpenS3Store("s3://", o).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("bucket")));
  EXPECT_THAT(OpenS3Store("s3://Upper/x", o).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("bucket")));
  EXPECT_THAT(OpenS3Store("s3://bucket/../x", o).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("invalid store key")));
  EXPECT_THAT(OpenS3Store("gs://bucket/x", o).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not an s3://")));
}

TEST(S3StoreTest, MultipartUploadAndParallelRangedReads) {
  DCPP_REQUIRE_S3();
  for (S3ServerKind kind : {S3ServerKind::kMoto, S3ServerKind::kRclone}) {
    SCOPED_TRACE(kind == S3ServerKind::kMoto ? "moto" : "rclone");
    S3Options o = Server(kind).Options();  // 5 MiB parts, 1 MiB read pieces
    auto store = OpenOrDie("s3://" + UniqueBucket() + "/mp", o);
    ASSERT_NE(store, nullptr);
    const std::string data = Bytes((23 << 20) + 12345, 7);
    DCPP_ASSERT_OK_AND_ASSIGN(auto file, store->OpenWrite("__0_0.distcp"));
    // Uneven appends, some larger than a part.
    size_t off = 0;
    for (size_t step :
         {size_t{100}, size_t{7} << 20, size_t{3}, size_t{11} << 20, size_t{1} << 19}) {
      DCPP_ASSERT_OK(file->Append(data.data() + off, step));
      off += step;
    }
    DCPP_ASSERT_OK(file->Append(data.data() + off, data.size() - off));
    DCPP_ASSERT_OK_AND_ASSIGN(bool exists, store->Exists("__0_0.distcp"));
    EXPECT_FALSE(exists) << "an object appears only at Close";
    DCPP_ASSERT_OK(file->Close());
    DCPP_ASSERT_OK_AND_ASSIGN(uint64_t size, store->Size("__0_0.distcp"));
    EXPECT_EQ(size, data.size());
    DCPP_ASSERT_OK_AND_ASSIGN(auto reader, store->OpenRead("__0_0.distcp"));
    EXPECT_EQ(reader->size(), data.size());
    std::string back(data.size(), '\0');
    DCPP_ASSERT_OK(reader->ReadAt(0, back.data(), back.size()));  // 23 pieces in parallel
    EXPECT_TRUE(back == data);
    std::string mid(3 << 20, '\0');
    DCPP_ASSERT_OK(reader->ReadAt(9876543, mid.data(), mid.size()));
    EXPECT_TRUE(mid == data.substr(9876543, mid.size()));
    // A small read past the first bytes goes through the block cache.
    std::string small(1000, '\0');
    DCPP_ASSERT_OK(reader->ReadAt(5 << 20, small.data(), small.size()));
    EXPECT_TRUE(small == data.substr(5 << 20, small.size()));
  }
}

TEST(S3StoreTest, UnclosedWriterLeavesNoObject) {
  DCPP_REQUIRE_S3();
  auto store = OpenOrDie("s3://" + UniqueBucket() + "/p", Server().Options());
  ASSERT_NE(store, nullptr);
  {
    DCPP_ASSERT_OK_AND_ASSIGN(auto file, store->OpenWrite("big"));
    const std::string data = Bytes(12 << 20, 1);  // two parts uploaded: a multipart upload
    DCPP_ASSERT_OK(file->Append(data.data(), data.size()));
    DCPP_ASSERT_OK(file->Sync());
  }
  DCPP_ASSERT_OK_AND_ASSIGN(bool exists, store->Exists("big"));
  EXPECT_FALSE(exists);
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store->List());
  EXPECT_TRUE(keys.empty());
}

TEST(S3StoreTest, AReplacedObjectFailsAnOpenReaderInsteadOfMixingVersions) {
  DCPP_REQUIRE_S3();
  S3Options o = Server().Options();
  o.open_prefetch = 1024;
  auto store = OpenOrDie("s3://" + UniqueBucket() + "/p", o);
  ASSERT_NE(store, nullptr);
  DCPP_ASSERT_OK(store->WriteAll("f", Bytes(100000, 1)));
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, store->OpenRead("f"));
  DCPP_ASSERT_OK(store->WriteAtomic("f", Bytes(100000, 2)));
  std::string buf(10, '\0');
  DCPP_EXPECT_OK(reader->ReadAt(0, buf.data(), 10));  // within the bytes fetched at open
  EXPECT_THAT(reader->ReadAt(50000, buf.data(), 10),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("changed")));
}

TEST(S3StoreTest, ForbiddenIsFailedPreconditionNamingTheObject) {
  DCPP_REQUIRE_S3();
  const std::string bucket = UniqueBucket();
  ASSERT_NE(OpenOrDie("s3://" + bucket, Server().Options()), nullptr);
  auto proxy = S3FaultProxy::Start(
      Server().port(), {"--fail-status", "403", "--fail-method", "GET", "--fail-first", "-1"});
  DCPP_ASSERT_OK(proxy.status());
  S3Options o = Server().Options();
  o.endpoint = (*proxy)->endpoint();
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenS3Store("s3://" + bucket + "/ck", o));
  EXPECT_THAT(store->OpenRead(".metadata").status(),
              StatusIs(StatusCode::kFailedPrecondition,
                       HasSubstr("s3://" + bucket + "/ck/.metadata: HTTP 403 AccessDenied")));
  EXPECT_THAT(store->List().status(),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("AWS_ACCESS_KEY_ID")));
}

TEST(S3StoreTest, PersistentServerErrorsBecomeUnavailableAfterRetries) {
  DCPP_REQUIRE_S3();
  const std::string bucket = UniqueBucket();
  ASSERT_NE(OpenOrDie("s3://" + bucket, Server().Options()), nullptr);
  auto proxy = S3FaultProxy::Start(
      Server().port(), {"--fail-status", "503", "--fail-method", "PUT", "--fail-first", "-1"});
  DCPP_ASSERT_OK(proxy.status());
  S3Options o = Server().Options();
  o.endpoint = (*proxy)->endpoint();
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenS3Store("s3://" + bucket, o));
  EXPECT_THAT(store->WriteAll("k", "v"),
              StatusIs(StatusCode::kUnavailable, HasSubstr("HTTP 503 SlowDown")));
  EXPECT_THAT(store->WriteAll("k", "v"),
              StatusIs(StatusCode::kUnavailable, HasSubstr("gave up after 4 attempts")));
}

TEST(S3StoreTest, AStalledRequestTimesOutAndIsRetried) {
  DCPP_REQUIRE_S3();
  const std::string bucket = UniqueBucket();
  auto direct = OpenOrDie("s3://" + bucket, Server().Options());
  ASSERT_NE(direct, nullptr);
  DCPP_ASSERT_OK(direct->WriteAll("slow", "eventually"));
  // The first request for "slow" through the proxy never gets an answer.
  auto proxy = S3FaultProxy::Start(Server().port(), {"--hang-once-substring", "slow"});
  DCPP_ASSERT_OK(proxy.status());
  S3Options o = Server().Options();
  o.endpoint = (*proxy)->endpoint();
  o.stall_timeout_s = 1;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenS3Store("s3://" + bucket, o));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store->ReadAll("slow"));
  EXPECT_EQ(back, "eventually");
  EXPECT_THAT((*proxy)->process().LogTail(), HasSubstr("holding GET"));
}

TEST(S3StoreTest, ADeadEndpointIsUnavailable) {
  DCPP_REQUIRE_S3();
  auto proxy = S3FaultProxy::Start(Server().port(), {});
  DCPP_ASSERT_OK(proxy.status());
  S3Options o = Server().Options();
  o.endpoint = (*proxy)->endpoint();
  (*proxy)->process().Kill();
  EXPECT_THAT(OpenS3Store("s3://" + UniqueBucket(), o, {.create = true}).status(),
              StatusIs(StatusCode::kUnavailable, HasSubstr("gave up")));
}

// moto does not check signatures; the proxy recomputes each one with botocore (AWS's own
// Python implementation), so every kind of request the store sends is signed to the standard.
TEST(S3StoreTest, EveryRequestCarriesAValidSigV4Signature) {
  DCPP_REQUIRE_S3();
  auto proxy = S3FaultProxy::Start(Server().port(), {"--verify-sigv4", "testing:testing"});
  DCPP_ASSERT_OK(proxy.status());
  S3Options o = Server().Options();
  o.endpoint = (*proxy)->endpoint();
  o.session_token = "session-token/with+odd=chars";
  o.open_prefetch = 1024;
  // On failure the proxy's log says why it refused a request.
  struct ShowLog {
    S3FaultProxy& proxy;
    ~ShowLog() {
      if (::testing::Test::HasFailure()) std::cerr << "proxy log:\n" << proxy.process().LogTail();
    }
  } show_log{**proxy};
  const std::string bucket = UniqueBucket();
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenS3Store("s3://" + bucket + "/a b/p+q", o,
                                                    {.create = true}));  // HEAD, PUT bucket
  // Keys with characters that URI encoding must get right.
  const std::string odd = "x y+z=1&2%3~4.5_6-7/k!l'(m)*n,o;p:q@r$s\xc3\xbc";
  DCPP_ASSERT_OK(store->WriteAll(odd, "odd"));  // PUT (and the clash checks: HEAD, LIST)
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store->ReadAll(odd));  // ranged GET
  EXPECT_EQ(back, "odd");
  const std::string big = Bytes(11 << 20, 3);
  DCPP_ASSERT_OK(store->WriteAtomic("big", big));  // multipart: POST, PUT parts, POST complete
  DCPP_ASSERT_OK_AND_ASSIGN(back, store->ReadAll("big"));  // parallel ranged GETs with If-Match
  EXPECT_TRUE(back == big);
  DCPP_ASSERT_OK(store->Rename(odd, "renamed"));        // PUT with x-amz-copy-source, DELETE
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store->List());  // GET ?list-type=2&prefix=...
  EXPECT_THAT(keys, ::testing::ElementsAre("big", "renamed"));
  {
    DCPP_ASSERT_OK_AND_ASSIGN(auto file, store->OpenWrite("aborted"));
    DCPP_ASSERT_OK(file->Append(big.data(), big.size()));
  }  // DELETE ?uploadId=
  DCPP_ASSERT_OK(store->Remove("big"));
  // The check is real: a wrong secret is refused.
  o.secret_access_key = "wrong";
  EXPECT_THAT(OpenS3Store("s3://" + bucket, o).status(),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("HTTP 403")));
}

// ------------------------------------------------------------------ checkpoints on S3

// Row ranges of an uneven split.
ShardedTensor Rows(const Tensor& full, int rank, int world, bool fill) {
  const int64_t n = full.shape()[0];
  const int64_t lo = n * rank / world, hi = n * (rank + 1) / world;
  Shape size = full.shape();
  size[0] = hi - lo;
  Shape off(full.dim(), 0);
  off[0] = lo;
  Tensor piece = Tensor::Zeros(full.dtype(), size);
  if (fill) {
    EXPECT_TRUE(CopyRegion(piece.view(), Shape(full.dim(), 0), full.view(), off, size).ok());
  }
  return ShardedTensor{full.dtype(), full.shape(), {{off, piece}}};
}

// Columns of an uneven split.
ShardedTensor Cols(const Tensor& full, int rank, int world, bool fill) {
  const int64_t n = full.shape()[1];
  const int64_t lo = n * rank / world, hi = n * (rank + 1) / world;
  Shape size = full.shape();
  size[1] = hi - lo;
  Shape off = {0, lo};
  Tensor piece = Tensor::Zeros(full.dtype(), size);
  if (fill) {
    EXPECT_TRUE(CopyRegion(piece.view(), Shape(2, 0), full.view(), off, size).ok());
  }
  return ShardedTensor{full.dtype(), full.shape(), {{off, piece}}};
}

struct Model {
  explicit Model(uint64_t seed)
      : w(PatternTensor(DType::kFloat32, {512, 1024}, seed)),  // 2 MiB
        emb(PatternTensor(DType::kBFloat16, {300, 64}, seed + 1)),
        bias(PatternTensor(DType::kFloat64, {1024}, seed + 2)) {}
  Tensor w, emb, bias;
};

// w split by rows, emb by rows on save and by columns on load: a resharded load.
Value State(const Model& m, int rank, int world, bool fill, bool emb_by_cols) {
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromSharded(Rows(m.w, rank, world, fill)));
  sd.Set("emb", Value::FromSharded(emb_by_cols ? Cols(m.emb, rank, world, fill)
                                               : Rows(m.emb, rank, world, fill)));
  sd.Set("bias", Value::FromTensor(fill ? m.bias.Clone() : Tensor::Zeros(DType::kFloat64, {1024})));
  sd.Set("step", Value::Int(fill ? 100 : 0));
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

std::vector<Status> OnRanks(int world, const std::function<Status(Communicator&)>& fn) {
  std::vector<Status> out(world);
  RunOnThreads(world, [&](Communicator& comm) { out[comm.rank()] = fn(comm); });
  return out;
}

Status SaveOn(int world, const Model& m, const std::string& url) {
  Status first;
  for (const Status& s : OnRanks(world, [&](Communicator& comm) {
         SaveOptions so;
         so.comm = &comm;
         return Save(State(m, comm.rank(), world, true, false), url, so).status();
       })) {
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

// Loads with `world` ranks, emb resharded by columns, and checks every value against `m`.
void LoadAndCheck(int world, const Model& m, const std::string& url) {
  std::mutex mu;
  for (const Status& s : OnRanks(world, [&](Communicator& comm) {
         Value sd = State(m, comm.rank(), world, false, true);
         LoadOptions lo;
         lo.comm = &comm;
         Status st = Load(sd, url, lo);
         std::lock_guard<std::mutex> lock(mu);
         if (st.ok()) {
           ExpectPieces(m.w, sd.Find("w")->sharded());
           ExpectPieces(m.emb, sd.Find("emb")->sharded());
           EXPECT_TRUE(sd.Find("bias")->tensor().BitwiseEqual(m.bias));
           EXPECT_EQ(sd.Find("step")->as_int(), 100);
         }
         return st;
       })) {
    DCPP_EXPECT_OK(s) << "loading with " << world << " ranks";
  }
}

// Routes s3:// URLs of Save/Load to `endpoint` with the test server's options.
void UseEndpoint(const std::string& endpoint) {
  S3Options o = Server().Options();
  o.endpoint = endpoint;
  RegisterStoreScheme("s3", S3StoreFactory(o));
}

TEST(S3CheckpointTest, FourRanksSaveThreeAndTwoRanksLoadResharded) {
  DCPP_REQUIRE_S3();
  UseEndpoint(Server().endpoint());
  const std::string url = "s3://" + UniqueBucket() + "/run/step_100";
  Model m(1);
  DCPP_ASSERT_OK(SaveOn(4, m, url));
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenStore(url));
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store->List());
  EXPECT_THAT(keys, ::testing::Contains(".metadata"));
  // S3 cannot lock, so every save names its data objects uniquely: `__3_0_<tag>.distcp`.
  EXPECT_THAT(keys, ::testing::Contains(::testing::MatchesRegex("__3_0_[0-9a-f]{8}\\.distcp")));
  LoadAndCheck(3, m, url);
  LoadAndCheck(2, m, url);
  // A missing checkpoint is NotFound naming its metadata.
  Value sd = Value::MakeDict();
  EXPECT_THAT(Load(sd, url + "_missing"), StatusIs(StatusCode::kNotFound, HasSubstr(".metadata")));
}

TEST(S3CheckpointTest, ASecondServerImplementationSavesLoadsAndVerifies) {
  DCPP_REQUIRE_S3();
  UseEndpoint(Server(S3ServerKind::kRclone).endpoint());
  const std::string url = "s3://" + UniqueBucket() + "/run/step_3";
  Model m(3);
  DCPP_ASSERT_OK(SaveOn(4, m, url));
  LoadAndCheck(3, m, url);
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport report, VerifyCheckpoint(url));
  EXPECT_TRUE(report.ok()) << report.ToString();
}

TEST(S3CheckpointTest, VerifyChecksEveryByteThroughTheStore) {
  DCPP_REQUIRE_S3();
  UseEndpoint(Server().endpoint());
  const std::string url = "s3://" + UniqueBucket() + "/run/step_7";
  Model m(2);
  DCPP_ASSERT_OK(SaveOn(2, m, url));
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport clean, VerifyCheckpoint(url));
  EXPECT_TRUE(clean.ok()) << clean.ToString();
  EXPECT_TRUE(clean.has_manifest);
  // One byte flipped in a data file: verify names it, a load refuses it.
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenStore(url));
  // Data objects on S3 carry a tag unique to the save: __1_0_<tag>.distcp.
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> keys, store->List());
  std::string data;
  for (const auto& k : keys) {
    if (k.rfind("__1_0", 0) == 0 && k.size() > 7 && k.compare(k.size() - 7, 7, ".distcp") == 0) {
      data = k;
    }
  }
  ASSERT_FALSE(data.empty());
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, store->ReadAll(data));
  bytes[bytes.size() / 2] ^= 0x20;
  DCPP_ASSERT_OK(store->WriteAll(data, bytes));
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport bad, VerifyCheckpoint(url));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.problems[0].file, data);
  EXPECT_THAT(bad.problems[0].message, HasSubstr("checksum mismatch"));
}

// S3 cannot lock: two saves to one prefix at once both run, but their data objects have names
// of their own, so the committed checkpoint is whole: exactly the save whose `.metadata` upload
// came last.
TEST(S3CheckpointTest, ConcurrentSavesToOnePrefixNeverMix) {
  DCPP_REQUIRE_S3();
  UseEndpoint(Server().endpoint());
  const std::string url = "s3://" + UniqueBucket() + "/run/raced";
  constexpr int kTrials = 3;
  for (int trial = 0; trial < kTrials; ++trial) {
    std::vector<Result<Metadata>> results(2, InternalError("not run"));
    std::vector<std::thread> threads;
    for (int i = 0; i < 2; ++i) {
      threads.emplace_back([&, i] {
        Value sd = Value::MakeDict();
        for (int k = 0; k < 3; ++k) {
          sd.Set("t" + std::to_string(k),
                 Value::FromTensor(PatternTensor(DType::kFloat32, {128, 64}, 10 * i + k)));
        }
        sd.Set("who", Value::Int(i));
        SaveOptions so;
        so.writer.single_file_per_rank = false;
        results[i] = Save(sd, url, so);
      });
    }
    for (auto& t : threads) t.join();
    DCPP_ASSERT_OK(results[0].status());
    DCPP_ASSERT_OK(results[1].status());
    Value back = Value::MakeDict();
    for (int k = 0; k < 3; ++k) {
      back.Set("t" + std::to_string(k),
               Value::FromTensor(Tensor::Zeros(DType::kFloat32, {128, 64})));
    }
    back.Set("who", Value::Int(-1));
    DCPP_ASSERT_OK(Load(back, url));
    const int64_t who = back.Find("who")->as_int();
    ASSERT_TRUE(who == 0 || who == 1) << who;
    for (int k = 0; k < 3; ++k) {
      EXPECT_TRUE(back.Find("t" + std::to_string(k))
                      ->tensor()
                      .BitwiseEqual(PatternTensor(DType::kFloat32, {128, 64},
                                                  static_cast<uint64_t>(10 * who + k))))
          << "trial " << trial << ": t" << k << " is not from save " << who;
    }
  }
}

TEST(S3CheckpointTest, InjectedServerErrorsDuringASaveAreRetried) {
  DCPP_REQUIRE_S3();
  auto proxy = S3FaultProxy::Start(
      Server().port(), {"--fail-status", "500", "--fail-method", "PUT", "--fail-once-every", "2"});
  DCPP_ASSERT_OK(proxy.status());
  UseEndpoint((*proxy)->endpoint());
  const std::string url = "s3://" + UniqueBucket() + "/step_1";
  Model m(5);
  DCPP_ASSERT_OK(SaveOn(4, m, url));
  LoadAndCheck(3, m, url);
}

TEST(S3CheckpointTest, MetadataThatCannotBeWrittenCommitsNothing) {
  DCPP_REQUIRE_S3();
  const std::string bucket = UniqueBucket();
  UseEndpoint(Server().endpoint());
  Model good(1), next(9);
  DCPP_ASSERT_OK(SaveOn(2, good, "s3://" + bucket + "/ck"));
  auto proxy =
      S3FaultProxy::Start(Server().port(), {"--fail-status", "500", "--fail-substring", ".metadata",
                                            "--fail-method", "PUT", "--fail-first", "-1"});
  DCPP_ASSERT_OK(proxy.status());
  UseEndpoint((*proxy)->endpoint());
  // Replacing the checkpoint and saving a new one both fail at the commit.
  EXPECT_THAT(SaveOn(2, next, "s3://" + bucket + "/ck"),
              StatusIs(StatusCode::kUnavailable, HasSubstr(".metadata")));
  EXPECT_THAT(SaveOn(2, next, "s3://" + bucket + "/ck2"),
              StatusIs(StatusCode::kUnavailable, HasSubstr(".metadata")));
  UseEndpoint(Server().endpoint());
  LoadAndCheck(2, good, "s3://" + bucket + "/ck");
  Value sd = Value::MakeDict();
  EXPECT_THAT(Load(sd, "s3://" + bucket + "/ck2"), StatusIs(StatusCode::kNotFound, ::testing::_));
}

TEST(S3CheckpointTest, EndpointKilledMidSaveLeavesTheLastGoodCheckpoint) {
  DCPP_REQUIRE_S3();
  const std::string bucket = UniqueBucket();
  const std::string url = "s3://" + bucket + "/ck";
  UseEndpoint(Server().endpoint());
  Model good(1), next(9);
  DCPP_ASSERT_OK(SaveOn(4, good, url));
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenStore(url));
  DCPP_ASSERT_OK_AND_ASSIGN(auto before, store->List());
  // The proxy SIGKILLs itself once 1.5 MiB of the new save's data went through: some objects
  // are written, others are cut off mid-upload, and later requests find no server at all.
  auto proxy =
      S3FaultProxy::Start(Server().port(), {"--die-after-upload-bytes", std::to_string(3 << 19)});
  DCPP_ASSERT_OK(proxy.status());
  UseEndpoint((*proxy)->endpoint());
  EXPECT_THAT(SaveOn(4, next, url), StatusIs(StatusCode::kUnavailable, ::testing::_));
  EXPECT_FALSE((*proxy)->process().Running());
  UseEndpoint(Server().endpoint());
  LoadAndCheck(3, good, url);
  // Every object of the good checkpoint is still there.
  DCPP_ASSERT_OK_AND_ASSIGN(auto after, store->List());
  for (const std::string& k : before) EXPECT_THAT(after, ::testing::Contains(k));
  // A later save over it succeeds and replaces it.
  DCPP_ASSERT_OK(SaveOn(4, next, url));
  LoadAndCheck(2, next, url);
}

}  // namespace
}  // namespace dcpp
