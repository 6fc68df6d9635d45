// torch.save interop with PyTorch (tests/interop/torch_peer.py, run by $DCPP_PYTHON):
//   (a) PyTorch writes archives for every dtype torch.save supports, shared-storage views,
//       storage offsets, transposes, 0-d and empty tensors, parameters and trees of plain values,
//       plus a JSON description of each (tensor bytes in hex); dcpp reads them and must produce
//       exactly the described values, layouts and storage sharing; for the cases that can be
//       rebuilt exactly from their description, dcpp's encoding must equal PyTorch's file byte for
//       byte;
//   (b) dcpp writes archives (with and without PyTorch 2.x's extra records); PyTorch torch.loads
//       them and compares with the description dcpp wrote, exiting non-zero on any difference;
//   (c) `dcpp inspect --json` ($DCPP_CLI) on a PyTorch-written archive lists what PyTorch wrote.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

#include "codec/torch_save.h"
#include "dcpp/chunk.h"
#include "dcpp/convert.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::TempDir;

std::string Python() {
  const char* p = std::getenv("DCPP_PYTHON");
  return p && *p ? p : "/usr/bin/python3";
}

std::string Peer() { return testing::SourceDir() + "/tests/interop/torch_peer.py"; }

// $DCPP_CLI, else the CLI of the same build tree (<build>/dcpp beside <build>/tests/), else "".
std::string Cli() {
  if (const char* c = std::getenv("DCPP_CLI"); c && *c) return c;
  std::error_code ec;
  const fs::path candidate =
      fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path() / "dcpp";
  return !ec && fs::is_regular_file(candidate) ? candidate.string() : std::string();
}

// Runs a shell command; returns its exit status and combined output.
int RunShell(const std::string& cmd, std::string* output) {
  output->clear();
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) output->append(buf, n);
  const int rc = ::pclose(p);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string Hex(const void* data, size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(kDigits[p[i] >> 4]);
    out.push_back(kDigits[p[i] & 15]);
  }
  return out;
}

// The tagged form of torch_peer.py (see its docstring). With `layout`, tensors also carry
// stride, storage offset and the first-seen index of their (non-empty) storage.
class Describer {
 public:
  explicit Describer(bool layout) : layout_(layout) {}

  json operator()(const Value& v) {
    switch (v.kind()) {
      case Value::Kind::kNone:
        return {{"t", "none"}};
      case Value::Kind::kBool:
        return {{"t", "bool"}, {"v", v.as_bool()}};
      case Value::Kind::kInt:
        return {{"t", "int"}, {"v", v.as_int()}};
      case Value::Kind::kFloat:
        return {{"t", "float"}, {"v", v.as_float()}};
      case Value::Kind::kStr:
        return {{"t", "str"}, {"v", v.as_str()}};
      case Value::Kind::kBytes:
        return {{"t", "bytes"}, {"v", Hex(v.as_bytes().data(), v.as_bytes().size())}};
      case Value::Kind::kList:
      case Value::Kind::kTuple: {
        json items = json::array();
        for (const Value& x : v.items()) items.push_back((*this)(x));
        return {{"t", v.is_list() ? "list" : "tuple"}, {"v", items}};
      }
      case Value::Kind::kDict: {
        json items = json::array();
        for (const auto& [k, x] : v.dict()) items.push_back(json::array({(*this)(k), (*this)(x)}));
        return {{"t", "dict"}, {"ordered", v.is_ordered_dict()}, {"v", items}};
      }
      case Value::Kind::kTensor: {
        const Tensor& t = v.tensor();
        const Tensor c = t.is_contiguous() ? t : t.Clone();
        json out = {{"t", "tensor"},
                    {"dtype", std::string(DTypeName(t.dtype()))},
                    {"shape", t.shape()},
                    {"hex", Hex(c.data(), c.nbytes())}};
        if (layout_) {
          out["stride"] = t.strides();
          out["storage_offset"] = t.storage_offset();
          if (t.storage()->nbytes() > 0) {
            auto [it, inserted] = ids_.try_emplace(t.storage().get(), ids_.size());
            out["storage"] = it->second;
          }
        }
        return out;
      }
      default:
        return {{"t", "unsupported"}};
    }
  }

 private:
  bool layout_;
  std::map<const Storage*, size_t> ids_;
};

// First difference between two tagged trees, or "".
std::string Diff(const json& exp, const json& got, const std::string& path) {
  if (exp == got) return "";
  if (!exp.is_object() || !got.is_object() || exp.value("t", "") != got.value("t", "")) {
    return path + ": expected " + exp.dump().substr(0, 300) + ", got " + got.dump().substr(0, 300);
  }
  if (exp.contains("v") && exp["v"].is_array() && got.contains("v") && got["v"].is_array() &&
      exp["v"].size() == got["v"].size() &&
      exp.value("ordered", false) == got.value("ordered", false)) {
    for (size_t i = 0; i < exp["v"].size(); ++i) {
      const json& e = exp["v"][i];
      const json& g = got["v"][i];
      if (e.is_array() && e.size() == 2 && g.is_array() && g.size() == 2) {  // dict item
        std::string d = Diff(e[0], g[0], path + "[key " + std::to_string(i) + "]");
        if (d.empty()) d = Diff(e[1], g[1], path + "." + e[0].value("v", json()).dump());
        if (!d.empty()) return d;
      } else {
        std::string d = Diff(e, g, path + "." + std::to_string(i));
        if (!d.empty()) return d;
      }
    }
  }
  for (const auto& [k, v] : exp.items()) {
    if (k != "v" && (!got.contains(k) || got[k] != v)) {
      return path + ": " + k + " expected " + v.dump().substr(0, 300) + ", got " +
             (got.contains(k) ? got[k].dump().substr(0, 300) : "nothing");
    }
  }
  return path + ": differs";
}

std::string Unhex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

// Rebuilds a Value from a tagged description with layouts. Tensors with the same "storage"
// index share one Storage, sized to the furthest element any of them reaches.
class Rebuilder {
 public:
  explicit Rebuilder(const json& root) { Size(root); }

  Value operator()(const json& n) {
    const std::string t = n["t"];
    if (t == "none") return Value::None();
    if (t == "bool") return Value::Bool(n["v"].get<bool>());
    if (t == "int") return Value::Int(n["v"].get<int64_t>());
    if (t == "float") return Value::Float(n["v"].get<double>());
    if (t == "str") return Value::Str(n["v"].get<std::string>());
    if (t == "bytes") return Value::Bytes(Unhex(n["v"]));
    if (t == "list" || t == "tuple") {
      Value::List items;
      for (const json& x : n["v"]) items.push_back((*this)(x));
      return t == "list" ? Value::MakeList(std::move(items)) : Value::MakeTuple(std::move(items));
    }
    if (t == "dict") {
      Value::Dict items;
      for (const json& kv : n["v"]) items.emplace_back((*this)(kv[0]), (*this)(kv[1]));
      return Value::MakeDict(std::move(items), n["ordered"].get<bool>());
    }
    // Tensor: its contiguous bytes, copied into its place in the (shared) storage.
    const DType dtype = *DTypeFromName(n["dtype"].get<std::string>());
    const Shape shape = n["shape"];
    const std::string bytes = Unhex(n["hex"]);
    const Tensor contiguous = Tensor::FromBytes(dtype, shape, bytes.data());
    if (!n.contains("storage")) return Value::FromTensor(contiguous);
    std::shared_ptr<Storage>& storage = storages_[n["storage"].get<int>()];
    if (!storage) storage = Storage::Allocate(sizes_[n["storage"].get<int>()]);
    Tensor t2 = *Tensor::FromStorage(storage, dtype, shape, n["stride"].get<Shape>(),
                                     n["storage_offset"].get<int64_t>());
    EXPECT_THAT(CopyTensor(t2.view(), contiguous.view()), testing::IsOk());
    return Value::FromTensor(t2);
  }

 private:
  void Size(const json& n) {
    if (n.is_array()) {
      for (const json& x : n) Size(x);
      return;
    }
    if (!n.is_object()) return;
    if (n.value("t", "") == "tensor" && n.contains("storage")) {
      const TensorView v(nullptr, *DTypeFromName(n["dtype"].get<std::string>()),
                         n["shape"].get<Shape>(), n["stride"].get<Shape>(),
                         n["storage_offset"].get<int64_t>());
      size_t& size = sizes_[n["storage"].get<int>()];
      size = std::max(size, static_cast<size_t>(v.StorageElementsNeeded()) * v.element_size());
    }
    if (n.contains("v")) Size(n["v"]);
  }

  std::map<int, size_t> sizes_;
  std::map<int, std::shared_ptr<Storage>> storages_;
};

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

std::vector<std::string> CaseNames(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".pt") names.push_back(e.path().stem().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

class TorchSaveInteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string out;
    ASSERT_EQ(RunShell("'" + Python() + "' -c 'import torch'", &out), 0)
        << Python() << " cannot import torch:\n"
        << out;
  }
};

TEST_F(TorchSaveInteropTest, DcppReadsWhatPyTorchWrites) {
  TempDir dir;
  std::string out;
  ASSERT_EQ(
      RunShell("'" + Python() + "' '" + Peer() + "' write '" + dir.path().string() + "'", &out), 0)
      << out;
  const auto names = CaseNames(dir.path());
  ASSERT_THAT(names, ::testing::IsSupersetOf({"dtypes", "layouts", "tree", "root_view"}));
  // Cases dcpp must re-encode byte for byte: no parameters, every storage covered by its
  // tensors, no Python string object used twice.
  const std::set<std::string> kIdentical = {"dtypes", "ident_mixed", "ident_tensor", "list_root"};
  int identical = 0;
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const std::string path = dir.Join(name + ".pt");
    DCPP_ASSERT_OK_AND_ASSIGN(auto source, testing::OpenFile(path));
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(*source));
    EXPECT_EQ(archive.prefix(), name);  // torch.save to a path: the basename
    EXPECT_EQ(archive.version(), 3);
    DCPP_EXPECT_OK(archive.VerifyChecksums());
    for (const auto& [rec, info] : archive.records()) EXPECT_EQ(info.data_offset % 64, 0u) << rec;
    DCPP_ASSERT_OK_AND_ASSIGN(Value value, archive.ReadValue());
    const json expected = ReadJson(path + ".json")["tree"];
    const json got = Describer(/*layout=*/true)(value);
    EXPECT_EQ(Diff(expected, got, name), "");
    if (kIdentical.count(name)) {
      // Re-encoding the described value reproduces PyTorch's file byte for byte.
      const Value rebuilt = Rebuilder(expected)(expected);
      EXPECT_TRUE(rebuilt == value);
      TorchSaveWriteOptions options;
      options.archive_name = name;
      options.modern_records = false;  // torch 1.13 writes only data.pkl, data/N and version
      DCPP_ASSERT_OK_AND_ASSIGN(std::string mine, EncodeTorchSave(rebuilt, options));
      DCPP_ASSERT_OK_AND_ASSIGN(std::string theirs, testing::ReadFileBytes(path));
      EXPECT_EQ(mine.size(), theirs.size());
      EXPECT_TRUE(mine == theirs) << "dcpp's encoding of " << name << " differs from PyTorch's";
      ++identical;
    }
  }
  EXPECT_EQ(identical, static_cast<int>(kIdentical.size()));
}

TEST_F(TorchSaveInteropTest, ReadTensorIntoMatchesPyTorchBytes) {
  TempDir dir;
  std::string out;
  ASSERT_EQ(
      RunShell("'" + Python() + "' '" + Peer() + "' write '" + dir.path().string() + "'", &out), 0)
      << out;
  // Each tensor of the layouts case, read leaf by leaf straight into a fresh tensor.
  DCPP_ASSERT_OK_AND_ASSIGN(auto source, testing::OpenFile(dir.Join("layouts.pt")));
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(*source));
  DCPP_ASSERT_OK_AND_ASSIGN(Value value, archive.ReadValue());
  DCPP_ASSERT_OK_AND_ASSIGN(auto leaves, archive.Leaves());
  int tensors = 0;
  for (const TorchSaveLeaf& leaf : leaves) {
    if (!leaf.is_tensor) continue;
    ++tensors;
    Tensor dst = Tensor::Zeros(leaf.tensor.dtype, leaf.tensor.shape);
    const Shape zeros(leaf.tensor.shape.size(), 0);
    ASSERT_THAT(archive.ReadTensorInto(leaf.tensor, zeros, dst.view(), zeros, leaf.tensor.shape),
                testing::IsOk());
    // Find the same tensor in the materialized tree by its key path.
    const Value* v = &value;
    std::stringstream ss(leaf.key);
    for (std::string part; std::getline(ss, part, '.');) v = v->Find(part);
    ASSERT_NE(v, nullptr) << leaf.key;
    EXPECT_TRUE(dst.BitwiseEqual(v->tensor())) << leaf.key;
  }
  EXPECT_EQ(tensors, 10);
}

// Values dcpp writes for PyTorch to check. `layout`: the description includes strides, offsets
// and storage sharing, which dcpp must preserve for these.
struct WriteCase {
  std::string name;
  Value value;
  bool layout;
  bool weights_only;
};

std::vector<WriteCase> WriteCases() {
  std::vector<WriteCase> cases;
  {
    Value::Dict d;
    const DType kTorch113[] = {DType::kBool,    DType::kUInt8,     DType::kInt8,
                               DType::kInt16,   DType::kInt32,     DType::kInt64,
                               DType::kFloat16, DType::kBFloat16,  DType::kFloat32,
                               DType::kFloat64, DType::kComplex64, DType::kComplex128};
    uint64_t seed = 1;
    for (DType t : kTorch113) {
      const std::string n(DTypeName(t));
      d.emplace_back(Value::Str(n), Value::FromTensor(PatternTensor(t, {3, 5}, seed++)));
      d.emplace_back(Value::Str(n + "_scalar"), Value::FromTensor(PatternTensor(t, {}, seed++)));
      d.emplace_back(Value::Str(n + "_empty"), Value::FromTensor(Tensor::Zeros(t, {0, 3})));
    }
    cases.push_back({"dtypes", Value::MakeDict(std::move(d), true), true, true});
  }
  {
    const Tensor base = PatternTensor(DType::kFloat32, {4, 6}, 7);
    const Tensor w = PatternTensor(DType::kFloat64, {3, 5}, 8);
    auto view = [](const Tensor& b, Shape shape, Shape strides, int64_t offset) {
      return Value::FromTensor(
          *Tensor::FromStorage(b.storage(), b.dtype(), shape, strides, offset));
    };
    Value::Dict model;
    model.emplace_back(Value::Str("base"), Value::FromTensor(base));
    model.emplace_back(Value::Str("rows"), view(base, {2, 6}, {6, 1}, 6));
    model.emplace_back(Value::Str("col"), view(base, {4}, {6}, 2));
    model.emplace_back(Value::Str("t"), view(base, {6, 4}, {1, 6}, 0));
    model.emplace_back(Value::Str("weight_t"), view(w, {5, 3}, {1, 5}, 0));
    Value::Dict d;
    d.emplace_back(Value::Str("model"), Value::MakeDict(std::move(model)));
    d.emplace_back(Value::Str("scalar"), Value::FromTensor(PatternTensor(DType::kFloat32, {}, 9)));
    d.emplace_back(Value::Str("empty"), Value::FromTensor(Tensor::Zeros(DType::kFloat32, {0, 3})));
    cases.push_back({"layouts", Value::MakeDict(std::move(d)), true, true});
  }
  {
    // A lone view that does not cover its storage: compacted, so only values are compared.
    const Tensor big = PatternTensor(DType::kInt32, {10}, 10);
    cases.push_back({"compacted",
                     Value::MakeList({Value::FromTensor(*Tensor::FromStorage(
                                          big.storage(), DType::kInt32, {7}, {1}, 3)),
                                      Value::FromTensor(*Tensor::FromStorage(
                                          PatternTensor(DType::kInt64, {4, 4}, 11).storage(),
                                          DType::kInt64, {2, 2}, {4, 1}, 5))}),
                     false, true});
  }
  {
    Value::Dict int_keys;
    int_keys.emplace_back(Value::Int(1), Value::Str("one"));
    int_keys.emplace_back(Value::Int(2), Value::Str("two"));
    Value::Dict od;
    od.emplace_back(Value::Str("z"), Value::Int(1));
    od.emplace_back(Value::Str("a"), Value::MakeList({Value::Int(2), Value::Int(3)}));
    Value::Dict d;
    d.emplace_back(Value::Str("none"), Value::None());
    d.emplace_back(Value::Str("flags"), Value::MakeList({Value::Bool(true), Value::Bool(false)}));
    d.emplace_back(Value::Str("ints"),
                   Value::MakeList({Value::Int(0), Value::Int(-1), Value::Int(255), Value::Int(256),
                                    Value::Int(65536), Value::Int(-(int64_t{1} << 31)),
                                    Value::Int(int64_t{1} << 31), Value::Int(int64_t{1} << 62),
                                    Value::Int(INT64_MIN), Value::Int(INT64_MAX)}));
    d.emplace_back(Value::Str("floats"),
                   Value::MakeList({Value::Float(0.0), Value::Float(1.5), Value::Float(-2.25),
                                    Value::Float(1e300), Value::Float(0.1)}));
    d.emplace_back(Value::Str("str"), Value::Str("h\xc3\xa9llo \xe2\x9c\x93"));
    d.emplace_back(Value::Str("bytes"), Value::Bytes(std::string("\x00\x01\xff\x80z", 5)));
    d.emplace_back(Value::Str("empty_bytes"), Value::Bytes(""));
    d.emplace_back(Value::Str("tuple"),
                   Value::MakeTuple({Value::Int(1), Value::Str("two"), Value::Float(3.0),
                                     Value::MakeTuple({Value::None()})}));
    d.emplace_back(Value::Str("empty"), Value::MakeDict({{Value::Str("list"), Value::MakeList()},
                                                         {Value::Str("tuple"), Value::MakeTuple()},
                                                         {Value::Str("dict"), Value::MakeDict()}}));
    d.emplace_back(Value::Str("od"), Value::MakeDict(std::move(od), true));
    d.emplace_back(Value::Str("int_keys"), Value::MakeDict(std::move(int_keys)));
    d.emplace_back(
        Value::Str("layers"),
        Value::MakeList({Value::MakeDict(
            {{Value::Str("w"), Value::FromTensor(PatternTensor(DType::kFloat16, {2, 3}, 12))}})}));
    d.emplace_back(Value::Str("pair"),
                   Value::MakeTuple({Value::FromTensor(PatternTensor(DType::kInt64, {2}, 13)),
                                     Value::Str("x")}));
    // Python's weights_only loader of torch 1.13 does not accept bytes.
    cases.push_back({"tree", Value::MakeDict(std::move(d)), true, false});
  }
  cases.push_back(
      {"root_tensor", Value::FromTensor(PatternTensor(DType::kBFloat16, {5, 4}, 14)), true, true});
  cases.push_back({"list_root",
                   Value::MakeList({Value::FromTensor(PatternTensor(DType::kInt16, {4}, 15)),
                                    Value::Int(7), Value::Str("s")}),
                   true, true});
  return cases;
}

TEST_F(TorchSaveInteropTest, PyTorchReadsWhatDcppWrites) {
  TempDir dir;
  for (const WriteCase& c : WriteCases()) {
    for (bool modern : {true, false}) {
      const std::string name = c.name + (modern ? "_modern" : "_legacy");
      const std::string path = dir.Join(name + ".pt");
      if (modern) {
        ASSERT_THAT(SaveTorchFile(c.value, path), testing::IsOk());
      } else {
        TorchSaveWriteOptions options;
        options.modern_records = false;
        DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeTorchSave(c.value, options));
        ASSERT_THAT(testing::WriteFileBytes(path, bytes), testing::IsOk());
      }
      json expect = {{"weights_only", c.weights_only}, {"tree", Describer(c.layout)(c.value)}};
      ASSERT_THAT(testing::WriteFileBytes(path + ".json", expect.dump()), testing::IsOk());
    }
  }
  std::string out;
  const int rc =
      RunShell("'" + Python() + "' '" + Peer() + "' check '" + dir.path().string() + "'", &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, ::testing::HasSubstr("layouts_modern.pt: ok"));
  EXPECT_THAT(out, ::testing::HasSubstr("dtypes_legacy.pt: ok"));
}

TEST_F(TorchSaveInteropTest, PyTorchCheckFailsOnADifferentValue) {
  // The checker must be able to fail: one bit of one tensor differs from the description.
  TempDir dir;
  const Tensor t = PatternTensor(DType::kFloat32, {2, 2}, 3);
  Value::Dict d;
  d.emplace_back(Value::Str("w"), Value::FromTensor(t));
  const Value v = Value::MakeDict(std::move(d));
  ASSERT_THAT(SaveTorchFile(v, dir.Join("bad.pt")), testing::IsOk());
  Tensor other = t.Clone();
  other.data_as<uint8_t>()[5] ^= 1;
  Value::Dict d2;
  d2.emplace_back(Value::Str("w"), Value::FromTensor(other));
  json expect = {{"weights_only", true}, {"tree", Describer(true)(Value::MakeDict(std::move(d2)))}};
  ASSERT_THAT(testing::WriteFileBytes(dir.Join("bad.pt.json"), expect.dump()), testing::IsOk());
  std::string out;
  EXPECT_EQ(
      RunShell("'" + Python() + "' '" + Peer() + "' check '" + dir.path().string() + "'", &out), 1)
      << out;
  EXPECT_THAT(out, ::testing::HasSubstr("bad.pt: <root>.w: tensor hex differs"));
}

// Leaves of a tagged tree with `dcpp inspect`'s rules: dicts descended, lists and tuples only
// when they hold a tensor.
bool HasTensor(const json& n) {
  if (n["t"] == "tensor") return true;
  if (n["t"] == "list" || n["t"] == "tuple") {
    for (const json& x : n["v"]) {
      if (HasTensor(x)) return true;
    }
  }
  if (n["t"] == "dict") {
    for (const json& kv : n["v"]) {
      if (HasTensor(kv[1])) return true;
    }
  }
  return false;
}

void Flatten(const json& n, const std::string& key,
             std::vector<std::pair<std::string, json>>& out) {
  auto join = [&](const std::string& p) { return key.empty() ? p : key + "." + p; };
  if (n["t"] == "dict" && !n["v"].empty()) {
    for (const json& kv : n["v"]) {
      const json& k = kv[0]["v"];
      Flatten(kv[1], join(k.is_string() ? k.get<std::string>() : k.dump()), out);
    }
  } else if ((n["t"] == "list" || n["t"] == "tuple") && HasTensor(n)) {
    for (size_t i = 0; i < n["v"].size(); ++i) Flatten(n["v"][i], join(std::to_string(i)), out);
  } else {
    out.emplace_back(key, n);
  }
}

TEST_F(TorchSaveInteropTest, InspectJsonListsWhatPyTorchWrote) {
  const std::string cli_path = Cli();
  if (cli_path.empty()) GTEST_SKIP() << "DCPP_CLI is not set and no built CLI was found";
  const char* cli = cli_path.c_str();
  TempDir dir;
  std::string out;
  ASSERT_EQ(
      RunShell("'" + Python() + "' '" + Peer() + "' write '" + dir.path().string() + "'", &out), 0)
      << out;
  for (const std::string name : {"layouts", "tree", "dtypes", "root_view"}) {
    SCOPED_TRACE(name);
    const std::string path = dir.Join(name + ".pt");
    ASSERT_EQ(
        RunShell(std::string("'") + cli + "' inspect --json '" + path + "' 2>/dev/null", &out), 0)
        << out;
    const json got = json::parse(out);
    EXPECT_EQ(got["format"], "torch_save");
    EXPECT_EQ(got["path"], path);
    EXPECT_EQ(got["archive"], name);
    EXPECT_EQ(got["version"], 3);
    std::vector<std::pair<std::string, json>> leaves;
    Flatten(ReadJson(path + ".json")["tree"], "", leaves);
    ASSERT_EQ(got["entries"].size(), leaves.size()) << out;
    uint64_t total = 0;
    for (size_t i = 0; i < leaves.size(); ++i) {
      const json& e = got["entries"][i];
      const auto& [key, node] = leaves[i];
      EXPECT_EQ(e["key"], key);
      if (node["t"] == "tensor") {
        EXPECT_EQ(e["kind"], "tensor") << key;
        EXPECT_EQ(e["dtype"], node["dtype"]) << key;
        EXPECT_EQ(e["shape"], node["shape"]) << key;
        EXPECT_EQ(e["strides"], node["stride"]) << key;
        EXPECT_EQ(e["storage_offset"], node["storage_offset"]) << key;
        EXPECT_EQ(e["nbytes"], node["hex"].get<std::string>().size() / 2) << key;
        total += node["hex"].get<std::string>().size() / 2;
      } else {
        EXPECT_EQ(e["kind"], "value") << key;
        if (node["t"] == "int" || node["t"] == "str" || node["t"] == "bool") {
          EXPECT_EQ(e["value"], node["v"]) << key;
        }
      }
    }
    EXPECT_EQ(got["total_tensor_bytes"], total);
  }
  // Errors: exit code 1 and a message naming the file.
  const std::string missing = dir.Join("missing.pt");
  EXPECT_EQ(RunShell(std::string("'") + cli + "' inspect '" + missing + "'", &out), 1);
  EXPECT_THAT(out, ::testing::HasSubstr(missing));
  std::string bytes = *testing::ReadFileBytes(dir.Join("tree.pt"));
  bytes.resize(bytes.size() - 30);
  const std::string cut = dir.Join("cut.pt");
  ASSERT_THAT(testing::WriteFileBytes(cut, bytes), testing::IsOk());
  EXPECT_EQ(RunShell(std::string("'") + cli + "' inspect --json '" + cut + "'", &out), 1);
  EXPECT_THAT(out, ::testing::HasSubstr(cut));
}

}  // namespace
}  // namespace dcpp
