#include "codec/torch_save.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "codec/testdata_torch113.h"
#include "codec/zip.h"
#include "dcpp/chunk.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Builds an archive from raw records (names without the "archive/" prefix).
std::string MakeArchive(const std::vector<std::pair<std::string, std::string>>& records) {
  StringSink sink;
  internal::ZipWriter w(sink);
  for (const auto& [name, data] : records) {
    EXPECT_THAT(w.AddRecord("archive/" + name, data.data(), data.size()), IsOk());
  }
  EXPECT_THAT(w.Finish(), IsOk());
  return sink.Release();
}

// Every record of an encoded archive, in order, for tampering.
std::vector<std::pair<std::string, std::string>> Records(const std::string& bytes) {
  MemorySource source(bytes);
  auto a = TorchSaveArchive::Open(source);
  EXPECT_THAT(a.status(), IsOk());
  std::vector<std::pair<std::string, std::string>> out;
  for (const std::string& name : a->RecordNames()) out.emplace_back(name, *a->ReadRecord(name));
  return out;
}

Result<Value> Decode(const std::string& bytes, bool opaque = false) {
  MemorySource source(bytes, "test.pt");
  DCPP_ASSIGN_OR_RETURN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  DCPP_RETURN_IF_ERROR(a.VerifyChecksums());
  return a.ReadValue(opaque);
}

// A view into `base` (which must outlive nothing: tensors share the storage).
Tensor View(const Tensor& base, Shape shape, Shape strides, int64_t offset) {
  return *Tensor::FromStorage(base.storage(), base.dtype(), std::move(shape), std::move(strides),
                              offset);
}

Value Dict(std::vector<std::pair<std::string, Value>> items, bool ordered = false) {
  Value::Dict d;
  for (auto& [k, v] : items) d.emplace_back(Value::Str(k), std::move(v));
  return Value::MakeDict(std::move(d), ordered);
}

std::string FromHex(const char* hex) {
  std::string out;
  for (const char* p = hex; p[0] && p[1]; p += 2) {
    out.push_back(static_cast<char>(std::stoi(std::string(p, 2), nullptr, 16)));
  }
  return out;
}

TEST(TorchSaveTest, ReadsAndReproducesPyTorch113BytesExactly) {
  const std::string golden = FromHex(testdata::kTorch113Arange6Hex);
  MemorySource source(golden, "arange.pt");
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  DCPP_ASSERT_OK(a.VerifyChecksums());
  DCPP_ASSERT_OK_AND_ASSIGN(Value v, a.ReadValue());
  ASSERT_TRUE(v.is_tensor());
  const Tensor& t = v.tensor();
  EXPECT_EQ(t.dtype(), DType::kFloat32);
  EXPECT_EQ(t.shape(), (Shape{6}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(t.data_as<float>()[i], static_cast<float>(i));
  TorchSaveWriteOptions options;
  options.modern_records = false;  // what 1.13 wrote
  DCPP_ASSERT_OK_AND_ASSIGN(std::string mine, EncodeTorchSave(v, options));
  EXPECT_TRUE(mine == golden);
}

TEST(TorchSaveTest, EveryDTypeRoundTrips) {
  std::vector<std::pair<std::string, Value>> items;
  for (int i = 0; i < kNumDTypes; ++i) {
    const DType d = static_cast<DType>(i);
    const std::string name(DTypeName(d));
    items.emplace_back(name, Value::FromTensor(PatternTensor(d, {3, 5}, i + 1)));
    items.emplace_back(name + "_scalar", Value::FromTensor(PatternTensor(d, {}, i + 50)));
    items.emplace_back(name + "_empty", Value::FromTensor(Tensor::Zeros(d, {0, 3})));
  }
  const Value v = Dict(std::move(items), /*ordered=*/true);
  for (bool modern : {true, false}) {
    TorchSaveWriteOptions options;
    options.modern_records = modern;
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v, options));
    DCPP_ASSERT_OK_AND_ASSIGN(Value back, Decode(bytes));
    EXPECT_TRUE(back == v) << back.DebugString();
    EXPECT_TRUE(back.is_ordered_dict());
    // Dtypes without a typed storage class go through _rebuild_tensor_v3 + UntypedStorage,
    // named by its module as PyTorch does (torch.load(weights_only=True) allows only that).
    MemorySource source(bytes);
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
    const std::string pkl = *a.ReadRecord("data.pkl");
    EXPECT_NE(pkl.find("_rebuild_tensor_v3"), std::string::npos);
    EXPECT_NE(pkl.find("torch.storage\nUntypedStorage"), std::string::npos);
    EXPECT_NE(pkl.find("float8_e4m3fn"), std::string::npos);
    EXPECT_NE(pkl.find("BFloat16Storage"), std::string::npos);
  }
}

TEST(TorchSaveTest, ALoneTensorsDirectPickleIsTheTreesByteForByte) {
  // Every dtype (typed storages and _rebuild_tensor_v3), ranks 0 to 6 (TUPLE1-3 and MARK
  // TUPLE), integers of every pickle width, and dense permutations (w.t()).
  std::vector<Shape> shapes = {{},     {0},       {1},          {5},
                               {3, 5}, {2, 3, 4}, {2, 3, 4, 5}, {1, 1, 1, 1, 1, 1},
                               {300},  {70000},   {2, 0, 3}};
  int checked = 0;
  for (int i = 0; i < kNumDTypes; ++i) {
    const DType d = static_cast<DType>(i);
    for (const Shape& shape : shapes) {
      const Tensor t = PatternTensor(d, shape, i + 1);
      DCPP_ASSERT_OK_AND_ASSIGN(std::string direct,
                                internal::TorchSavePickle(Value::FromTensor(t), false));
      DCPP_ASSERT_OK_AND_ASSIGN(std::string tree,
                                internal::TorchSavePickle(Value::FromTensor(t), true));
      EXPECT_TRUE(direct == tree) << DTypeName(d) << ShapeToString(shape);
      ++checked;
    }
    const Tensor w = PatternTensor(d, {4, 7}, i + 2);
    const Tensor wt = View(w, {7, 4}, {1, 7}, 0);
    DCPP_ASSERT_OK_AND_ASSIGN(std::string direct,
                              internal::TorchSavePickle(Value::FromTensor(wt), false));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string tree,
                              internal::TorchSavePickle(Value::FromTensor(wt), true));
    EXPECT_TRUE(direct == tree) << DTypeName(d) << " transposed";
  }
  // Sizes past 2^31 and 2^32 elements (LONG1), on a placeholder storage: no bytes are touched.
  for (size_t n : {size_t{3} << 30, size_t{5} << 30}) {
    auto storage = Storage::Wrap(nullptr, n, Device{}, nullptr);
    DCPP_ASSERT_OK_AND_ASSIGN(
        Tensor big, Tensor::FromStorage(storage, DType::kUInt8, {static_cast<int64_t>(n)}));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string direct,
                              internal::TorchSavePickle(Value::FromTensor(big), false));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string tree,
                              internal::TorchSavePickle(Value::FromTensor(big), true));
    EXPECT_TRUE(direct == tree) << n;
  }
  EXPECT_EQ(checked, kNumDTypes * static_cast<int>(shapes.size()));
  // And the archive around it reads back.
  const Tensor t = PatternTensor(DType::kFloat32, {3, 5}, 9);
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(Value::FromTensor(t)));
  MemorySource src(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(src));
  DCPP_ASSERT_OK(archive.VerifyChecksums());
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, archive.ReadValue());
  EXPECT_TRUE(back.tensor().BitwiseEqual(t));
}

TEST(TorchSaveTest, ALoneTensorIsReadWithoutThePickleTreeAndCheckedTheSame) {
  int lone = 0;
  for (int i = 0; i < kNumDTypes; ++i) {
    const DType d = static_cast<DType>(i);
    for (const Shape& shape : std::vector<Shape>{{}, {0}, {7}, {3, 5}, {2, 3, 4, 5}, {70000}}) {
      const Tensor t = PatternTensor(d, shape, i + 3);
      for (bool modern : {true, false}) {
        TorchSaveWriteOptions options;
        options.modern_records = modern;
        DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes,
                                  EncodeTorchSave(Value::FromTensor(t), options));
        MemorySource src(bytes);
        DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(src));
        lone += archive.lone_tensor();
        DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveTensorRef ref, archive.RootTensor());
        EXPECT_EQ(ref.dtype, d);
        EXPECT_EQ(ref.shape, shape);
        EXPECT_EQ(ref.strides, t.strides());
        EXPECT_EQ(ref.record_size, t.nbytes());
        DCPP_ASSERT_OK_AND_ASSIGN(Value back, archive.ReadValue());
        EXPECT_TRUE(back.tensor().BitwiseEqual(t)) << DTypeName(d) << ShapeToString(shape);
        DCPP_ASSERT_OK_AND_ASSIGN(auto leaves, archive.Leaves());
        ASSERT_EQ(leaves.size(), 1u);
        EXPECT_TRUE(leaves[0].is_tensor);
        EXPECT_EQ(leaves[0].key, "");
        EXPECT_EQ(leaves[0].tensor.shape, shape);
      }
    }
  }
  EXPECT_EQ(lone, kNumDTypes * 6 * 2);
  // Anything else takes the general reader.
  for (const Value& v :
       {Dict({{"w", Value::FromTensor(PatternTensor(DType::kFloat32, {3}))}}), Value::Int(5)}) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v));
    MemorySource src(bytes);
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(src));
    EXPECT_FALSE(archive.lone_tensor());
  }
  // A canonical pickle over a record too short for it is refused as the tree reader refuses it.
  DCPP_ASSERT_OK_AND_ASSIGN(
      std::string pkl,
      internal::TorchSavePickle(Value::FromTensor(PatternTensor(DType::kFloat32, {10})), false));
  StringSink sink;
  internal::ZipWriter zip(sink);
  const std::string short_record(8, 'x');
  DCPP_ASSERT_OK(zip.AddRecord("archive/data.pkl", pkl.data(), pkl.size()));
  DCPP_ASSERT_OK(zip.AddRecord("archive/data/0", short_record.data(), short_record.size()));
  DCPP_ASSERT_OK(zip.AddRecord("archive/version", "3\n", 2));
  DCPP_ASSERT_OK(zip.Finish());
  const std::string bad = sink.Release();
  MemorySource src(bad);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(src));
  EXPECT_TRUE(archive.lone_tensor());
  EXPECT_THAT(archive.RootTensor(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("declares 10 elements of 4 bytes")));
  EXPECT_THAT(archive.ReadValue(), StatusIs(StatusCode::kDataLoss, HasSubstr("declares 10")));
}

TEST(TorchSaveTest, RecordsAreInPyTorchOrderAndAligned) {
  const Value v = Dict({{"a", Value::FromTensor(PatternTensor(DType::kFloat32, {2, 3}))},
                        {"b", Value::FromTensor(PatternTensor(DType::kInt64, {7}))}});
  {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v));
    MemorySource source(bytes);
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
    EXPECT_EQ(a.prefix(), "archive");
    EXPECT_EQ(a.version(), 3);
    EXPECT_FALSE(a.big_endian());
    EXPECT_THAT(a.RecordNames(),
                ElementsAre("data.pkl", ".format_version", ".storage_alignment", "byteorder",
                            "data/0", "data/1", "version", ".data/serialization_id"));
    EXPECT_EQ(*a.ReadRecord("version"), "3\n");
    EXPECT_EQ(*a.ReadRecord("byteorder"), "little");
    EXPECT_EQ(*a.ReadRecord(".format_version"), "1");
    EXPECT_EQ(*a.ReadRecord(".storage_alignment"), "64");
    const std::string id = *a.ReadRecord(".data/serialization_id");
    EXPECT_EQ(id.size(), 40u);
    EXPECT_TRUE(std::all_of(id.begin(), id.end(), [](char c) { return c >= '0' && c <= '9'; }));
    for (const auto& [name, rec] : a.records()) EXPECT_EQ(rec.data_offset % 64, 0u) << name;
    EXPECT_EQ(a.records().at("data/0").size, 24u);
    EXPECT_EQ(a.records().at("data/1").size, 56u);
    DCPP_EXPECT_OK(a.VerifyChecksums());
    EXPECT_THAT(a.ReadRecord("data/9").status(),
                StatusIs(StatusCode::kNotFound, HasSubstr("archive/data/9")));
  }
  {
    TorchSaveWriteOptions options;
    options.modern_records = false;
    options.archive_name = "my.model";
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v, options));
    MemorySource source(bytes);
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
    EXPECT_EQ(a.prefix(), "my.model");
    EXPECT_THAT(a.RecordNames(), ElementsAre("data.pkl", "data/0", "data/1", "version"));
  }
  {
    // Storage records: numeric key order with the 2.x records, lexicographic without (1.13).
    Value::List many;
    for (int i = 0; i < 11; ++i)
      many.push_back(Value::FromTensor(PatternTensor(DType::kInt8, {i})));
    for (bool modern : {true, false}) {
      TorchSaveWriteOptions options;
      options.modern_records = modern;
      DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(Value::MakeList(many), options));
      MemorySource source(bytes);
      DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
      std::vector<std::string> data;
      for (const std::string& n : a.RecordNames()) {
        if (n.rfind("data/", 0) == 0) data.push_back(n);
      }
      ASSERT_EQ(data.size(), 11u);
      EXPECT_EQ(data[2], modern ? "data/2" : "data/10");
      EXPECT_EQ(a.records().at("data/10").size, 10u);
      DCPP_ASSERT_OK_AND_ASSIGN(Value back, a.ReadValue());
      EXPECT_TRUE(back == Value::MakeList(many));
    }
  }
}

TEST(TorchSaveTest, SharedStorageIsOneRecordWithLayoutsPreserved) {
  const Tensor base = PatternTensor(DType::kFloat32, {4, 6});
  const Tensor rows = View(base, {2, 6}, {6, 1}, 6);        // base[1:3]
  const Tensor col = View(base, {4}, {6}, 2);               // base[:, 2]
  const Tensor transposed = View(base, {6, 4}, {1, 6}, 0);  // base.t()
  const Value v = Dict({{"base", Value::FromTensor(base)},
                        {"rows", Value::FromTensor(rows)},
                        {"col", Value::FromTensor(col)},
                        {"t", Value::FromTensor(transposed)}});
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v));
  MemorySource source(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  EXPECT_EQ(a.records().count("data/1"), 0u);
  EXPECT_EQ(a.records().at("data/0").size, 96u);
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, a.ReadValue());
  EXPECT_TRUE(back == v);
  const Tensor& brows = back.Find("rows")->tensor();
  const Tensor& bcol = back.Find("col")->tensor();
  const Tensor& bt = back.Find("t")->tensor();
  EXPECT_EQ(brows.storage(), back.Find("base")->tensor().storage());
  EXPECT_EQ(bt.storage(), brows.storage());
  EXPECT_EQ(brows.storage_offset(), 6);
  EXPECT_EQ(bcol.storage_offset(), 2);
  EXPECT_EQ(bcol.strides(), (Shape{6}));
  EXPECT_EQ(bt.strides(), (Shape{1, 6}));

  DCPP_ASSERT_OK_AND_ASSIGN(auto leaves, a.Leaves());
  ASSERT_EQ(leaves.size(), 4u);
  EXPECT_EQ(leaves[2].key, "col");
  EXPECT_TRUE(leaves[2].is_tensor);
  EXPECT_EQ(leaves[2].tensor.storage_key, "0");
  EXPECT_EQ(leaves[2].tensor.storage_offset, 2);
  EXPECT_FALSE(leaves[3].tensor.is_contiguous());
}

TEST(TorchSaveTest, LoneViewsAreCompactedUnlessTheyCoverTheirStorage) {
  const Tensor big = PatternTensor(DType::kInt32, {10});
  const Tensor tail = View(big, {7}, {1}, 3);  // big[3:], alone in the tree
  const Tensor w = PatternTensor(DType::kFloat64, {3, 5});
  const Tensor wt = View(w, {5, 3}, {1, 5}, 0);  // w.t(): covers its storage exactly
  const Tensor scalar = PatternTensor(DType::kFloat16, {});
  const Value v =
      Value::MakeList({Value::FromTensor(tail), Value::FromTensor(wt), Value::FromTensor(scalar)});
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v));
  MemorySource source(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  EXPECT_EQ(a.records().at("data/0").size, 28u);
  EXPECT_EQ(a.records().at("data/1").size, 120u);
  EXPECT_EQ(a.records().at("data/2").size, 2u);
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, a.ReadValue());
  EXPECT_TRUE(back == v);
  EXPECT_EQ(back.items()[0].tensor().storage_offset(), 0);
  EXPECT_EQ(back.items()[1].tensor().strides(), (Shape{1, 5}));
  EXPECT_EQ(back.items()[2].tensor().shape(), Shape{});
}

TEST(TorchSaveTest, TensorsViewingOneStorageAsTwoDTypesAreRejected) {
  const Tensor f = PatternTensor(DType::kFloat32, {4});
  const Tensor i = *Tensor::FromStorage(f.storage(), DType::kInt32, {4});
  const Value v = Value::MakeList({Value::FromTensor(f), Value::FromTensor(i)});
  EXPECT_THAT(
      EncodeTorchSave(v).status(),
      StatusIs(StatusCode::kInvalidArgument, AllOf(HasSubstr("float32"), HasSubstr("int32"))));
}

TEST(TorchSaveTest, PlainValueTreesRoundTrip) {
  Value::Dict int_keys;
  int_keys.emplace_back(Value::Int(1), Value::Str("one"));
  int_keys.emplace_back(Value::Int(-2), Value::Str("minus two"));
  const Value v = Dict({
      {"none", Value::None()},
      {"flags", Value::MakeList({Value::Bool(true), Value::Bool(false)})},
      {"ints", Value::MakeList({Value::Int(0), Value::Int(255), Value::Int(256), Value::Int(-1),
                                Value::Int(65536), Value::Int(int64_t{1} << 40),
                                Value::Int(INT64_MIN), Value::Int(INT64_MAX)})},
      {"floats", Value::MakeList({Value::Float(0.1), Value::Float(-2.5), Value::Float(1e300)})},
      {"str", Value::Str("h\xc3\xa9llo \xe2\x9c\x93")},
      {"empty_str", Value::Str("")},
      {"bytes", Value::Bytes(std::string("\x00\x01\xff\x80z", 5))},
      {"empty_bytes", Value::Bytes("")},
      {"tuple", Value::MakeTuple({Value::Int(1), Value::MakeTuple({Value::None()})})},
      {"empty", Dict({{"list", Value::MakeList()},
                      {"tuple", Value::MakeTuple()},
                      {"dict", Value::MakeDict()}})},
      {"od", Dict({{"z", Value::Int(1)}, {"a", Value::Int(2)}}, /*ordered=*/true)},
      {"int_keys", Value::MakeDict(int_keys)},
      {"layers", Value::MakeList(
                     {Dict({{"w", Value::FromTensor(PatternTensor(DType::kBFloat16, {2, 3}))}})})},
  });
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v));
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, Decode(bytes));
  EXPECT_TRUE(back == v) << back.DebugString();
  EXPECT_TRUE(back.Find("od")->is_ordered_dict());
  EXPECT_FALSE(back.is_ordered_dict());
  EXPECT_TRUE(back.Find("tuple")->is_tuple());

  MemorySource source(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  DCPP_ASSERT_OK_AND_ASSIGN(auto leaves, a.Leaves());
  std::vector<std::string> keys;
  for (const auto& l : leaves) keys.push_back(l.key);
  EXPECT_THAT(keys, ElementsAre("none", "flags", "ints", "floats", "str", "empty_str", "bytes",
                                "empty_bytes", "tuple", "empty.list", "empty.tuple", "empty.dict",
                                "od.z", "od.a", "int_keys.1", "int_keys.-2", "layers.0.w"));
  EXPECT_TRUE(leaves.back().is_tensor);
  EXPECT_EQ(leaves.back().tensor.dtype, DType::kBFloat16);
  EXPECT_TRUE(leaves[2].value == *v.Find("ints"));
}

TEST(TorchSaveTest, RootTensorAndReadTensorIntoReadOnlyWhatIsNeeded) {
  const Tensor t = PatternTensor(DType::kFloat32, {6, 8}, 3);
  const Tensor stored_t = View(PatternTensor(DType::kInt16, {8, 6}, 4), {6, 8}, {1, 6}, 0);
  for (const Tensor& src : {t, stored_t}) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(Value::FromTensor(src)));
    MemorySource source(bytes);
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveTensorRef ref, a.RootTensor());
    EXPECT_EQ(ref.shape, (Shape{6, 8}));
    EXPECT_EQ(ref.strides, src.strides());
    EXPECT_EQ(ref.record_offset, a.records().at("data/0").data_offset);
    EXPECT_EQ(ref.nbytes(), src.nbytes());

    // Whole rows into whole rows (contiguous on both sides) and a column block (strided).
    struct Case {
      Shape src_off, dst_off, sizes, dst_shape;
    };
    for (const Case& c :
         {Case{{2, 0}, {1, 0}, {3, 8}, {5, 8}}, Case{{1, 3}, {0, 2}, {4, 2}, {4, 5}},
          Case{{0, 0}, {0, 0}, {6, 8}, {6, 8}}, Case{{5, 7}, {0, 0}, {1, 1}, {1, 1}},
          Case{{3, 3}, {0, 0}, {0, 2}, {1, 2}}}) {
      Tensor dst = Tensor::Zeros(src.dtype(), c.dst_shape);
      Tensor expected = Tensor::Zeros(src.dtype(), c.dst_shape);
      ASSERT_THAT(CopyRegion(expected.view(), c.dst_off, src.view(), c.src_off, c.sizes), IsOk());
      ASSERT_THAT(a.ReadTensorInto(ref, c.src_off, dst.view(), c.dst_off, c.sizes), IsOk());
      EXPECT_TRUE(dst.BitwiseEqual(expected)) << ShapeToString(c.src_off);
    }
    Tensor dst = Tensor::Zeros(src.dtype(), {2, 2});
    EXPECT_THAT(a.ReadTensorInto(ref, {5, 0}, dst.view(), {0, 0}, {2, 2}),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("outside")));
    Tensor wrong = Tensor::Zeros(DType::kFloat64, {2, 2});
    EXPECT_THAT(a.ReadTensorInto(ref, {0, 0}, wrong.view(), {0, 0}, {2, 2}),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("float64")));
  }
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(Value::MakeList()));
  MemorySource source(bytes, "list.pt");
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  EXPECT_THAT(a.RootTensor().status(), StatusIs(StatusCode::kInvalidArgument,
                                                AllOf(HasSubstr("list.pt"), HasSubstr("list"))));
}

TEST(TorchSaveTest, BigEndianArchivesAreSwapped) {
  const Tensor i32 = PatternTensor(DType::kInt32, {3, 2}, 5);
  const Tensor c64 = PatternTensor(DType::kComplex64, {2}, 6);
  const Value v = Value::MakeList({Value::FromTensor(i32), Value::FromTensor(c64)});
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(v));
  auto records = Records(bytes);
  for (auto& [name, data] : records) {
    if (name == "byteorder") data = "big";
    const size_t unit = name == "data/0" ? 4 : name == "data/1" ? 4 : 0;
    for (size_t i = 0; unit && i + unit <= data.size(); i += unit) {
      std::reverse(data.begin() + i, data.begin() + i + unit);
    }
  }
  const std::string swapped = MakeArchive(records);
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, Decode(swapped));
  EXPECT_TRUE(back == v);
  MemorySource source(swapped);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  EXPECT_TRUE(a.big_endian());
  DCPP_ASSERT_OK_AND_ASSIGN(auto leaves, a.Leaves());
  Tensor dst = Tensor::Zeros(DType::kInt32, {3, 2});
  ASSERT_THAT(a.ReadTensorInto(leaves[0].tensor, {0, 0}, dst.view(), {0, 0}, {3, 2}), IsOk());
  EXPECT_TRUE(dst.BitwiseEqual(i32));
}

TEST(TorchSaveTest, EmbeddedArchiveOffsetsAreRelative) {
  StringSink sink;
  ASSERT_THAT(sink.Write("0123456789", 10), IsOk());
  const Value v = Value::FromTensor(PatternTensor(DType::kUInt8, {100}));
  ASSERT_THAT(WriteTorchSave(v, sink), IsOk());
  const std::string all = sink.Release();
  MemorySource whole(all);
  SubSource blob(whole, 10, all.size() - 10);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(blob));
  EXPECT_EQ(a.records().at("data/0").data_offset % 64, 0u);
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, a.ReadValue());
  EXPECT_TRUE(back == v);
}

TEST(TorchSaveTest, UnsupportedValuesAreRejectedByName) {
  ShardedTensor st;
  st.global_shape = {4};
  EXPECT_THAT(EncodeTorchSave(Dict({{"a", Dict({{"b", Value::FromSharded(st)}})}})).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("a.b")));
  EXPECT_THAT(EncodeTorchSave(Value::MakeList({Value::FromOpaque({"", "builtins.set"})})).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("builtins.set")));
  TorchSaveWriteOptions bad;
  bad.archive_name = "a/b";
  EXPECT_THAT(EncodeTorchSave(Value::None(), bad).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("a/b")));
}

// ---- hostile or broken archives ----

std::string Pickle(const PickleRef& root) {
  auto bytes = WritePickle(*root);
  EXPECT_THAT(bytes.status(), IsOk());
  return *bytes;
}

PickleRef RebuildV2(const std::string& storage_class, const std::string& key, int64_t numel,
                    int64_t offset, Shape shape, Shape stride) {
  PickleValue::Items size_items, stride_items;
  for (int64_t s : shape) size_items.push_back(PickleValue::Int(s));
  for (int64_t s : stride) stride_items.push_back(PickleValue::Int(s));
  return PickleValue::Call(
      PickleValue::MakeGlobal("torch._utils", "_rebuild_tensor_v2"),
      PickleValue::Tuple(
          {PickleValue::PersistentId(PickleValue::Tuple(
               {PickleValue::Str("storage"), PickleValue::MakeGlobal("torch", storage_class),
                PickleValue::Str(key), PickleValue::Str("cpu"), PickleValue::Int(numel)})),
           PickleValue::Int(offset), PickleValue::Tuple(std::move(size_items)),
           PickleValue::Tuple(std::move(stride_items)), PickleValue::Bool(false),
           PickleValue::Call(PickleValue::MakeGlobal("collections", "OrderedDict"),
                             PickleValue::Tuple())}));
}

TEST(TorchSaveTest, CorruptDataPklIsDataLossNamingIt) {
  for (const std::string& pkl :
       {std::string("\x80\x02]q\x00(K\x01", 8), std::string("garbage"), std::string()}) {
    const std::string bytes = MakeArchive({{"data.pkl", pkl}, {"version", "3\n"}});
    MemorySource source(bytes, "bad.pt");
    EXPECT_THAT(
        TorchSaveArchive::Open(source).status(),
        StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("bad.pt"), HasSubstr("archive/data.pkl"))));
  }
}

TEST(TorchSaveTest, MissingRecordsAreDataLoss) {
  DCPP_ASSERT_OK_AND_ASSIGN(
      std::string good, EncodeTorchSave(Value::FromTensor(PatternTensor(DType::kFloat32, {3}))));
  auto without = [&](const std::string& drop) {
    std::vector<std::pair<std::string, std::string>> kept;
    for (auto& r : Records(good)) {
      if (r.first != drop) kept.push_back(r);
    }
    return MakeArchive(kept);
  };
  EXPECT_THAT(Decode(without("data/0")).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("archive/data/0")));
  EXPECT_THAT(Decode(without("version")).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("version")));
  EXPECT_THAT(Decode(without("data.pkl")).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("data.pkl")));
}

TEST(TorchSaveTest, TensorsPastTheirStorageAreDataLossNamingTheRecord) {
  const std::string data(16, 'x');  // 4 float32
  // The persistent id claims more elements than the record holds.
  {
    const std::string bytes =
        MakeArchive({{"data.pkl", Pickle(RebuildV2("FloatStorage", "0", 5, 0, {5}, {1}))},
                     {"data/0", data},
                     {"version", "3\n"}});
    EXPECT_THAT(
        Decode(bytes).status(),
        StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("archive/data/0"), HasSubstr("16 bytes"))));
  }
  // The tensor's extent (offset + strides) reaches past its storage.
  for (auto [offset, shape, stride] : {std::tuple<int64_t, Shape, Shape>{1, {4}, {1}},
                                       {0, {2, 2}, {3, 1}},
                                       {4, {1}, {1}},
                                       {0, {2}, {int64_t{1} << 61}}}) {
    const std::string bytes =
        MakeArchive({{"data.pkl", Pickle(RebuildV2("FloatStorage", "0", 4, offset, shape, stride))},
                     {"data/0", data},
                     {"version", "3\n"}});
    EXPECT_THAT(Decode(bytes).status(), StatusIs(StatusCode::kDataLoss, HasSubstr("data/0")))
        << ShapeToString(shape);
    MemorySource source(bytes);
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
    EXPECT_THAT(a.Leaves().status(), StatusIs(StatusCode::kDataLoss, HasSubstr("data")));
  }
  // Negative geometry, and a stored shape of mismatched rank.
  for (auto [offset, shape, stride] : {std::tuple<int64_t, Shape, Shape>{-1, {1}, {1}},
                                       {0, {-1}, {1}},
                                       {0, {2}, {-1}},
                                       {0, {2, 1}, {1}},
                                       {0, {int64_t{1} << 62, 2}, {0, 0}}}) {
    const std::string bytes =
        MakeArchive({{"data.pkl", Pickle(RebuildV2("FloatStorage", "0", 4, offset, shape, stride))},
                     {"data/0", data},
                     {"version", "3\n"}});
    EXPECT_THAT(Decode(bytes).status(), StatusIs(StatusCode::kDataLoss, HasSubstr("data.pkl")));
  }
  // Empty tensors need no bytes, whatever their offset.
  const std::string empty =
      MakeArchive({{"data.pkl", Pickle(RebuildV2("FloatStorage", "0", 0, 0, {0, 3}, {3, 1}))},
                   {"data/0", ""},
                   {"version", "3\n"}});
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, Decode(empty));
  EXPECT_EQ(back.tensor().shape(), (Shape{0, 3}));
}

TEST(TorchSaveTest, VersionsAndByteOrderAreChecked) {
  const std::string pkl = Pickle(PickleValue::Int(1));
  EXPECT_THAT(Decode(MakeArchive({{"data.pkl", pkl}, {"version", "99\n"}})).status(),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("99")));
  EXPECT_THAT(Decode(MakeArchive({{"data.pkl", pkl}, {"version", "x"}})).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("version")));
  EXPECT_THAT(Decode(MakeArchive({{"data.pkl", pkl}, {"version", "3\n"}, {"byteorder", "middle"}}))
                  .status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("middle")));
  DCPP_ASSERT_OK_AND_ASSIGN(Value v,
                            Decode(MakeArchive({{"data.pkl", pkl}, {".data/version", "6\n"}})));
  EXPECT_EQ(v.as_int(), 1);
}

TEST(TorchSaveTest, ObjectsThatAreNotPlainDataAreNamed) {
  const std::string pkl =
      Pickle(PickleValue::List({PickleValue::Set({PickleValue::Int(1)}), PickleValue::Int(2)}));
  const std::string bytes = MakeArchive({{"data.pkl", pkl}, {"version", "3\n"}});
  EXPECT_THAT(Decode(bytes).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("builtins.set")));
  DCPP_ASSERT_OK_AND_ASSIGN(Value v, Decode(bytes, /*opaque=*/true));
  ASSERT_TRUE(v.items()[0].is_opaque());
  EXPECT_EQ(v.items()[0].opaque().type_name, "builtins.set");
  EXPECT_EQ(v.items()[1].as_int(), 2);
}

TEST(TorchSaveTest, SharedSubtreesCannotExpandWithoutBound) {
  // Each level is a list holding the previous one twice: 2^60 values when expanded.
  std::string pkl(
      "\x80\x02]q\x00(K\x01K\x02"
      "e0",
      12);  // ... APPENDS POP
  for (int level = 1; level <= 60; ++level) {
    pkl += "]q";
    pkl.push_back(static_cast<char>(level));
    pkl += "(h";
    pkl.push_back(static_cast<char>(level - 1));
    pkl += "h";
    pkl.push_back(static_cast<char>(level - 1));
    pkl += level < 60 ? "e0" : "e";
  }
  pkl += ".";
  const std::string bytes = MakeArchive({{"data.pkl", pkl}, {"version", "3\n"}});
  EXPECT_THAT(Decode(bytes).status(), StatusIs(StatusCode::kDataLoss, HasSubstr("too many")));
  MemorySource source(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  EXPECT_THAT(a.Leaves().status(), StatusIs(StatusCode::kDataLoss, HasSubstr("too many")));
}

TEST(TorchSaveTest, LegacyAndForeignFilesAreRecognized) {
  const std::string legacy(
      "\x80\x02\x8a\x0al\xfc\x9c"
      "F\xf9 j\xa8P\x19.",
      16);
  MemorySource s1(legacy, "old.pt");
  EXPECT_THAT(
      TorchSaveArchive::Open(s1).status(),
      StatusIs(StatusCode::kUnimplemented, AllOf(HasSubstr("old.pt"), HasSubstr("legacy"))));
  StringSink sink;
  internal::ZipWriter w(sink);
  ASSERT_THAT(w.AddRecord("toplevel.txt", "x", 1), IsOk());
  ASSERT_THAT(w.Finish(), IsOk());
  MemorySource s2(sink.str(), "plain.zip");
  EXPECT_THAT(TorchSaveArchive::Open(s2).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("not a torch.save archive")));
}

TEST(TorchSaveTest, FlippedTensorByteFailsChecksums) {
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes,
                            EncodeTorchSave(Value::FromTensor(PatternTensor(DType::kInt64, {8}))));
  MemorySource clean(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a0, TorchSaveArchive::Open(clean));
  bytes[a0.records().at("data/0").data_offset + 3] ^= 0x10;
  MemorySource source(bytes, "flip.pt");
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(source));
  EXPECT_THAT(a.VerifyChecksums(), StatusIs(StatusCode::kDataLoss,
                                            AllOf(HasSubstr("archive/data/0"), HasSubstr("CRC"))));
}

}  // namespace
}  // namespace dcpp
