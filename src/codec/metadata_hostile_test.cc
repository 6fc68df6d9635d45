// Hostile `.metadata` contents: every size read from the file is checked before it is used, so
// each of these is a DataLoss naming the key instead of an overflow, a crash or a huge allocation.
// Memo-shared objects referenced from many keys (a chunk list, a long string, a shape) are
// refused by the decode budget (codec/decode_budget.h) before they are copied for every key.
#include <sys/resource.h>

#include <cstring>
#include <limits>

#include "codec/decode_budget.h"
#include "codec/metadata_reader.h"
#include "codec/pickle.h"
#include "dcpp/metadata.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using internal::DecodeBudget;
using internal::DecodeMetadataDirect;
using internal::DecodeMetadataTree;
using ::testing::AllOf;
using ::testing::HasSubstr;

// One float32 tensor "w" of `size` with one chunk and its blob.
Metadata OneTensor(Shape size, ChunkBox chunk, int64_t blob_length) {
  Metadata md;
  TensorStorageMetadata t;
  t.size = std::move(size);
  t.chunks = {chunk};
  md.state_dict_metadata["w"] = t;
  md.storage_data[MetadataIndex{"w", chunk.offsets, std::nullopt}] =
      StorageInfo{"__0_0.distcp", 0, blob_length, {}};
  return md;
}

Status RoundTrip(const Metadata& md) {
  auto bytes = EncodeMetadata(md);
  if (!bytes.ok()) return bytes.status();
  return ParseMetadata(*bytes).status();
}

TEST(MetadataHostileTest, ElementCountsThatOverflowAreRefused) {
  const int64_t big = int64_t{1} << 40;
  EXPECT_THAT(RoundTrip(OneTensor({big, big}, {{0, 0}, {1, 1}}, 1000)),
              StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("\"w\""), HasSubstr("overflows"))));
  EXPECT_THAT(RoundTrip(OneTensor({int64_t{1} << 32, int64_t{1} << 32}, {{0, 0}, {1, 1}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("overflows")));
  EXPECT_THAT(RoundTrip(OneTensor({-4, 2}, {{0, 0}, {0, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("negative")));
}

TEST(MetadataHostileTest, ChunksOutsideTheirTensorAreRefusedWithoutWrapping) {
  const int64_t near = std::numeric_limits<int64_t>::max() - 2;
  EXPECT_THAT(RoundTrip(OneTensor({8, 2}, {{near, 0}, {8, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("does not fit")));
  EXPECT_THAT(RoundTrip(OneTensor({8, 2}, {{-2, 0}, {4, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("\"w\""), HasSubstr("negative"))));
  EXPECT_THAT(RoundTrip(OneTensor({8, 2}, {{4, 0}, {8, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("does not fit")));
}

TEST(MetadataHostileTest, AChunkCannotHoldMoreBytesThanItsBlob) {
  // 2^20 x 2^20 float32 (4 TiB) claimed by a 1000-byte blob: refused before any allocation.
  const int64_t m = int64_t{1} << 20;
  EXPECT_THAT(RoundTrip(OneTensor({m, m}, {{0, 0}, {m, m}}, 1000)),
              StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("needs"), HasSubstr("1000"))));
  EXPECT_TRUE(RoundTrip(OneTensor({4, 4}, {{0, 0}, {4, 4}}, 64 + 700)).ok());
}

TEST(MetadataHostileTest, PlannerDataListHolesAreBounded) {
  Metadata md = OneTensor({4}, {{0}, {4}}, 1000);
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{1} << 40}}};
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("list index")));
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{-1}}}};
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("list index -1")));
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{0}}}};
  EXPECT_TRUE(RoundTrip(md).ok());
  // Empty dicts leave no entry, so a real list index may exceed the number of entries: a
  // layer list whose first modules hold nothing, saved by PyTorch as ('layers', 3, 'w').
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{3}, "w"}}};
  EXPECT_TRUE(RoundTrip(md).ok());
  // The holes of all lists together are bounded: two lists with 2^19 + 1 holes each are not.
  md = OneTensor({4}, {{0}, {4}}, 1000);
  md.state_dict_metadata["v"] = BytesStorageMetadata{};
  md.storage_data[MetadataIndex{"v", std::nullopt, std::nullopt}] =
      StorageInfo{"__0_0.distcp", 0, 10, {}};
  const int64_t half = (int64_t{1} << 19) + 1;
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"a", half}}, {"v", {"b", half}}};
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("missing elements")));
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"a", half}}, {"v", {"a", int64_t{0}}}};
  EXPECT_TRUE(RoundTrip(md).ok());
}

// ---------------------------------------------------------------- memo-shared objects

// The process's peak resident memory so far. Each test runs in its own process (ctest), so a
// decoder that copied a shared object for every key (tens of GB here) would push it far past
// the bounds below, or be killed, instead of passing.
int64_t PeakRssMiB() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024;
}
constexpr int64_t kPeakRssBoundMiB = 1024;

constexpr std::string_view kMeta = "torch.distributed.checkpoint.metadata";
constexpr std::string_view kFs = "torch.distributed.checkpoint.filesystem";

// A protocol-2 pickle written opcode by opcode, for files no honest pickler produces: one object
// memoized once and fetched again (LONG_BINGET) wherever the file wants it.
class RawPickle {
 public:
  RawPickle() { out_ = "\x80\x02"; }
  RawPickle& Op(std::string_view ops) {
    out_ += ops;
    return *this;
  }
  RawPickle& Global(std::string_view module, std::string_view name) {
    out_ += 'c';
    out_ += module;
    out_ += '\n';
    out_ += name;
    out_ += '\n';
    return *this;
  }
  RawPickle& Str(std::string_view s) {
    out_ += 'X';
    U32(static_cast<uint32_t>(s.size()));
    out_ += s;
    return *this;
  }
  RawPickle& Int(int32_t i) {
    out_ += 'J';
    U32(static_cast<uint32_t>(i));
    return *this;
  }
  uint32_t Put() {
    out_ += 'r';
    U32(memo_);
    return memo_++;
  }
  RawPickle& Get(uint32_t index) {
    out_ += 'j';
    U32(index);
    return *this;
  }
  // cls () NEWOBJ {  ...fields...  } BUILD: Obj opens the field dict, EndObj closes it.
  RawPickle& Obj(std::string_view module, std::string_view cls) {
    return Global(module, cls).Op(")\x81}(");
  }
  RawPickle& EndObj() { return Op("ub"); }
  // TensorProperties(float32, strided, False, contiguous, False) in its 5-tuple state form.
  RawPickle& Properties() {
    Global(kMeta, "TensorProperties").Op(")\x81(");
    Global("torch", "float32").Global("torch.serialization", "_get_layout");
    Str("torch.strided").Op("\x85R\x89");
    Global(kMeta, "_MEM_FORMAT_ENCODING").Int(0).Op("\x85R\x89tb");
    return *this;
  }
  std::string Finish() { return std::move(out_) + "."; }
  size_t size() const { return out_.size(); }

 private:
  void U32(uint32_t v) {
    char b[4];
    std::memcpy(b, &v, 4);  // little-endian hosts only, as the codec
    out_.append(b, 4);
  }
  std::string out_;
  uint32_t memo_ = 0;
};

// Opens Metadata(state_dict_metadata={...: the caller's SETITEMS pairs.
void OpenMetadata(RawPickle& p) { p.Obj(kMeta, "Metadata").Str("state_dict_metadata").Op("}("); }

// Both decoders and ParseMetadata refuse `bytes` with the budget's DataLoss naming `context`,
// and memory stays bounded.
void ExpectRefused(const std::string& bytes, const std::string& context) {
  const auto refused =
      StatusIs(StatusCode::kDataLoss,
               AllOf(HasSubstr(context), HasSubstr("decodes to more than 64x its size (" +
                                                   std::to_string(bytes.size()) + " bytes)")));
  EXPECT_THAT(DecodeMetadataDirect(bytes).status(), refused);
  EXPECT_THAT(DecodeMetadataTree(bytes).status(), refused);
  EXPECT_THAT(ParseMetadata(bytes).status(), refused);
  EXPECT_LT(PeakRssMiB(), kPeakRssBoundMiB);
}

TEST(MetadataHostileTest, ASharedChunkListPickledByPyTorchIsRefusedWithBoundedMemory) {
  // tests/data/make_hostile_metadata.py: 4 000 tensors holding one list of 50 000 chunks,
  // 2 * 10^8 chunks if copied for every key.
  DCPP_ASSERT_OK_AND_ASSIGN(
      std::string bytes,
      ::dcpp::testing::ReadFileBytes(::dcpp::testing::SourceDir() +
                                     "/tests/data/hostile/shared_chunk_list.metadata"));
  ASSERT_LT(bytes.size(), 300u * 1024);
  // The pickle itself is sound: only copying the list for every key is refused.
  PickleReadOptions opts;
  const PickleAllowList allow = PickleAllowList::DcpMetadata();
  opts.allow = &allow;
  ASSERT_TRUE(ReadPickle(bytes, opts).ok());
  // Each key costs its entry and its chunks; the first key past the budget is named.
  const uint64_t per_key = 50000 * internal::CostChunk(1, 1) + internal::CostShape(1);
  uint64_t used = 0;
  int failing = 0;
  for (;; ++failing) {
    const std::string key = "k" + std::to_string(failing);
    used += internal::kCostEntry + internal::CostStr(key.size());
    if (used > DecodeBudget::For(bytes.size())) break;
    used += per_key;
    if (used > DecodeBudget::For(bytes.size())) break;
  }
  ExpectRefused(bytes, "key \"k" + std::to_string(failing) + "\"");
}

// With a few references each file below decodes in both decoders, to the same Metadata: the
// files are sound and only the multiplication is refused.
void ExpectDecodes(const std::string& bytes) {
  auto direct = DecodeMetadataDirect(bytes);
  auto tree = DecodeMetadataTree(bytes);
  ASSERT_TRUE(direct.ok()) << direct.status().ToString();
  ASSERT_TRUE(tree.ok()) << tree.status().ToString();
  EXPECT_EQ(internal::MetadataDifference(*tree, *direct), "");
}

// One tensor object whose size has 100 000 dimensions, held by `keys` keys.
std::string SharedShapeFile(int keys) {
  RawPickle p;
  OpenMetadata(p);
  p.Obj(kMeta, "TensorStorageMetadata").Str("properties").Properties().Str("size").Op("(");
  for (int i = 0; i < 100000; ++i) p.Int(1);
  p.Op("t").Str("chunks").Op("]").EndObj();
  const uint32_t tensor = p.Put();
  p.Op("\x30");  // POP: the first key takes it below
  for (int i = 0; i < keys; ++i) p.Str("k" + std::to_string(i)).Get(tensor);
  p.Op("u").EndObj();
  return p.Finish();
}

TEST(MetadataHostileTest, AShapeSharedByEveryKeyIsRefused) {
  ExpectDecodes(SharedShapeFile(2));
  // 100 000 keys: 80 GB of shapes if copied.
  const std::string bytes = SharedShapeFile(100000);
  ASSERT_LT(bytes.size(), 3u << 20);
  ExpectRefused(bytes, "metadata: key \"k");
}

// One _StorageInfo whose file name is 1 MB, the value of `keys` storage keys.
std::string SharedInfoFile(int keys) {
  RawPickle p;
  OpenMetadata(p);
  p.Op("u").Str("storage_data").Op("}(");
  p.Obj(kFs, "_StorageInfo").Str("relative_path").Str(std::string(1 << 20, 'a'));
  p.Str("offset").Int(0).Str("length").Int(1).EndObj();
  const uint32_t info = p.Put();
  p.Op("\x30");
  for (int i = 0; i < keys; ++i) {
    p.Obj(kMeta, "MetadataIndex").Str("fqn").Str("k" + std::to_string(i)).EndObj().Get(info);
  }
  p.Op("u").EndObj();
  return p.Finish();
}

TEST(MetadataHostileTest, AStringSharedByEveryStorageEntryIsRefused) {
  ExpectDecodes(SharedInfoFile(2));
  const std::string bytes = SharedInfoFile(20000);  // 20 GB of file names if copied
  ASSERT_LT(bytes.size(), 3u << 20);
  ExpectRefused(bytes, "metadata: storage of \"k");
}

// planner_data {k_i: (s,)} for one 1 MB string s and `keys` keys.
std::string SharedPlannerPathFile(int keys) {
  RawPickle p;
  OpenMetadata(p);
  p.Op("u").Str("planner_data").Op("}(");
  p.Str(std::string(1 << 20, 'p')).Op("\x85");
  const uint32_t path = p.Put();
  p.Op("\x30");
  for (int i = 0; i < keys; ++i) p.Str("k" + std::to_string(i)).Get(path);
  p.Op("u").EndObj();
  return p.Finish();
}

TEST(MetadataHostileTest, AStringSharedByEveryPlannerPathIsRefused) {
  ExpectDecodes(SharedPlannerPathFile(2));
  ExpectRefused(SharedPlannerPathFile(20000), "metadata: planner_data");
}

// A value read once can still repeat a string: StorageMeta.modules of `n` times one 1 MB str.
std::string RepeatedModulesFile(int n) {
  RawPickle p;
  OpenMetadata(p);
  p.Op("u").Str("storage_meta").Obj(kMeta, "StorageMeta").Str("modules").Op("](");
  p.Str(std::string(1 << 20, 'm'));
  const uint32_t s = p.Put();
  for (int i = 1; i < n; ++i) p.Get(s);
  p.Op("e").EndObj().EndObj();
  return p.Finish();
}

TEST(MetadataHostileTest, AStringRepeatedInOneListIsRefused) {
  ExpectDecodes(RepeatedModulesFile(2));
  ExpectRefused(RepeatedModulesFile(20000), "metadata: storage_meta");
}

// A list of `n` calls _codecs.encode(s, 'latin1') of one 1 MB str s.
std::string RepeatedEncodeFile(int n) {
  RawPickle p;
  // Each memoized value is popped at once (POP), leaving only the list on the stack.
  p.Global("_codecs", "encode");
  const uint32_t encode = p.Put();
  p.Op("0").Str(std::string(1 << 20, 'e'));
  const uint32_t text = p.Put();
  p.Op("0").Str("latin1");
  const uint32_t latin1 = p.Put();
  p.Op("0(");
  for (int i = 0; i < n; ++i) p.Get(encode).Get(text).Get(latin1).Op("\x86R");
  p.Op("l");
  return p.Finish();
}

// A list of `n` calls set(l) of one list l of 100 000 items.
std::string RepeatedSetFile(int n) {
  RawPickle q;
  q.Global("builtins", "set");
  const uint32_t set = q.Put();
  q.Op("0(");
  for (int i = 0; i < 100000; ++i) q.Op("N");
  q.Op("l");
  const uint32_t list = q.Put();
  q.Op("0(");
  for (int i = 0; i < n; ++i) q.Get(set).Get(list).Op("\x85R");
  q.Op("l");
  return q.Finish();
}

TEST(MetadataHostileTest, PickleCallsThatCopyAShareAreRefused) {
  DCPP_ASSERT_OK(ReadPickle(RepeatedEncodeFile(2)).status());
  DCPP_ASSERT_OK(ReadPickle(RepeatedSetFile(2)).status());
  // 20 000 encodes: the pickle reader itself would make 20 GB of bytes. The tree path (the only
  // one that resolves the call) says so.
  const std::string bytes = RepeatedEncodeFile(20000);
  EXPECT_THAT(ReadPickle(bytes).status(),
              StatusIs(StatusCode::kDataLoss,
                       AllOf(HasSubstr("_codecs.encode"), HasSubstr("decodes to more than 64x"))));
  EXPECT_THAT(ParseMetadata(bytes).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("decodes to more than 64x")));
  // 100 000 sets: 160 GB of item references.
  EXPECT_THAT(ReadPickle(RepeatedSetFile(100000)).status(),
              StatusIs(StatusCode::kDataLoss,
                       AllOf(HasSubstr("set"), HasSubstr("decodes to more than 64x"))));
  EXPECT_LT(PeakRssMiB(), kPeakRssBoundMiB);
}

TEST(MetadataHostileTest, ALongPlannerPathIsValidatedInLinearMemory) {
  // A path of 100 000 list indexes (200 kB of pickle): keying each list by its whole prefix
  // would copy 15 GB of prefixes. It has no holes, so it is valid.
  Metadata md = OneTensor({4}, {{0}, {4}}, 1000);
  md.planner_data = std::map<std::string, ObjectPath>{{"w", ObjectPath(100000, int64_t{0})}};
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeMetadata(md));
  EXPECT_LT(bytes.size(), 1u << 20);
  DCPP_EXPECT_OK(ParseMetadata(bytes).status());
  // One index of 2^21 at the end of it leaves too many holes, found as before.
  md.planner_data->at("w").back() = int64_t{1} << 21;
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("missing elements")));
  EXPECT_LT(PeakRssMiB(), kPeakRssBoundMiB);
}

}  // namespace
}  // namespace dcpp
