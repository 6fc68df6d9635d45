// The decode budget (codec/decode_budget.h) against real files: what PyTorch and dcpp write
// expands far less than the bound, decodes exactly as it does without one, and both decoders
// charge it the same amounts (each accepts at the file's cost and refuses one unit below it).
#include <iostream>
#include <limits>

#include "codec/decode_budget.h"
#include "codec/metadata_reader.h"
#include "dcpp/metadata.h"
#include "testing/sanitizers.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using internal::DecodeBudget;
using internal::DecodedCost;
using internal::DecodeMetadataDirect;
using internal::DecodeMetadataTree;
using internal::MetadataDifference;

constexpr uint64_t kUnbounded = std::numeric_limits<uint64_t>::max();

struct File {
  std::string name;
  std::string bytes;
};

std::vector<File> PyTorchAndSeedFiles() {
  const std::string root = ::dcpp::testing::SourceDir();
  std::vector<File> files;
  for (const auto& p : ::dcpp::testing::MetadataGoldenPaths()) {
    auto bytes = ::dcpp::testing::ReadFileBytes(p);
    EXPECT_TRUE(bytes.ok()) << p;
    if (bytes.ok()) files.push_back({p.substr(root.size() + 1), std::move(*bytes)});
  }
  return files;
}

// A checkpoint of `n` tensors of `rank` dimensions, each in `shards` chunks along dim 0, with
// planner data, storage entries for every chunk and StorageMeta, as a sharded save writes it.
Metadata Model(int n, int rank, int shards) {
  Metadata md;
  std::map<std::string, ObjectPath> planner;
  for (int i = 0; i < n; ++i) {
    const std::string fqn =
        "model.layers." + std::to_string(i / 8) + ".block" + std::to_string(i % 8) + ".weight";
    TensorStorageMetadata t;
    t.properties.dtype = i % 3 == 0 ? DType::kBFloat16 : DType::kFloat32;
    t.size = Shape(static_cast<size_t>(rank), 64);
    t.size[0] = 64 * shards;
    for (int s = 0; s < shards; ++s) {
      ChunkBox c{Shape(static_cast<size_t>(rank), 0), t.size};
      c.offsets[0] = 64 * s;
      c.sizes[0] = 64;
      const int64_t bytes = *CheckedNumBytes(t.properties.dtype, c.sizes);
      md.storage_data[MetadataIndex{fqn, c.offsets, std::nullopt}] =
          StorageInfo{"__" + std::to_string(s) + "_0.distcp", bytes * i, bytes, {}};
      t.chunks.push_back(std::move(c));
    }
    md.state_dict_metadata[fqn] = std::move(t);
    planner[fqn] = {std::string("model"), std::string("layers"), int64_t{i / 8},
                    "block" + std::to_string(i % 8), std::string("weight")};
  }
  md.state_dict_metadata["step"] = BytesStorageMetadata{};
  md.storage_data[MetadataIndex{"step", std::nullopt, std::nullopt}] =
      StorageInfo{"__0_0.distcp", 0, 16, {}};
  planner["step"] = {std::string("step")};
  md.planner_data = std::move(planner);
  md.storage_meta = StorageMeta{std::string("/ckpt/step_100"), std::string("save-1"), {}, {}};
  md.version = "1.0.0";
  return md;
}

std::vector<File> DcppFiles() {
  std::vector<File> files;
  // Under the sanitizers the two large files are an eighth as large: at full size the test took
  // over two minutes under ASan on a slow host (the unit tests' limit; 13 s without).
  const int scale = ::dcpp::testing::kSanitizer ? 8 : 1;
  for (auto [n, rank, shards, large] :
       {std::tuple{1, 1, 1, false}, std::tuple{200, 2, 1, false}, std::tuple{500, 3, 4, false},
        std::tuple{20000 / scale, 2, 1, true}, std::tuple{2000 / scale, 4, 8, true}}) {
    const Metadata md = Model(n, rank, shards);
    // Every flavor and protocol of the small ones; the large ones as PyTorch 2 and 1.13 read.
    for (auto flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch113Prototype}) {
      for (int protocol : {2, 4}) {
        if (large && (flavor == MetadataFlavor::kTorch2) != (protocol == 4)) continue;
        auto bytes = EncodeMetadata(md, {flavor, protocol});
        EXPECT_TRUE(bytes.ok());
        if (!bytes.ok()) continue;
        files.push_back({"dcpp " + std::to_string(n) + " tensors, " + std::to_string(rank) +
                             "-D, " + std::to_string(shards) + " shards, flavor " +
                             std::to_string(static_cast<int>(flavor)) + ", protocol " +
                             std::to_string(protocol),
                         std::move(*bytes)});
      }
    }
  }
  return files;
}

void ExpectWithinBudget(const File& f, double* max_ratio) {
  SCOPED_TRACE(f.name);
  // As without the bound: the same Metadata from both decoders.
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata unbounded, DecodeMetadataTree(f.bytes, kUnbounded));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata tree, DecodeMetadataTree(f.bytes));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata direct, DecodeMetadataDirect(f.bytes));
  EXPECT_EQ(MetadataDifference(unbounded, tree), "");
  EXPECT_EQ(MetadataDifference(unbounded, direct), "");
  DCPP_EXPECT_OK(ParseMetadata(f.bytes).status());

  const uint64_t cost = DecodedCost(tree);
  const double ratio = static_cast<double>(cost) / static_cast<double>(f.bytes.size());
  std::cout << f.name << ": " << f.bytes.size() << " bytes decode to " << cost << " units, "
            << ratio << "x\n";
  *max_ratio = std::max(*max_ratio, ratio);
  EXPECT_LT(ratio, DecodeBudget::kRatio / 8.0);

  // Both decoders charge exactly the file's cost (a path-form checkpoint id a few units more).
  constexpr uint64_t kPathSlack = 64;
  EXPECT_TRUE(DecodeMetadataDirect(f.bytes, cost + kPathSlack).ok());
  EXPECT_TRUE(DecodeMetadataTree(f.bytes, cost + kPathSlack).ok());
  EXPECT_FALSE(DecodeMetadataDirect(f.bytes, cost - 1).ok());
  EXPECT_FALSE(DecodeMetadataTree(f.bytes, cost - 1).ok());
}

TEST(MetadataBudgetTest, PyTorchFilesExpandFarLessThanTheBound) {
  const auto files = PyTorchAndSeedFiles();
  ASSERT_GE(files.size(), 9u);
  double max_ratio = 0;
  for (const auto& f : files) ExpectWithinBudget(f, &max_ratio);
  std::cout << "largest expansion " << max_ratio << "x of " << DecodeBudget::kRatio << "x\n";
}

TEST(MetadataBudgetTest, DcppFilesExpandFarLessThanTheBound) {
  const auto files = DcppFiles();
  ASSERT_EQ(files.size(), 16u);
  double max_ratio = 0;
  for (const auto& f : files) ExpectWithinBudget(f, &max_ratio);
  std::cout << "largest expansion " << max_ratio << "x of " << DecodeBudget::kRatio << "x\n";
}

TEST(MetadataBudgetTest, TheBoundIsTheRatioTimesTheSizePlusTheAllowance) {
  EXPECT_EQ(DecodeBudget::For(0), DecodeBudget::kAllowance);
  EXPECT_EQ(DecodeBudget::For(1000), 1000 * DecodeBudget::kRatio + DecodeBudget::kAllowance);
  DecodeBudget b(10, 100);
  EXPECT_TRUE(b.Take(60));
  EXPECT_FALSE(b.Take(41));  // refused whole: nothing taken
  EXPECT_TRUE(b.Take(40));
  EXPECT_FALSE(b.Take(1));
  EXPECT_EQ(b.left(), 0u);
}

}  // namespace
}  // namespace dcpp
