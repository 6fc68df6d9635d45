// Pickle interop with CPython (tests/interop/pickle_peer.py):
//   (a) CPython pickles a set of values with protocols 2-5; dcpp reads them and compares their
//       structure with the canonical JSON the script wrote for each value;
//   (b) dcpp writes pickles (re-encodings of (a) and trees built here) with protocols 2 and 4;
//       CPython loads them, compares them with the values in the script, and for protocol 2/4
//       re-encodings also checks that the bytes equal pickle.dumps.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "codec/pickle.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using json = nlohmann::json;
using Kind = PickleValue::Kind;
namespace fs = std::filesystem;

std::string Python() {
  const char* p = std::getenv("DCPP_PYTHON");
  return p && *p ? p : "/usr/bin/python3";
}

std::string PeerScript() { return testing::SourceDir() + "/tests/interop/pickle_peer.py"; }

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const fs::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Runs the peer script; on failure returns its output for the test message.
::testing::AssertionResult RunPeer(const std::string& mode, const fs::path& dir) {
  fs::path log = dir / ("peer_" + mode + ".log");
  std::string cmd = "PYTHONHASHSEED=0 '" + Python() + "' '" + PeerScript() + "' " + mode + " '" +
                    dir.string() + "' > '" + log.string() + "' 2>&1";
  int rc = std::system(cmd.c_str());
  if (rc != 0) {
    return ::testing::AssertionFailure() << "`" << cmd << "` exited with " << rc << ":\n"
                                         << ReadFile(log);
  }
  return ::testing::AssertionSuccess();
}

std::string Hex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

// The canonical form of pickle_peer.py (see its docstring).
json ToJson(const PickleRef& v);
json ItemsToJson(const PickleValue::Items& items) {
  json a = json::array();
  for (const PickleRef& i : items) a.push_back(ToJson(i));
  return a;
}
json DictToJson(const PickleValue::DictItems& items) {
  json a = json::array();
  for (const auto& [k, v] : items) a.push_back(json::array({ToJson(k), ToJson(v)}));
  return a;
}
json ToJson(const PickleRef& v) {
  if (!v) return "<null>";
  switch (v->kind()) {
    case Kind::kNone:
      return nullptr;
    case Kind::kBool:
      return v->as_bool();
    case Kind::kInt:
      return json::array({"int", std::to_string(v->as_int())});
    case Kind::kFloat: {
      uint64_t bits = std::bit_cast<uint64_t>(v->as_float());
      std::string be;
      for (int i = 7; i >= 0; --i) be.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
      return json::array({"float", Hex(be)});
    }
    case Kind::kStr:
      return json::array({"str", v->as_str()});
    case Kind::kBytes:
      return json::array({"bytes", Hex(v->as_str())});
    case Kind::kTuple:
      return json::array({"tuple", ItemsToJson(v->items())});
    case Kind::kList:
      return json::array({"list", ItemsToJson(v->items())});
    case Kind::kSet:
      return json::array({"set", ItemsToJson(v->items())});
    case Kind::kDict:
      return json::array({"dict", DictToJson(v->dict_items())});
    case Kind::kGlobal:
      return json::array({"global", v->global().FullName()});
    case Kind::kPersistentId:
      return json::array({"persid", ToJson(v->persistent_id())});
    case Kind::kObject: {
      const PickleValue::Object& o = v->object();
      return json::array({"object", ToJson(o.callable), o.newobj, ToJson(o.args),
                          o.state ? ToJson(o.state) : json(nullptr), ItemsToJson(o.list_items),
                          DictToJson(o.dict_items)});
    }
  }
  return "<unknown>";
}

// Set order is not part of a value: sort set items (recursively) on both sides.
void Normalize(json& j) {
  if (!j.is_array()) return;
  for (json& e : j) Normalize(e);
  if (j.size() == 2 && j[0] == "set" && j[1].is_array()) {
    std::sort(j[1].begin(), j[1].end(),
              [](const json& a, const json& b) { return a.dump() < b.dump(); });
  }
}

PickleAllowList InteropAllowList() {
  PickleAllowList allow = PickleAllowList::DcpMetadata();
  allow.Add("argparse", "Namespace");
  return allow;
}

std::vector<std::string> CaseNames(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".json") names.push_back(e.path().stem().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// (a): every CPython pickle in `dir` reads as the structure in its .json, and the torch.save
// data.pkl has the expected shape.
void CheckReads(const fs::path& dir) {
  PickleAllowList allow = InteropAllowList();
  PickleReadOptions options;
  options.allow = &allow;

  std::vector<std::string> names = CaseNames(dir);
  ASSERT_GE(names.size(), 10u);
  for (const std::string& name : names) {
    json expected = json::parse(ReadFile(dir / (name + ".json")));
    Normalize(expected);
    for (int protocol : {2, 3, 4, 5}) {
      SCOPED_TRACE(name + " protocol " + std::to_string(protocol));
      std::string data = ReadFile(dir / (name + ".p" + std::to_string(protocol) + ".pkl"));
      DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, ReadPickle(data, options));
      json got = ToJson(v);
      Normalize(got);
      EXPECT_EQ(got, expected) << v->DebugString();
      if (name == "shared") {
        // [x, x, (x,)]: the memo makes all three one node.
        EXPECT_EQ(v->items()[0].get(), v->items()[1].get());
        EXPECT_EQ(v->items()[0].get(), v->items()[2]->items()[0].get());
      }
    }
  }
  // Unless allowed, a class is refused by name.
  std::string ns = ReadFile(dir / "namespace.p4.pkl");
  EXPECT_THAT(ReadPickle(ns), testing::StatusIs(StatusCode::kInvalidArgument,
                                                ::testing::HasSubstr("\"argparse.Namespace\"")));

  std::string data = ReadFile(dir / "tensor.data.pkl");
  // torch.save(torch.arange(6.).reshape(2, 3)): _rebuild_tensor_v2(PERSID(('storage',
  // torch.FloatStorage, '0', 'cpu', 6)), 0, (2, 3), (3, 1), False, OrderedDict()).
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, ReadPickle(data));
  ASSERT_TRUE(v->IsCallOf("torch._utils", "_rebuild_tensor_v2")) << v->DebugString();
  DCPP_ASSERT_OK_AND_ASSIGN(auto args, v->object().args->GetTuple());
  ASSERT_EQ(args->size(), 6u);
  ASSERT_TRUE((*args)[0]->is(Kind::kPersistentId));
  EXPECT_EQ((*args)[0]->persistent_id()->DebugString(),
            "('storage', torch.FloatStorage, '0', 'cpu', 6)");
  EXPECT_EQ((*args)[2]->DebugString(), "(2, 3)");
  EXPECT_EQ((*args)[3]->DebugString(), "(3, 1)");
  EXPECT_TRUE((*args)[5]->IsCallOf("collections", "OrderedDict"));
  // Written back with protocol 2 it is the same bytes torch.save produced.
  DCPP_ASSERT_OK_AND_ASSIGN(std::string again, WritePickle(*v, {.protocol = 2}));
  EXPECT_EQ(Hex(again), Hex(data));
}

// Trees matching CPP_CASES in pickle_peer.py.
std::vector<std::pair<std::string, PickleRef>> CppCases() {
  auto S = [](std::string s) { return PickleValue::Str(std::move(s)); };
  auto I = [](int64_t i) { return PickleValue::Int(i); };
  auto size = [&](std::vector<int64_t> dims) {
    PickleValue::Items d;
    for (int64_t x : dims) d.push_back(I(x));
    return PickleValue::Call(PickleValue::MakeGlobal("torch", "Size"),
                             PickleValue::Tuple({PickleValue::Tuple(d)}));
  };
  std::vector<std::pair<std::string, PickleRef>> cases;
  cases.emplace_back(
      "cpp_scalars",
      PickleValue::List({PickleValue::None(), PickleValue::Bool(true), PickleValue::Bool(false),
                         I(7), I(-70000), I(int64_t{1} << 33), PickleValue::Float(0.1),
                         S("\xc3\xa9t\xc3\xa9"), PickleValue::Bytes(std::string("\x00\x80", 2))}));
  cases.emplace_back(
      "cpp_containers",
      PickleValue::Dict(
          {{S("list"),
            PickleValue::List({I(1), PickleValue::List({I(2), PickleValue::List({I(3)})})})},
           {S("tuple"),
            PickleValue::Tuple({I(1), S("a"), PickleValue::None(), PickleValue::Float(4.5)})},
           {S("set"), PickleValue::Set({I(9)})},
           {S("empty"), PickleValue::Tuple({PickleValue::Tuple(), PickleValue::List(),
                                            PickleValue::Dict(), PickleValue::Set()})}}));
  PickleRef od = PickleValue::Call(PickleValue::MakeGlobal("collections", "OrderedDict"), nullptr);
  od->object().dict_items = {{S("weight"), PickleValue::Float(1.0)},
                             {S("bias"), PickleValue::Float(2.0)}};
  cases.emplace_back("cpp_ordered", od);
  cases.emplace_back(
      "cpp_torch", PickleValue::Tuple({size({4, 5}), PickleValue::MakeGlobal("torch", "float16")}));
  cases.emplace_back(
      "cpp_namespace",
      PickleValue::New(PickleValue::MakeGlobal("argparse", "Namespace"), nullptr,
                       PickleValue::Dict({{S("x"), PickleValue::List({I(1), I(2)})}})));
  cases.emplace_back("cpp_persid",
                     PickleValue::PersistentId(PickleValue::Tuple({S("storage"), I(0)})));
  return cases;
}

// (b): writes cpp.<case>.p<N>.pkl into `dir` for the peer's `check`: re-encodings of CPython's
// pickles of the same protocol, and the trees of CppCases().
void WriteForPython(const fs::path& dir) {
  PickleAllowList allow = InteropAllowList();
  PickleReadOptions options;
  options.allow = &allow;
  size_t written = 0;
  for (int protocol : {2, 4}) {
    std::string p = ".p" + std::to_string(protocol) + ".pkl";
    // Re-encodings of CPython's pickles of the same protocol.
    for (const std::string& name : CaseNames(dir)) {
      SCOPED_TRACE(name + p);
      DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, ReadPickle(ReadFile(dir / (name + p)), options));
      DCPP_ASSERT_OK_AND_ASSIGN(std::string data, WritePickle(*v, {.protocol = protocol}));
      WriteFile(dir / ("cpp." + name + p), data);
      ++written;
    }
    for (const auto& [name, tree] : CppCases()) {
      SCOPED_TRACE(name + p);
      DCPP_ASSERT_OK_AND_ASSIGN(std::string data, WritePickle(*tree, {.protocol = protocol}));
      WriteFile(dir / ("cpp." + name + p), data);
      ++written;
    }
  }
  ASSERT_GT(written, 20u);
}

// One test for both directions: each Python start imports torch, which dominates the run time.
TEST(PickleInteropTest, RoundTripWithCPython) {
  if (!fs::exists(Python())) GTEST_SKIP() << Python() << " not found";
  testing::TempDir dir;
  ASSERT_TRUE(RunPeer("dump", dir.path()));
  {
    SCOPED_TRACE("dcpp reads CPython's pickles");
    CheckReads(dir.path());
  }
  {
    SCOPED_TRACE("CPython reads dcpp's pickles");
    WriteForPython(dir.path());
    if (HasFatalFailure()) return;
    EXPECT_TRUE(RunPeer("check", dir.path()));
  }
}

}  // namespace
}  // namespace dcpp
