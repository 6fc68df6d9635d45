// Safetensors interop with the real peers (tests/interop/safetensors_peer.py, run by the venv's
// Python): the safetensors package and PyTorch 2.x's HuggingFaceStorageWriter/Reader and
// consolidate_safetensors_files.
//   (a) Python safetensors writes every dtype both sides share; dcpp loads them; dcpp writes
//       them back and Python safetensors reads dcpp's file; both compare with values computed on
//       their own side (the byte pattern in safetensors_peer.py, mirrored in Pattern()).
//   (b) PyTorch's HF writer output (plain, 4-rank distributed, 4-rank consolidated) loads in dcpp,
//       whole and resharded; dcpp consolidates PyTorch's shards.
//   (c) dcpp's output (whole-tensor and 4-rank distributed) loads in PyTorch's
//       HuggingFaceStorageReader, and consolidate_safetensors_files accepts dcpp's shards.
//   (d) Hostile headers: dcpp and Python safetensors both refuse them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>

#include "codec/safetensors.h"
#include "dcpp/checkpoint.h"
#include "dcpp/chunk.h"
#include "dcpp/comm.h"
#include "dcpp/hf_storage.h"
#include "dcpp/storage.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::SourceDir;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

int RunPeer(const std::string& args) {
  const std::string cmd = "timeout 240 " + ::dcpp::testing::Torch2PythonPath() + " " + SourceDir() +
                          "/tests/interop/safetensors_peer.py " + args + " 2>&1";
  return std::system(cmd.c_str());
}

// safetensors_peer.py's pattern(): byte i = (i * 131 + seed * 17 + 7) % 256 (bool: & 1).
Tensor Pattern(DType dtype, const Shape& shape, int seed) {
  Tensor t = Tensor::Zeros(dtype, shape);
  auto* b = reinterpret_cast<uint8_t*>(t.data());
  for (size_t i = 0; i < t.nbytes(); ++i) {
    uint8_t v = static_cast<uint8_t>((i * 131 + seed * 17 + 7) % 256);
    b[i] = dtype == DType::kBool ? (v & 1) : v;
  }
  return t;
}

// The peer's DTYPES, in its order (the seed is the position).
const std::vector<DType>& SharedDtypes() {
  static const std::vector<DType> k = {DType::kFloat64,         DType::kFloat32,
                                       DType::kFloat16,         DType::kBFloat16,
                                       DType::kInt64,           DType::kInt32,
                                       DType::kInt16,           DType::kInt8,
                                       DType::kUInt8,           DType::kBool,
                                       DType::kFloat8_e4m3fn,   DType::kFloat8_e5m2,
                                       DType::kFloat8_e4m3fnuz, DType::kFloat8_e5m2fnuz,
                                       DType::kComplex64,       DType::kUInt16,
                                       DType::kUInt32,          DType::kUInt64};
  return k;
}

std::map<std::string, Tensor> AllDtypes() {
  std::map<std::string, Tensor> out;
  for (size_t k = 0; k < SharedDtypes().size(); ++k) {
    const DType d = SharedDtypes()[k];
    out["t_" + std::string(DTypeName(d))] = Pattern(d, {3, 4}, static_cast<int>(k));
  }
  return out;
}

std::map<std::string, Tensor> Model(bool float_only) {
  std::map<std::string, Tensor> m = {{"layers.0.w", Pattern(DType::kFloat32, {8, 6}, 1)},
                                     {"layers.0.b", Pattern(DType::kBFloat16, {6}, 2)},
                                     {"emb", Pattern(DType::kFloat16, {10, 4}, 3)}};
  if (!float_only) m["ids"] = Pattern(DType::kInt64, {8, 3}, 4);
  return m;
}

void ExpectEqual(const Value& sd, const std::map<std::string, Tensor>& want) {
  ASSERT_TRUE(sd.is_dict());
  EXPECT_EQ(sd.dict().size(), want.size());
  for (const auto& [k, t] : want) {
    const Value* v = sd.Find(k);
    ASSERT_NE(v, nullptr) << k;
    ASSERT_TRUE(v->is_tensor()) << k;
    EXPECT_TRUE(v->tensor().BitwiseEqual(t)) << k;
  }
}

Value LoadAll(StorageReader& reader) {
  Value sd = Value::MakeDict();
  Status s = Load(sd, reader);
  EXPECT_THAT(s, IsOk());
  return sd;
}

Value LoadAll(const std::string& path) {
  auto reader = HuggingFaceStorageReader::Open(path);
  EXPECT_THAT(reader.status(), IsOk());
  if (!reader.ok()) return Value::MakeDict();
  return LoadAll(**reader);
}

// Loads `path` on 3 thread ranks, each with a third of every tensor (rows, or columns for 2-D
// tensors other than layers.0.w), and checks the pieces.
void LoadResharded(const std::string& path, const std::map<std::string, Tensor>& want) {
  std::mutex mu;
  RunOnThreads(3, [&](Communicator& comm) {
    Value sd = Value::MakeDict();
    std::map<std::string, Shard> mine;
    for (const auto& [k, t] : want) {
      const int dim = t.dim() == 2 && k != "layers.0.w" ? 1 : 0;
      Shape off(t.dim(), 0), size = t.shape();
      off[dim] = t.shape()[dim] * comm.rank() / 3;
      size[dim] = t.shape()[dim] * (comm.rank() + 1) / 3 - off[dim];
      Shard s{off, Tensor::Zeros(t.dtype(), size)};
      mine[k] = s;
      sd.Set(k, Value::FromSharded({t.dtype(), t.shape(), {s}}));
    }
    auto reader = HuggingFaceStorageReader::Open(path, {.thread_count = 2});
    LoadOptions lo;
    lo.comm = &comm;
    Status st = reader.ok() ? Load(sd, **reader, lo) : reader.status();
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_THAT(st, IsOk());
    for (const auto& [k, s] : mine) {
      const Tensor& t = want.at(k);
      Tensor expect = Tensor::Zeros(t.dtype(), s.tensor.shape());
      ASSERT_THAT(
          CopyRegion(expect.view(), Shape(t.dim(), 0), t.view(), s.offsets, s.tensor.shape()),
          IsOk());
      EXPECT_TRUE(expect.BitwiseEqual(s.tensor)) << k << " rank " << comm.rank();
    }
  });
}

Value WholeDict(const std::map<std::string, Tensor>& m) {
  Value sd = Value::MakeDict();
  for (const auto& [k, t] : m) sd.Set(k, Value::FromTensor(t));
  return sd;
}

// 4 thread ranks save `m` distributed: layers.0.w by columns, the rest by rows.
void SaveDistributed(const std::string& dir, const std::map<std::string, Tensor>& m,
                     bool consolidate) {
  RunOnThreads(4, [&](Communicator& comm) {
    Value sd = Value::MakeDict();
    for (const auto& [k, t] : m) {
      const int dim = k == "layers.0.w" ? 1 : 0;
      Shape off(t.dim(), 0), size = t.shape();
      off[dim] = t.shape()[dim] * comm.rank() / 4;
      size[dim] = t.shape()[dim] * (comm.rank() + 1) / 4 - off[dim];
      Tensor piece = Tensor::Zeros(t.dtype(), size);
      EXPECT_THAT(CopyRegion(piece.view(), Shape(t.dim(), 0), t.view(), off, size), IsOk());
      sd.Set(k, Value::FromSharded({t.dtype(), t.shape(), {{off, piece}}}));
    }
    HuggingFaceWriterOptions options;
    options.save_distributed = true;
    options.enable_consolidation = consolidate;
    options.thread_count_consolidation = 2;
    auto writer = HuggingFaceStorageWriter::Open(dir, options);
    ASSERT_THAT(writer.status(), IsOk());
    SaveOptions so;
    so.comm = &comm;
    EXPECT_THAT(Save(sd, **writer, so).status(), IsOk());
  });
}

TEST(SafetensorsInteropTest, PythonSafetensorsAndDcppReadEachOthersFiles) {
  TempDir tmp;
  const std::string py_file = tmp.Join("py.safetensors");
  ASSERT_EQ(RunPeer("write-all-dtypes " + py_file), 0);
  ExpectEqual(LoadAll(py_file), AllDtypes());
  // The peer's metadata is kept as written.
  auto file = OpenStoreFile(py_file);
  ASSERT_THAT(file.status(), IsOk());
  auto src = file->store->OpenRead(file->key);
  ASSERT_THAT(src.status(), IsOk());
  auto header = safetensors::ReadHeader(**src);
  ASSERT_THAT(header.status(), IsOk());
  EXPECT_EQ(*header->FindMetadata("source"), "safetensors");

  // dcpp writes the same tensors; Python reads them, dcpp reads them back.
  const std::string out = tmp.Join("dcpp");
  auto writer = HuggingFaceStorageWriter::Open(out);
  ASSERT_THAT(writer.status(), IsOk());
  ASSERT_THAT(Save(WholeDict(AllDtypes()), **writer).status(), IsOk());
  ASSERT_EQ(RunPeer("read-all-dtypes " + out + "/model-00001-of-00001.safetensors"), 0);
  ExpectEqual(LoadAll(out), AllDtypes());
}

TEST(SafetensorsInteropTest, PyTorchPlainHfSaveLoadsInDcpp) {
  TempDir tmp;
  const std::string dir = tmp.Join("plain");
  ASSERT_EQ(RunPeer("torch-hf-save " + dir + " plain"), 0);
  ExpectEqual(LoadAll(dir), Model(false));
  LoadResharded(dir, Model(false));
  // The CLI sees the same.
  const std::string cmd = ::dcpp::testing::CliPath() + " diff " + dir + " " + dir;
  EXPECT_EQ(std::system(cmd.c_str()), 0);
}

TEST(SafetensorsInteropTest, PyTorchDistributedHfSaveLoadsInDcppAndDcppConsolidatesIt) {
  TempDir tmp;
  const std::string dir = tmp.Join("dist");
  ASSERT_EQ(RunPeer("torch-hf-save " + dir + " dist"), 0);
  ExpectEqual(LoadAll(dir), Model(false));
  LoadResharded(dir, Model(false));
  ConsolidateOptions c;
  c.thread_count = 2;
  c.window_bytes = 40;  // many windows, crossing the shards
  auto report = ConsolidateSafetensorsFiles(dir, tmp.Join("whole"), c);
  ASSERT_THAT(report.status(), IsOk());
  EXPECT_EQ(report->tensors, 4);
  ExpectEqual(LoadAll(tmp.Join("whole")), Model(false));
}

TEST(SafetensorsInteropTest, PyTorchConsolidatedHfSaveLoadsInDcpp) {
  TempDir tmp;
  const std::string dir = tmp.Join("cons");
  ASSERT_EQ(RunPeer("torch-hf-save " + dir + " cons"), 0);
  ExpectEqual(LoadAll(dir), Model(true));  // the consolidated files at the top
  ExpectEqual(LoadAll(dir + "/sharded"), Model(true));
  ConsolidateOptions c;
  c.fqn_to_index_mapping = {{"layers.0.w", 1}, {"layers.0.b", 2}, {"emb", 2}};
  ASSERT_THAT(ConsolidateSafetensorsFiles(dir + "/sharded", tmp.Join("ours"), c).status(), IsOk());
  ExpectEqual(LoadAll(tmp.Join("ours")), Model(true));
  EXPECT_TRUE(std::filesystem::exists(tmp.Join("ours/model-00002-of-00002.safetensors")));
}

TEST(SafetensorsInteropTest, DcppOutputLoadsInPyTorchAndItsConsolidation) {
  TempDir tmp;
  // Whole tensors in two files.
  const std::string plain = tmp.Join("plain");
  HuggingFaceWriterOptions options;
  options.fqn_to_index_mapping = {{"ids", 2}, {"emb", 2}};
  auto writer = HuggingFaceStorageWriter::Open(plain, options);
  ASSERT_THAT(writer.status(), IsOk());
  ASSERT_THAT(Save(WholeDict(Model(false)), **writer).status(), IsOk());
  ASSERT_EQ(RunPeer("torch-hf-load " + plain), 0);
  ASSERT_EQ(RunPeer("read-model " + plain), 0);

  // 4-rank distributed: PyTorch reads the shards and consolidates them; dcpp's own
  // consolidation (enable_consolidation) matches the unsharded truth.
  const std::string dist = tmp.Join("dist");
  SaveDistributed(dist, Model(true), /*consolidate=*/false);
  ASSERT_EQ(RunPeer("torch-hf-load " + dist + " float"), 0);
  ASSERT_EQ(RunPeer("torch-consolidate " + dist + " " + tmp.Join("torch_whole")), 0);
  const std::string cons = tmp.Join("cons");
  SaveDistributed(cons, Model(true), /*consolidate=*/true);
  ExpectEqual(LoadAll(cons), Model(true));
  ASSERT_EQ(RunPeer("read-model " + cons + " float"), 0);
  ASSERT_EQ(RunPeer("torch-hf-load " + cons + " float"), 0);
}

TEST(SafetensorsInteropTest, HostileHeadersAreRefusedByBothSides) {
  TempDir tmp;
  auto write = [&](const std::string& name, const std::string& json, size_t data) {
    std::string bytes(8, '\0');
    const uint64_t n = json.size();
    std::memcpy(bytes.data(), &n, 8);
    bytes += json + std::string(data, '\0');
    std::ofstream(tmp.Join(name), std::ios::binary) << bytes;
    return tmp.Join(name);
  };
  std::vector<std::string> files = {
      write("overlap.safetensors",
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            8),
      write("hole.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
      write("shape.safetensors", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
      write("past_end.safetensors", R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
            8),
      write("dtype.safetensors", R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8),
      write("json.safetensors", R"({"a":{"dtype":"F32","shape":[2],)", 8),
  };
  std::string all;
  for (const auto& f : files) {
    auto reader = HuggingFaceStorageReader::Open(f);
    ASSERT_THAT(reader.status(), IsOk());
    EXPECT_THAT((*reader)->ReadMetadata().status(), StatusIs(StatusCode::kDataLoss, HasSubstr(f)));
    all += " " + f;
  }
  EXPECT_EQ(RunPeer("expect-reject" + all), 0);
}

}  // namespace
}  // namespace dcpp

namespace dcpp {
namespace {

// An independent float8_e4m3fn decode: (-1)^s 2^(e-7) (1 + m/8), subnormal m 2^-9.
float DecodeE4m3(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  const double v = e == 0 ? m / 512.0 : std::pow(2.0, e - 7) * (1.0 + m / 8.0);
  return static_cast<float>(s ? -v : v);
}

TEST(SafetensorsInteropTest, QuantizedFp8LoadsLikePyTorchsQuantizedReader) {
  TempDir tmp;
  const std::string dir = tmp.Join("fp8"), ref = tmp.Join("ref");
  ASSERT_EQ(RunPeer("quant-make " + dir + " " + ref), 0);
  // The raw fp8 bytes and scales, through the plain reader.
  Value raw = LoadAll(dir);
  const Tensor& w = raw.Find("layers.0.mlp.weight")->tensor();
  const Tensor& scale = raw.Find("layers.0.mlp.weight_scale_inv")->tensor();
  ASSERT_EQ(w.dtype(), DType::kFloat8_e4m3fn);
  ASSERT_EQ(scale.shape(), Shape({3, 3}));
  Tensor expect = Tensor::Zeros(DType::kFloat32, {300, 260});
  for (int64_t r = 0; r < 300; ++r) {
    for (int64_t c = 0; c < 260; ++c) {
      const uint8_t b = reinterpret_cast<const uint8_t*>(w.data())[r * 260 + c];
      expect.data_as<float>()[r * 260 + c] =
          DecodeE4m3(b) * scale.data_as<float>()[(r / 128) * 3 + c / 128];
    }
  }
  for (DType target : {DType::kFloat32, DType::kBFloat16}) {
    const std::string name = target == DType::kFloat32 ? "float32" : "bfloat16";
    Value want = LoadAll(ref + "/ref_" + name + ".safetensors");
    if (target == DType::kFloat32) {
      EXPECT_TRUE(want.Find("layers.0.mlp.weight")->tensor().BitwiseEqual(expect));
    }
    // Everything as stored: weights come back dequantized to the target dtype.
    auto reader = QuantizedHuggingFaceStorageReader::Open(dir, {.target_dtype = target});
    ASSERT_THAT(reader.status(), IsOk());
    Value all = Value::MakeDict();
    ASSERT_THAT(Load(all, **reader), IsOk());
    for (const char* k : {"layers.0.mlp.weight", "layers.0.norm.weight"}) {
      EXPECT_TRUE(all.Find(k)->tensor().BitwiseEqual(want.Find(k)->tensor())) << name << " " << k;
    }
    // Resharded over 3 ranks: rows not aligned to the 128-blocks, plus a column split.
    std::mutex mu;
    RunOnThreads(3, [&](Communicator& comm) {
      const Tensor& full = want.Find("layers.0.mlp.weight")->tensor();
      const int64_t a = 100 * comm.rank(), c = comm.rank() == 1 ? 70 : 0;
      const Shape off = {a, c}, size = {100, 260 - c};
      Value sd = Value::MakeDict();
      sd.Set("layers.0.mlp.weight",
             Value::FromSharded({target, {300, 260}, {{off, Tensor::Zeros(target, size)}}}));
      auto r =
          QuantizedHuggingFaceStorageReader::Open(dir, {.thread_count = 2, .target_dtype = target});
      LoadOptions lo;
      lo.comm = &comm;
      lo.planner_options.allow_partial_load = true;
      Status s = r.ok() ? Load(sd, **r, lo) : r.status();
      std::lock_guard<std::mutex> lock(mu);
      ASSERT_THAT(s, IsOk());
      Tensor piece = Tensor::Zeros(target, size);
      ASSERT_THAT(CopyRegion(piece.view(), {0, 0}, full.view(), off, size), IsOk());
      EXPECT_TRUE(sd.Find("layers.0.mlp.weight")->sharded().shards[0].tensor.BitwiseEqual(piece))
          << name << " rank " << comm.rank();
    });
  }
}

}  // namespace
}  // namespace dcpp
