#include "dcpp/dlpack.h"

#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::StatusIs;

TEST(DLPackTest, EveryDTypeWithACodeRoundTrips) {
  for (int i = 0; i < kNumDTypes; ++i) {
    DType d = static_cast<DType>(i);
    auto t = ToDLDataType(d);
    if (!t.ok()) {
      EXPECT_EQ(t.status().code(), StatusCode::kUnimplemented) << DTypeName(d);
      continue;
    }
    EXPECT_EQ(*FromDLDataType(*t), d) << DTypeName(d);
  }
  EXPECT_FALSE(ToDLDataType(DType::kFloat8_e4m3fn).ok());
  EXPECT_THAT(FromDLDataType(DLDataType{kDLFloat, 32, 4}),
              StatusIs(StatusCode::kUnimplemented, ::testing::HasSubstr("lanes")));
}

TEST(DLPackTest, ExportImportSharesMemoryAndReleasesOnce) {
  Tensor base = IotaTensor(DType::kFloat32, {3, 4});
  // A transposed view with a storage offset: strides and offset must survive.
  Tensor view = *Tensor::FromStorage(base.storage(), DType::kFloat32, {2, 3}, {1, 4}, 1);
  DCPP_ASSERT_OK_AND_ASSIGN(DLManagedTensor * m, ToDLPack(view));
  EXPECT_EQ(m->dl_tensor.ndim, 2);
  EXPECT_EQ(m->dl_tensor.strides[1], 4);
  EXPECT_EQ(m->dl_tensor.byte_offset, 4u);
  const long uses_before = base.storage().use_count();
  {
    DCPP_ASSERT_OK_AND_ASSIGN(Tensor back, FromDLPack(m));
    EXPECT_TRUE(back.BitwiseEqual(view));
    EXPECT_EQ(back.data(), view.data());                 // no copy
    EXPECT_EQ(base.storage().use_count(), uses_before);  // held by the export context
  }
  // The import released the DLManagedTensor, which released its reference.
  EXPECT_EQ(base.storage().use_count(), uses_before - 1);
}

TEST(DLPackTest, ForeignTensorIsAdopted) {
  static int deleted = 0;
  struct Foreign {
    std::vector<int64_t> data{1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3};
    DLManagedTensor m{};
  };
  auto* f = new Foreign;
  f->m.dl_tensor = DLTensor{f->data.data(), {kDLCPU, 0}, 2, {kDLInt, 64, 1}, f->shape, nullptr, 0};
  f->m.manager_ctx = f;
  f->m.deleter = [](DLManagedTensor* m) {
    delete static_cast<Foreign*>(m->manager_ctx);
    ++deleted;
  };
  {
    DCPP_ASSERT_OK_AND_ASSIGN(Tensor t, FromDLPack(&f->m));
    EXPECT_EQ(t.shape(), (Shape{2, 3}));
    EXPECT_EQ(t.data_as<int64_t>()[5], 6);
    Tensor copy = t;  // shares
    EXPECT_EQ(deleted, 0);
  }
  EXPECT_EQ(deleted, 1);
}

}  // namespace
}  // namespace dcpp
