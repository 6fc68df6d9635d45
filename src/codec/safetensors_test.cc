#include "codec/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "dcpp/chunk.h"
#include "testing/testing.h"

namespace dcpp::safetensors {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

// A source without Peek, like a file.
class NoPeekSource final : public ByteSource {
 public:
  explicit NoPeekSource(std::string bytes) : bytes_(std::move(bytes)), mem_(bytes_, "file") {}
  uint64_t size() const override { return mem_.size(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    ++reads;
    read_bytes += n;
    return mem_.ReadAt(offset, dst, n);
  }
  std::string name() const override { return "file"; }
  mutable int reads = 0;
  mutable uint64_t read_bytes = 0;

 private:
  std::string bytes_;
  MemorySource mem_;
};

std::string File(const std::string& json, size_t data) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  return out + json + std::string(data, '\0');
}

TEST(SafetensorsDtypeTest, EveryDtypeRoundTripsByName) {
  for (int i = 0; i < kNumDtypes; ++i) {
    const auto d = static_cast<Dtype>(i);
    auto back = DtypeFromName(DtypeName(d));
    ASSERT_THAT(back.status(), IsOk());
    EXPECT_EQ(*back, d);
    if (auto t = ToTorchDType(d)) {
      EXPECT_EQ(static_cast<int>(ElementSize(*t)) * 8, DtypeBits(d)) << DtypeName(d);
      EXPECT_EQ(*FromTorchDType(*t), d);
    }
  }
  EXPECT_EQ(DtypeBits(Dtype::kF4), 4);
  EXPECT_EQ(DtypeBits(Dtype::kF6_E3M2), 6);
  EXPECT_THAT(FromTorchDType(DType::kComplex128).status(),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
  EXPECT_THAT(DtypeFromName("F128").status(), StatusIs(StatusCode::kInvalidArgument, ::testing::_));
}

TEST(SafetensorsHeaderTest, LayoutEncodeAndReadBack) {
  auto h = LayoutHeader({{"b", Dtype::kBF16, {3}},
                         {"a", Dtype::kF32, {2, 2}},
                         {"z", Dtype::kU8, {0}},
                         {"f4", Dtype::kF4, {2, 3}}},
                        {{"format", "pt"}});
  ASSERT_THAT(h.status(), IsOk());
  // Crate order: widest dtype first, then name.
  ASSERT_EQ(h->tensors.size(), 4u);
  EXPECT_EQ(h->tensors[0].name, "a");
  EXPECT_EQ(h->tensors[1].name, "b");
  EXPECT_EQ(h->tensors[3].name, "f4");
  EXPECT_EQ(h->tensors[3].nbytes(), 3u);
  std::string bytes = EncodeHeader(*h);
  EXPECT_EQ(bytes.size() % 8, 0u);
  EXPECT_EQ(bytes.substr(8, 16), "{\"__metadata__\":");
  bytes += std::string(h->data_size, '\x01');
  MemorySource src(bytes, "t.safetensors");
  auto back = ReadHeader(src);
  ASSERT_THAT(back.status(), IsOk());
  EXPECT_EQ(back->data_start(), h->data_start());
  ASSERT_NE(back->Find("b"), nullptr);
  EXPECT_EQ(back->Find("b")->dtype, Dtype::kBF16);
  EXPECT_EQ(back->Find("b")->shape, Shape({3}));
  ASSERT_NE(back->FindMetadata("format"), nullptr);
  EXPECT_EQ(*back->FindMetadata("format"), "pt");
  EXPECT_EQ(back->Find("nope"), nullptr);
}

TEST(SafetensorsHeaderTest, LayoutRefusesDuplicatesAndPartialBytes) {
  EXPECT_THAT(LayoutHeader({{"a", Dtype::kF32, {1}}, {"a", Dtype::kF32, {1}}}, {}).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("duplicate")));
  EXPECT_THAT(LayoutHeader({{"a", Dtype::kF4, {3}}}, {}).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("whole byte")));
  EXPECT_THAT(LayoutHeader({{"__metadata__", Dtype::kF32, {1}}}, {}).status(),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
}

TEST(SafetensorsHeaderTest, HostileHeadersFailWithClearErrors) {
  struct Case {
    std::string file;
    std::string error;
  };
  const std::string ok_tensor = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<Case> cases = {
      {"abc", "too short"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "exceeds the limit"},
      {std::string("\x40\0\0\0\0\0\0\0", 8) + "{}", "longer than the file"},
      {File("{", 0), "invalid JSON"},
      {File("[]", 0), "not a JSON object"},
      {File("{\"a\xff\":1}", 0), "invalid JSON"},  // not UTF-8
      {File("{" + ok_tensor + "," + ok_tensor + "}", 16), "duplicate key \"a\""},
      {File(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
       "duplicate key \"dtype\""},
      {File(R"({"a":{"dtype":"Q8","shape":[2],"data_offsets":[0,8]}})", 8), "unknown"},
      {File(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {File(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "list of sizes"},
      {File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "end before"},
      {File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), "past the data"},
      {File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12), "cover 8 bytes"},
      {File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "hole of 4"},
      {File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            8),
       "overlaps"},
      {File(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8),
       "overflows"},
      {File(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2), "whole number"},
      {File(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "needs \"dtype\""},
      {File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "pair of offsets"},
      {File(R"({"__metadata__":{"k":1}})", 0), "is not a string"},
      {File(R"({"a":7})", 0), "not an object"},
  };
  for (const auto& c : cases) {
    MemorySource src(c.file, "evil.safetensors");
    auto h = ReadHeader(src);
    EXPECT_THAT(h.status(), StatusIs(StatusCode::kDataLoss, HasSubstr(c.error)))
        << c.file.substr(std::min<size_t>(8, c.file.size()));
    if (!h.ok()) {
      EXPECT_THAT(std::string(h.status().message()), HasSubstr("evil.safetensors"));
    }
  }
  // A header limit scaled down for the test.
  const std::string small_file = File("{}      ", 0);
  MemorySource small(small_file, "f");
  EXPECT_THAT(ReadHeader(small, 4).status(), StatusIs(StatusCode::kDataLoss, ::testing::_));
  EXPECT_THAT(ReadHeader(small).status(), IsOk());
}

TEST(SafetensorsHeaderTest, AcceptsEmptyNullMetadataAndZeroSizedTensors) {
  const std::string fa = File(R"({"__metadata__":null})", 0);
  MemorySource a(fa, "a");
  EXPECT_THAT(ReadHeader(a).status(), IsOk());
  const std::string fb = File(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},)"
                              R"("f":{"dtype":"I8","shape":[],"data_offsets":[0,1]}})",
                              1);
  MemorySource b(fb, "b");
  auto h = ReadHeader(b);
  ASSERT_THAT(h.status(), IsOk());
  EXPECT_EQ(h->tensors.size(), 2u);
}

TEST(SafetensorsBoxTest, ContiguousBoxesTileInOrder) {
  for (const Shape& shape : {Shape{7, 5, 3}, Shape{1000}, Shape{3, 1000}, Shape{}, Shape{4, 0}}) {
    for (uint64_t max : {1, 8, 40, 100, 1 << 20}) {
      int64_t expect_next = 0;
      const Shape strides = ContiguousStrides(shape);
      Status s = ForEachContiguousBox(shape, 2, max, [&](const Shape& off, const Shape& size) {
        int64_t linear = 0;
        for (size_t d = 0; d < off.size(); ++d) linear += off[d] * strides[d];
        EXPECT_EQ(linear, expect_next);
        const int64_t n = NumElements(size);
        EXPECT_LE(static_cast<uint64_t>(n) * 2, std::max<uint64_t>(max, 2));
        // Dense: a row-major box of these sizes is contiguous in the whole tensor.
        TensorView v(nullptr, DType::kInt16, size, strides);
        EXPECT_TRUE(n <= 1 || v.is_contiguous());
        expect_next += n;
        return Status::Ok();
      });
      EXPECT_THAT(s, IsOk());
      EXPECT_EQ(expect_next, NumElements(shape));
    }
  }
}

TEST(SafetensorsBoxTest, WriteTransposedAndReadBoxesBack) {
  // 6x10 int32 values, saved from a transposed (non-contiguous) view.
  Tensor base = Tensor::Zeros(DType::kInt32, {10, 6});
  for (int64_t i = 0; i < 60; ++i) base.data_as<int32_t>()[i] = static_cast<int32_t>(i);
  TensorView t(base.data(), DType::kInt32, {6, 10}, {1, 6});
  StringSink sink;
  sink.Write("prefix", 6).ThrowIfError();
  ASSERT_THAT(WriteTensorData(sink, t), IsOk());
  NoPeekSource file(sink.str());
  // Element (r, c) of the 6x10 tensor is base[c][r] = c * 6 + r.
  for (const auto& [off, size] : std::vector<std::pair<Shape, Shape>>{
           {{0, 0}, {6, 10}}, {{1, 3}, {4, 2}}, {{5, 0}, {1, 10}}, {{0, 9}, {6, 1}}}) {
    Tensor dst = Tensor::Zeros(DType::kInt32, {size[0] + 1, size[1] + 1});
    ASSERT_THAT(ReadBoxInto(file, 6, DType::kInt32, {6, 10}, off, dst.view(), {1, 1}, size),
                IsOk());
    for (int64_t r = 0; r < size[0]; ++r) {
      for (int64_t c = 0; c < size[1]; ++c) {
        EXPECT_EQ(dst.data_as<int32_t>()[(r + 1) * (size[1] + 1) + c + 1],
                  (off[1] + c) * 6 + off[0] + r);
      }
    }
  }
  Tensor dst = Tensor::Zeros(DType::kInt32, {2, 2});
  EXPECT_THAT(ReadBoxInto(file, 6, DType::kInt32, {6, 10}, {5, 9}, dst.view(), {0, 0}, {2, 2}),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
  Tensor wrong = Tensor::Zeros(DType::kFloat32, {2, 2});
  EXPECT_THAT(ReadBoxInto(file, 6, DType::kInt32, {6, 10}, {0, 0}, wrong.view(), {0, 0}, {2, 2}),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
  EXPECT_THAT(ReadBoxInto(file, 100, DType::kInt32, {6, 10}, {0, 0}, dst.view(), {0, 0}, {2, 2}),
              StatusIs(StatusCode::kDataLoss, ::testing::_));
}

TEST(SafetensorsJsonTest, PythonStyleStrings) {
  EXPECT_EQ(PythonJsonString("a.b"), "\"a.b\"");
  EXPECT_EQ(PythonJsonString("\xc3\xa9\""), "\"\\u00e9\\\"\"");
}

}  // namespace
}  // namespace dcpp::safetensors
