#include <cstring>

#include "dcpp/chunk.h"
#include "dcpp/dtype.h"
#include "dcpp/status.h"
#include "dcpp/tensor.h"
#include "dcpp/value.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

Result<int> Half(int x) {
  if (x % 2) return InvalidArgumentError("odd " + std::to_string(x));
  return x / 2;
}

Result<int> Quarter(int x) {
  DCPP_ASSIGN_OR_RETURN(int h, Half(x));
  DCPP_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(StatusTest, OkIsFreeAndErrorsCarryContext) {
  Status ok;
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.ToString(), "OK");
  Status s = DataLossError("bad crc").WithContext("reading \"__0_0.distcp\"");
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "reading \"__0_0.distcp\": bad crc");
  EXPECT_EQ(s.ToString(), "DATA_LOSS: reading \"__0_0.distcp\": bad crc");
}

TEST(StatusTest, ResultPropagates) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_THAT(Quarter(6), StatusIs(StatusCode::kInvalidArgument, HasSubstr("odd 3")));
  EXPECT_THROW(Quarter(6).value(), StatusError);
}

TEST(StatusTest, ErrnoMapping) {
  EXPECT_EQ(ErrnoToStatus(ENOENT, "open x").code(), StatusCode::kNotFound);
  EXPECT_EQ(ErrnoToStatus(ENOSPC, "write x").code(), StatusCode::kUnavailable);
  EXPECT_THAT(ErrnoToStatus(ENOSPC, "write x"),
              StatusIs(StatusCode::kUnavailable, HasSubstr("No space left")));
}

TEST(DTypeTest, NamesSizesAndStorageClassesRoundTrip) {
  for (int i = 0; i < kNumDTypes; ++i) {
    DType d = static_cast<DType>(i);
    EXPECT_EQ(*DTypeFromName(DTypeName(d)), d);
    EXPECT_EQ(*DTypeFromName("torch." + std::string(DTypeName(d))), d);
    if (!StorageClassName(d).empty()) {
      EXPECT_EQ(*DTypeFromStorageClass(StorageClassName(d)), d);
    }
    EXPECT_GE(ElementSize(d), 1u);
  }
  EXPECT_EQ(ElementSize(DType::kComplex128), 16u);
  EXPECT_EQ(ElementSize(DType::kComplex32), 4u);
  EXPECT_EQ(*DTypeFromName("half"), DType::kFloat16);
  EXPECT_EQ(StorageClassName(DType::kInt8), "CharStorage");
  EXPECT_EQ(StorageClassName(DType::kUInt16), "");
  EXPECT_THAT(DTypeFromName("float128"), StatusIs(StatusCode::kNotFound, HasSubstr("float128")));
}

TEST(TensorTest, ContiguityAndStorageBounds) {
  Tensor t = IotaTensor(DType::kFloat32, {2, 3});
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.strides(), (Shape{3, 1}));
  auto transposed = Tensor::FromStorage(t.storage(), DType::kFloat32, {3, 2}, {1, 3});
  DCPP_ASSERT_OK(transposed);
  EXPECT_FALSE(transposed->is_contiguous());
  Tensor c = transposed->Clone();
  EXPECT_TRUE(c.is_contiguous());
  // transposed[1][0] == t[0][1] == 1
  EXPECT_EQ(c.data_as<float>()[2], 1.0f);
  EXPECT_THAT(Tensor::FromStorage(t.storage(), DType::kFloat32, {2, 3}, {}, 1),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("bytes of storage")));
  Tensor scalar = Tensor::Zeros(DType::kInt64, {});
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.nbytes(), 8u);
  Tensor empty = Tensor::Zeros(DType::kFloat32, {0, 4});
  EXPECT_EQ(empty.nbytes(), 0u);
  EXPECT_TRUE(empty.BitwiseEqual(empty.Clone()));
}

TEST(ChunkTest, IntersectAndContain) {
  ChunkBox a{{0, 0}, {4, 4}}, b{{2, 3}, {4, 4}};
  auto i = Intersect(a, b);
  ASSERT_TRUE(i.has_value());
  EXPECT_EQ(*i, (ChunkBox{{2, 3}, {2, 1}}));
  EXPECT_FALSE(Intersect(a, ChunkBox{{4, 0}, {1, 4}}).has_value());
  EXPECT_TRUE(Intersect(ChunkBox{}, ChunkBox{}).has_value());  // 0-d
  EXPECT_TRUE(Contains(a, *i));
  EXPECT_FALSE(Contains(*i, a));
}

TEST(ChunkTest, CopyRegionBetweenStridedViews) {
  Tensor src = IotaTensor(DType::kFloat32, {4, 5});
  // Transposed destination: dst is a [5, 4] storage viewed as [4, 5] with strides [1, 4].
  Tensor dst_storage = Tensor::Zeros(DType::kFloat32, {5, 4});
  auto dst = *Tensor::FromStorage(dst_storage.storage(), DType::kFloat32, {4, 5}, {1, 4});
  DCPP_ASSERT_OK(CopyRegion(dst.view(), {1, 2}, src.view(), {0, 1}, {2, 3}));
  const float* d = dst_storage.data_as<float>();
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 5; ++c) {
      float expect =
          (r >= 1 && r < 3 && c >= 2 && c < 5) ? static_cast<float>((r - 1) * 5 + (c - 1)) : 0;
      EXPECT_EQ(d[c * 4 + r], expect) << r << "," << c;
    }
  }
  EXPECT_THAT(CopyRegion(dst.view(), {3, 0}, src.view(), {0, 0}, {2, 1}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("out of bounds")));
}

TEST(ValueTest, TreeEqualityAndPrinting) {
  Value v = Value::MakeDict();
  v.Set("w", Value::FromTensor(IotaTensor(DType::kFloat32, {2})));
  v.Set("meta", Value::MakeList({Value::Int(1), Value::Float(2.5), Value::Str("x"), Value()}));
  EXPECT_EQ(v.DebugString(), "{'w': tensor(float32[2]), 'meta': [1, 2.5, 'x', None]}");
  Value copy = v;
  EXPECT_EQ(copy, v);
  copy.Set("meta", Value::Bool(true));
  EXPECT_FALSE(copy == v);
  ASSERT_NE(v.Find("w"), nullptr);
  EXPECT_EQ(v.Find("nope"), nullptr);
}

// The key index of large dicts (Value::Set/Find) must answer exactly as a linear search of the
// entries would, whatever happened to the dict: Set, replacement, changes through dict(),
// copies, moves, repeated keys and keys that are not str.
TEST(ValueTest, LargeDictLookupsMatchALinearSearch) {
  auto linear = [](const Value& d, std::string_view key) -> const Value* {
    for (const auto& [k, v] : d.dict()) {
      if (k.is_str() && k.as_str() == key) return &v;
    }
    return nullptr;
  };
  auto expect_same = [&](const Value& d, int upto) {
    for (int i = -3; i < upto; ++i) {
      const std::string key = "k" + std::to_string(i);
      EXPECT_EQ(d.Find(key), linear(d, key)) << key;
    }
  };
  Value d = Value::MakeDict();
  for (int i = 0; i < 5000; ++i) d.Set("k" + std::to_string(i), Value::Int(i));
  ASSERT_EQ(d.dict().size(), 5000u);
  for (int i = 0; i < 5000; i += 7) d.Set("k" + std::to_string(i), Value::Int(-i));  // replace
  ASSERT_EQ(d.dict().size(), 5000u);
  const Value& cd = d;
  EXPECT_EQ(cd.Find("k14")->as_int(), -14);
  EXPECT_EQ(cd.Find("k15")->as_int(), 15);
  expect_same(d, 5100);

  // Keys changed through dict(): the index must not answer for the old keys.
  d.dict()[3].first = Value::Str("renamed");
  d.dict().emplace_back(Value::Int(7), Value::Str("int key"));       // not a str key
  d.dict().emplace_back(Value::Str("k10"), Value::Str("repeated"));  // the first one wins
  EXPECT_EQ(d.Find("k3"), nullptr);
  ASSERT_NE(d.Find("renamed"), nullptr);
  EXPECT_EQ(d.Find("renamed")->as_int(), 3);
  EXPECT_EQ(d.Find("k10")->as_int(), 10);
  d.Set("k3", Value::Int(33));  // appended again: "k3" was renamed away
  EXPECT_EQ(d.Find("k3")->as_int(), 33);
  EXPECT_EQ(d.dict().back().first.as_str(), "k3");
  expect_same(d, 5100);

  // Copies and moves answer alike, and each goes its own way after.
  Value copy = d;
  copy.Set("only-in-copy", Value::None());
  EXPECT_EQ(d.Find("only-in-copy"), nullptr);
  EXPECT_NE(copy.Find("only-in-copy"), nullptr);
  expect_same(copy, 5100);
  Value moved = std::move(copy);
  EXPECT_NE(moved.Find("only-in-copy"), nullptr);
  expect_same(moved, 5100);
  copy = d;  // assigned over a moved-from value
  expect_same(copy, 5100);
  // Assigned from one of its own entries.
  Value outer = Value::MakeDict();
  for (int i = 0; i < 40; ++i) outer.Set("k" + std::to_string(i), d);
  outer = *outer.Find("k5");
  EXPECT_EQ(outer.Find("k14")->as_int(), -14);
  expect_same(outer, 5100);
}

}  // namespace
}  // namespace dcpp
