#include "codec/pickle.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;
using Kind = PickleValue::Kind;
using namespace std::string_literals;

// Protocol-2 header, then the body, then STOP.
std::string P2(const std::string& body) { return "\x80\x02"s + body + "."; }

// Structural equality; shared nodes compare by content.
bool Equal(const PickleValue& a, const PickleValue& b);
bool EqualRef(const PickleRef& a, const PickleRef& b) {
  if (!a || !b) return !a && !b;
  return Equal(*a, *b);
}
bool EqualItems(const PickleValue::Items& a, const PickleValue::Items& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!EqualRef(a[i], b[i])) return false;
  }
  return true;
}
bool EqualDict(const PickleValue::DictItems& a, const PickleValue::DictItems& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!EqualRef(a[i].first, b[i].first) || !EqualRef(a[i].second, b[i].second)) return false;
  }
  return true;
}
bool Equal(const PickleValue& a, const PickleValue& b) {
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Kind::kNone:
      return true;
    case Kind::kBool:
      return a.as_bool() == b.as_bool();
    case Kind::kInt:
      return a.as_int() == b.as_int();
    case Kind::kFloat:
      return a.as_float() == b.as_float();
    case Kind::kStr:
    case Kind::kBytes:
      return a.as_str() == b.as_str();
    case Kind::kTuple:
    case Kind::kList:
    case Kind::kSet:
      return EqualItems(a.items(), b.items());
    case Kind::kDict:
      return EqualDict(a.dict_items(), b.dict_items());
    case Kind::kGlobal:
      return a.global().FullName() == b.global().FullName();
    case Kind::kPersistentId:
      return EqualRef(a.persistent_id(), b.persistent_id());
    case Kind::kObject: {
      const auto& x = a.object();
      const auto& y = b.object();
      return x.newobj == y.newobj && EqualRef(x.callable, y.callable) && EqualRef(x.args, y.args) &&
             EqualRef(x.state, y.state) && EqualRef(x.kwargs, y.kwargs) &&
             EqualItems(x.list_items, y.list_items) && EqualDict(x.dict_items, y.dict_items);
    }
  }
  return false;
}

size_t Count(const std::string& s, char c) { return std::count(s.begin(), s.end(), c); }

Result<PickleRef> Read(const std::string& data, const PickleAllowList* allow = nullptr) {
  PickleReadOptions o;
  o.allow = allow;
  return ReadPickle(data, o);
}

// ---------------------------------------------------------------- scalars

TEST(ReadPickleTest, Constants) {
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef none, Read(P2("N")));
  EXPECT_TRUE(none->is(Kind::kNone));
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef t, Read(P2("\x88")));
  EXPECT_EQ(t->GetBool().value(), true);
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef f, Read(P2("\x89")));
  EXPECT_EQ(f->GetBool().value(), false);
}

TEST(ReadPickleTest, BinaryInts) {
  EXPECT_EQ(Read(P2("K\xff")).value()->as_int(), 255);
  EXPECT_EQ(Read(P2("M\x01\x02")).value()->as_int(), 0x0201);
  EXPECT_EQ(Read(P2("J\xfe\xff\xff\xff")).value()->as_int(), -2);
  EXPECT_EQ(Read(P2("J\x00\x00\x00\x80"s)).value()->as_int(), std::numeric_limits<int32_t>::min());
  // LONG1: empty is 0; little-endian two's complement of any width up to 8 bytes.
  EXPECT_EQ(Read(P2("\x8a\x00"s)).value()->as_int(), 0);
  EXPECT_EQ(Read(P2("\x8a\x05\x00\x00\x00\x80\x00"s)).value()->as_int(), int64_t{1} << 31);
  EXPECT_EQ(Read(P2("\x8a\x05\xff\xff\xff\x7f\xff"s)).value()->as_int(), -(int64_t{1} << 31) - 1);
  EXPECT_EQ(Read(P2("\x8a\x01\xff"s)).value()->as_int(), -1);
  EXPECT_EQ(Read(P2("\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"s)).value()->as_int(),
            std::numeric_limits<int64_t>::min());
  // Wider than 8 bytes is fine when the extra bytes only extend the sign.
  EXPECT_EQ(Read(P2("\x8a\x0a\xfe\xff\xff\xff\xff\xff\xff\xff\xff\xff"s)).value()->as_int(), -2);
  EXPECT_EQ(Read(P2("\x8b\x02\x00\x00\x00\x34\x12"s)).value()->as_int(), 0x1234);
}

TEST(ReadPickleTest, IntegerTooLarge) {
  // 2**64 needs 9 bytes.
  EXPECT_THAT(Read(P2("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("integer too large")));
  // 2**63: 8 low bytes look negative but the ninth byte says positive.
  EXPECT_THAT(Read(P2("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("integer too large")));
  EXPECT_THAT(Read("I99999999999999999999\n."),
              StatusIs(StatusCode::kDataLoss, HasSubstr("integer too large")));
}

TEST(ReadPickleTest, TextForms) {
  EXPECT_EQ(Read("I-42\n.").value()->as_int(), -42);
  EXPECT_TRUE(Read("I01\n.").value()->as_bool());
  EXPECT_EQ(Read("L12345678901L\n.").value()->as_int(), 12345678901);
  EXPECT_EQ(Read("F2.5\n.").value()->as_float(), 2.5);
  EXPECT_THAT(Read("Iabc\n."), StatusIs(StatusCode::kDataLoss, HasSubstr("bad decimal")));
  EXPECT_THAT(Read("I12"), StatusIs(StatusCode::kDataLoss, HasSubstr("unterminated")));
  // Protocol 0 list/dict/tuple built from MARK.
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, Read("(lp0\nI1\naI2\na(I3\nI4\ntp1\na(dp2\nI5\nI6\nsa."));
  EXPECT_EQ(v->DebugString(), "[1, 2, (3, 4), {5: 6}]");
}

TEST(ReadPickleTest, BinFloatIsBigEndian) {
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, Read(P2("G\x3f\xf8\x00\x00\x00\x00\x00\x00"s)));
  EXPECT_EQ(v->GetFloat().value(), 1.5);
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef i, Read(P2("K\x03")));
  EXPECT_EQ(i->GetFloat().value(), 3.0);  // ints are accepted where floats are asked for
}

TEST(ReadPickleTest, StringsAndBytes) {
  EXPECT_EQ(Read(P2("\x8c\x02hi")).value()->GetStr().value(), "hi");
  EXPECT_EQ(Read(P2("X\x03\x00\x00\x00h\xc3\xa9"s)).value()->GetStr().value(), "h\xc3\xa9");
  EXPECT_EQ(Read(P2("\x8d\x01\x00\x00\x00\x00\x00\x00\x00z"s)).value()->GetStr().value(), "z");
  EXPECT_EQ(Read(P2("U\x03"
                    "abc"))
                .value()
                ->GetStr()
                .value(),
            "abc");
  EXPECT_EQ(Read(P2("T\x01\x00\x00\x00q"s)).value()->GetStr().value(), "q");
  EXPECT_EQ(Read(P2("C\x02\x00\xff"s)).value()->GetBytes().value(), "\x00\xff"s);
  EXPECT_EQ(Read(P2("B\x01\x00\x00\x00\x07"s)).value()->GetBytes().value(), "\x07");
  EXPECT_EQ(Read(P2("\x8e\x01\x00\x00\x00\x00\x00\x00\x00\x08"s)).value()->GetBytes().value(),
            "\x08");
  EXPECT_EQ(Read(P2("\x96\x02\x00\x00\x00\x00\x00\x00\x00"
                    "ab"s))
                .value()
                ->GetBytes()
                .value(),
            "ab");
  EXPECT_THAT(Read(P2("T\xff\xff\xff\xff"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("negative length")));
}

TEST(ReadPickleTest, HugeLengthsFailBeforeAllocating) {
  for (std::string body :
       {"\x8d\xff\xff\xff\xff\xff\xff\xff\xff"s, "\x8e\xff\xff\xff\xff\xff\xff\xff\x7f"s,
        "\x96\x00\x00\x00\x00\x00\x01\x00\x00"s, "X\xff\xff\xff\xff"s, "B\xff\xff\xff\xff"s,
        "\x8b\xff\xff\xff\x7f"s}) {
    EXPECT_THAT(Read(P2(body)), StatusIs(StatusCode::kDataLoss, HasSubstr("truncated")))
        << PickleValue::Bytes(body)->DebugString();
  }
  EXPECT_THAT(Read("\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xff."s),
              StatusIs(StatusCode::kDataLoss, HasSubstr("frame of")));
}

// ---------------------------------------------------------------- containers

TEST(ReadPickleTest, Tuples) {
  EXPECT_EQ(Read(P2(")")).value()->DebugString(), "()");
  EXPECT_EQ(Read(P2("K\x01\x85")).value()->DebugString(), "(1,)");
  EXPECT_EQ(Read(P2("K\x01K\x02\x86")).value()->DebugString(), "(1, 2)");
  EXPECT_EQ(Read(P2("K\x01K\x02K\x03\x87")).value()->DebugString(), "(1, 2, 3)");
  EXPECT_EQ(Read(P2("(K\x01K\x02K\x03K\x04t")).value()->DebugString(), "(1, 2, 3, 4)");
  EXPECT_EQ(Read(P2("(t")).value()->DebugString(), "()");
  // TUPLE2 may not reach below the last MARK.
  EXPECT_THAT(Read(P2("K\x01(K\x02\x86")), StatusIs(StatusCode::kDataLoss, HasSubstr("underflow")));
}

TEST(ReadPickleTest, Lists) {
  EXPECT_EQ(Read(P2("]K\x01"
                    "a"))
                .value()
                ->DebugString(),
            "[1]");
  EXPECT_EQ(Read(P2("](K\x01K\x02"
                    "e(K\x03"
                    "e"))
                .value()
                ->DebugString(),
            "[1, 2, 3]");
  EXPECT_EQ(Read(P2("(K\x01K\x02l")).value()->DebugString(), "[1, 2]");
  EXPECT_THAT(Read(P2("K\x01K\x02"
                      "a")),
              StatusIs(StatusCode::kDataLoss, HasSubstr("cannot append to a int")));
}

TEST(ReadPickleTest, Dicts) {
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef d, Read(P2("}\x8c\x01"
                                                 "aK\x01s(\x8c\x01"
                                                 "bK\x02\x8c\x01"
                                                 "cK\x03u")));
  EXPECT_EQ(d->DebugString(), "{'a': 1, 'b': 2, 'c': 3}");
  EXPECT_EQ(d->FindStrKey("b")->as_int(), 2);
  EXPECT_EQ(d->FindStrKey("zz"), nullptr);
  EXPECT_EQ(Read(P2("(K\x01K\x02"
                    "d"))
                .value()
                ->DebugString(),
            "{1: 2}");
  EXPECT_THAT(Read(P2("}(K\x01u")), StatusIs(StatusCode::kDataLoss, HasSubstr("odd number")));
  // Duplicate keys are kept; lookups see the last one, as Python's dict would.
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef dup, Read(P2("}(\x8c\x01"
                                                   "aK\x01\x8c\x01"
                                                   "aK\x02u")));
  EXPECT_EQ(dup->dict_items().size(), 2u);
  EXPECT_EQ(dup->FindStrKey("a")->as_int(), 2);
}

TEST(ReadPickleTest, Sets) {
  EXPECT_EQ(Read(P2("\x8f(K\x01K\x02\x90")).value()->DebugString(), "{1, 2}");
  EXPECT_EQ(Read(P2("\x8f")).value()->DebugString(), "set()");
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef fs, Read(P2("(K\x05\x91")));
  EXPECT_TRUE(fs->is(Kind::kSet));
  EXPECT_THAT(Read(P2("](K\x01\x90")), StatusIs(StatusCode::kDataLoss, HasSubstr("add items")));
}

TEST(ReadPickleTest, StackOps) {
  EXPECT_EQ(Read(P2("K\x01K\x02"
                    "0"))
                .value()
                ->as_int(),
            1);
  EXPECT_EQ(Read(P2("K\x01(K\x02K\x03"
                    "1"))
                .value()
                ->as_int(),
            1);
  // POP with nothing above the MARK discards the MARK (CPython does the same).
  EXPECT_EQ(Read(P2("K\x01("
                    "0"))
                .value()
                ->as_int(),
            1);
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef t, Read(P2("]2\x86")));
  EXPECT_EQ(t->items()[0].get(), t->items()[1].get());  // DUP shares the node
}

TEST(ReadPickleTest, MemoSharesNodes) {
  // [x, x] where x = [] memoized with BINPUT, LONG_BINPUT, PUT and MEMOIZE.
  for (const std::string& body : {"](]q\x05h\x05"
                                  "e"s,
                                  "](]r\x00\x01\x00\x00j\x00\x01\x00\x00"
                                  "e"s,
                                  "](]p7\ng7\ne"s,
                                  "]\x94(]\x94h\x01"
                                  "e"s}) {
    DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, Read(P2(body)));
    ASSERT_EQ(v->items().size(), 2u);
    EXPECT_EQ(v->items()[0].get(), v->items()[1].get());
  }
  EXPECT_THAT(Read(P2("h\x03")), StatusIs(StatusCode::kDataLoss, HasSubstr("memo index 3")));
  EXPECT_THAT(Read(P2("q\x00"s)), StatusIs(StatusCode::kDataLoss, HasSubstr("underflow")));
}

// ---------------------------------------------------------------- globals and objects

TEST(ReadPickleTest, GlobalsAreAllowListed) {
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef g, Read(P2("ctorch\nfloat32\n")));
  ASSERT_TRUE(g->is(Kind::kGlobal));
  EXPECT_EQ(g->global().FullName(), "torch.float32");
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef sg, Read("\x80\x04\x8c\x05torch\x8c\x04Size\x93."s));
  EXPECT_EQ(sg->global().FullName(), "torch.Size");

  EXPECT_THAT(Read(P2("cos\nsystem\n")),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("pickle global \"os.system\" is not allowed")));
  EXPECT_THAT(Read("\x80\x04\x8c\x08"
                   "builtins\x8c\x04"
                   "eval\x93."s),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("\"builtins.eval\"")));
  // Metadata classes pass only with the DCP list.
  std::string meta = P2("ctorch.distributed.checkpoint.metadata\nMetadata\n");
  EXPECT_THAT(Read(meta), StatusIs(StatusCode::kInvalidArgument, ::testing::_));
  PickleAllowList dcp = PickleAllowList::DcpMetadata();
  DCPP_EXPECT_OK(Read(meta, &dcp));
  PickleAllowList custom{"my.module.Thing"};
  EXPECT_TRUE(custom.Allows("my.module", "Thing"));
  EXPECT_FALSE(custom.Allows("my", "module.Thing"));
}

TEST(ReadPickleTest, Protocol2GlobalsUsePython2ModuleNames) {
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef s, Read(P2("c__builtin__\nset\n")));
  EXPECT_EQ(s->global().FullName(), "builtins.set");
  // Protocol 3+ pickles are not remapped.
  EXPECT_THAT(Read("\x80\x03"
                   "c__builtin__\nset\n."s),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
}

TEST(ReadPickleTest, AllowListsCoverDcpClassPaths) {
  PickleAllowList t = PickleAllowList::TorchSave();
  PickleAllowList d = PickleAllowList::DcpMetadata();
  for (auto [m, n] :
       std::vector<std::pair<std::string, std::string>>{{"torch._utils", "_rebuild_tensor_v2"},
                                                        {"torch._utils", "_rebuild_tensor_v3"},
                                                        {"torch", "FloatStorage"},
                                                        {"torch", "UntypedStorage"},
                                                        {"torch", "bfloat16"},
                                                        {"torch", "float8_e4m3fn"},
                                                        {"torch", "Size"},
                                                        {"collections", "OrderedDict"},
                                                        {"_codecs", "encode"},
                                                        {"torch.serialization", "_get_layout"}}) {
    EXPECT_TRUE(t.Allows(m, n)) << m << "." << n;
    EXPECT_TRUE(d.Allows(m, n)) << m << "." << n;
  }
  for (std::string m :
       {"torch.distributed.checkpoint.metadata", "torch.distributed._shard.checkpoint.metadata"}) {
    for (std::string n :
         {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
          "StorageMeta", "MetadataIndex", "TensorProperties", "_MEM_FORMAT_ENCODING"}) {
      EXPECT_TRUE(d.Allows(m, n)) << m << "." << n;
      EXPECT_FALSE(t.Allows(m, n)) << m << "." << n;
    }
  }
  EXPECT_TRUE(d.Allows("torch.distributed.checkpoint.filesystem", "_StorageInfo"));
  EXPECT_TRUE(d.Allows("torch.distributed._shard.checkpoint.filesystem", "_StorageInfo"));
  EXPECT_TRUE(d.Allows("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"));
  EXPECT_TRUE(d.Allows("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"));
  EXPECT_TRUE(d.Allows("pathlib._local", "PosixPath"));
  EXPECT_TRUE(d.Allows("builtins", "getattr"));
  EXPECT_TRUE(d.Allows("copyreg", "__newobj__"));
  EXPECT_FALSE(d.Allows("builtins", "eval"));
  EXPECT_FALSE(d.Allows("os", "system"));
}

TEST(ReadPickleTest, ReduceNewObjBuild) {
  PickleAllowList dcp = PickleAllowList::DcpMetadata();
  // torch.Size((2, 3))
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef size, Read(P2("ctorch\nSize\nK\x02K\x03\x86\x85R")));
  EXPECT_TRUE(size->IsCallOf("torch", "Size"));
  EXPECT_FALSE(size->object().newobj);
  EXPECT_EQ(size->DebugString(), "torch.Size((2, 3))");
  // StorageMeta() NEWOBJ with BUILD of a dict.
  std::string body =
      "ctorch.distributed.checkpoint.metadata\nStorageMeta\n)\x81}\x8c\x07save_id\x8c\x01xsb";
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef obj, Read(P2(body), &dcp));
  EXPECT_TRUE(obj->object().newobj);
  EXPECT_TRUE(obj->IsCallOf("torch.distributed.checkpoint.metadata", "StorageMeta"));
  ASSERT_NE(obj->object().state, nullptr);
  EXPECT_EQ(obj->object().state->FindStrKey("save_id")->as_str(), "x");
  // A second BUILD on the same object is refused rather than merged.
  EXPECT_THAT(Read(P2(body + "}b"), &dcp),
              StatusIs(StatusCode::kDataLoss, HasSubstr("state is already set")));
  EXPECT_THAT(Read(P2("]}b")), StatusIs(StatusCode::kDataLoss, HasSubstr("cannot set state")));
  // NEWOBJ_EX keeps its keyword arguments.
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef ex,
                            Read("\x80\x04\x8c\x05torch\x8c\x04Size\x93)}\x8c\x01kK\x01s\x92."s));
  ASSERT_NE(ex->object().kwargs, nullptr);
  EXPECT_EQ(ex->DebugString(), "torch.Size(**{'k': 1})");
  EXPECT_THAT(Read(P2("K\x01)R")), StatusIs(StatusCode::kDataLoss, HasSubstr("callable is a int")));
  EXPECT_THAT(Read(P2("ctorch\nSize\n]R")),
              StatusIs(StatusCode::kDataLoss, HasSubstr("not a tuple")));
}

TEST(ReadPickleTest, OrderedDictItemsGoToObject) {
  // collections.OrderedDict() then SETITEMS (as torch.save writes _rebuild_tensor_v2's hooks).
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef od,
                            Read(P2("ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00"
                                    "aq\x02K\x01X\x01\x00\x00\x00"
                                    "bq\x03K\x02u"s)));
  EXPECT_TRUE(od->IsCallOf("collections", "OrderedDict"));
  EXPECT_EQ(od->object().dict_items.size(), 2u);
  EXPECT_EQ(od->FindStrKey("b")->as_int(), 2);
  DCPP_ASSERT_OK_AND_ASSIGN(auto items, od->GetDict());
  EXPECT_EQ(items->size(), 2u);
  EXPECT_EQ(od->DebugString(), "collections.OrderedDict() items={'a': 1, 'b': 2}");
  // APPENDS on an object fills list_items.
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef l, Read(P2("ccollections\nOrderedDict\n)R(K\x01K\x02"
                                                 "e")));
  EXPECT_EQ(l->object().list_items.size(), 2u);
}

TEST(ReadPickleTest, ResolvesProtocol2BytesAndSets) {
  // pickle.dumps(b'a\xffb', 2) from CPython.
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef b,
                            Read(P2("c_codecs\nencode\nq\x00X\x04\x00\x00\x00"
                                    "a\xc3\xbf"
                                    "bq\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04"s)));
  EXPECT_EQ(b->GetBytes().value(),
            "a\xff"
            "b");
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef empty, Read(P2("c__builtin__\nbytes\nq\x00)Rq\x01"s)));
  EXPECT_EQ(empty->GetBytes().value(), "");
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef ba, Read(P2("c__builtin__\nbytearray\nC\x01z\x85R")));
  EXPECT_EQ(ba->GetBytes().value(), "z");
  // pickle.dumps({7}, 2)
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef s, Read(P2("c__builtin__\nset\nq\x00]q\x01K\x07"
                                                 "a\x85q\x02Rq\x03"s)));
  EXPECT_EQ(s->DebugString(), "{7}");
  EXPECT_THAT(Read(P2("c_codecs\nencode\nX\x02\x00\x00\x00\xe2\x82X\x06\x00\x00\x00latin1\x86R"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("latin-1")));
  EXPECT_THAT(Read(P2("c_codecs\nencode\nX\x01\x00\x00\x00"
                      "aX\x05\x00\x00\x00utf-8\x86R"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("_codecs.encode")));
  // copyreg.__newobj__(cls, 1) is the NEWOBJ form.
  PickleAllowList dcp = PickleAllowList::DcpMetadata();
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef n,
                            Read(P2("ccopy_reg\n__newobj__\nctorch\nSize\nK\x01\x86R"), &dcp));
  EXPECT_TRUE(n->object().newobj);
  EXPECT_EQ(n->DebugString(), "torch.Size(1)");
}

TEST(ReadPickleTest, PersistentIds) {
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef p, Read(P2("(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
                                                 "X\x01\x00\x00\x00"
                                                 "0X\x03\x00\x00\x00"
                                                 "cpuK\x06tQ"s)));
  ASSERT_TRUE(p->is(Kind::kPersistentId));
  EXPECT_EQ(p->DebugString(), "persid(('storage', torch.FloatStorage, '0', 'cpu', 6))");
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef text, Read("Pkey\n."));
  EXPECT_EQ(text->persistent_id()->as_str(), "key");
}

TEST(ReadPickleTest, Frames) {
  // pickle.dumps({'a': 1, 'b': [1.5, None, True]}, 4) from CPython.
  std::string data =
      "\x80\x04\x95\x1e\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01"
      "a\x94K\x01\x8c\x01"
      "b\x94]\x94(G?\xf8\x00\x00\x00\x00\x00\x00N\x88"
      "eu."s;
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, Read(data));
  EXPECT_EQ(v->DebugString(), "{'a': 1, 'b': [1.5, None, True]}");
}

TEST(ReadPickleTest, UnsupportedOpcodes) {
  EXPECT_THAT(Read("\x80\x05\x97."s),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("NEXT_BUFFER")));
  EXPECT_THAT(Read("\x80\x05\x98."s),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("READONLY_BUFFER")));
  EXPECT_THAT(Read(P2("\x82\x01")), StatusIs(StatusCode::kUnimplemented, HasSubstr("EXT1")));
  EXPECT_THAT(Read("\x80\x06N."s), StatusIs(StatusCode::kDataLoss, HasSubstr("protocol 6")));
  EXPECT_THAT(Read(P2("\xff")), StatusIs(StatusCode::kDataLoss, HasSubstr("unknown opcode 0xff")));
}

// ---------------------------------------------------------------- malformed input

TEST(ReadPickleTest, StructuralErrorsNameTheOffset) {
  EXPECT_THAT(Read(P2("N") + "N"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("offset 3 (STOP): 1 trailing bytes")));
  EXPECT_THAT(Read("\x80\x02N"), StatusIs(StatusCode::kDataLoss, HasSubstr("ends before STOP")));
  EXPECT_THAT(Read(P2("NN")), StatusIs(StatusCode::kDataLoss, HasSubstr("2 values")));
  EXPECT_THAT(Read(P2("")), StatusIs(StatusCode::kDataLoss, HasSubstr("0 values")));
  EXPECT_THAT(Read(P2("(N")), StatusIs(StatusCode::kDataLoss, HasSubstr("open MARK")));
  EXPECT_THAT(Read(P2("Nt")),
              StatusIs(StatusCode::kDataLoss, HasSubstr("offset 3 (TUPLE): no MARK")));
  EXPECT_THAT(Read(P2("0")),
              StatusIs(StatusCode::kDataLoss, HasSubstr("offset 2 (POP): stack underflow")));
  EXPECT_THAT(Read(P2("R")), StatusIs(StatusCode::kDataLoss, HasSubstr("stack underflow")));
  EXPECT_THAT(Read(""), StatusIs(StatusCode::kDataLoss, ::testing::_));
}

TEST(ReadPickleTest, SelfReferenceIsRefused) {
  // l = []; l.append(l)
  EXPECT_THAT(Read(P2("]q\x00h\x00"
                      "a"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("contain itself")));
  EXPECT_THAT(Read(P2("]2a")), StatusIs(StatusCode::kDataLoss, HasSubstr("contain itself")));
  // a = []; b = [a]; a.append(b)
  EXPECT_THAT(Read(P2("]q\x00]h\x00"
                      "aa"s)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("already part of another value")));
}

TEST(ReadPickleTest, DeepNestingIsBounded) {
  std::string marks = "\x80\x02" + std::string(100000, '(') + "N.";
  EXPECT_THAT(Read(marks), StatusIs(StatusCode::kDataLoss, HasSubstr("open MARKs")));
  std::string lists = "\x80\x02" + std::string(100000, ']') + std::string(99999, 'a') + ".";
  EXPECT_THAT(Read(lists), StatusIs(StatusCode::kDataLoss, HasSubstr("max_depth")));
  std::string tuples = "\x80\x02N" + std::string(100000, '\x85') + ".";
  EXPECT_THAT(Read(tuples), StatusIs(StatusCode::kDataLoss, HasSubstr("max_depth")));
  // Exactly at the limit is fine.
  PickleReadOptions o;
  o.max_depth = 50;
  EXPECT_THAT(ReadPickle("\x80\x02N" + std::string(49, '\x85') + ".", o), IsOk());
  EXPECT_THAT(ReadPickle("\x80\x02N" + std::string(50, '\x85') + ".", o),
              StatusIs(StatusCode::kDataLoss, HasSubstr("deeper than 50")));
}

TEST(ReadPickleTest, MemoAndNodeLimits) {
  PickleReadOptions o;
  o.max_memo = 2;
  EXPECT_THAT(ReadPickle(P2("]\x94\x94\x94"), o),
              StatusIs(StatusCode::kDataLoss, HasSubstr("max_memo")));
  EXPECT_THAT(ReadPickle(P2("]\x94\x94"), o), IsOk());
  o = {};
  o.max_nodes = 3;
  EXPECT_THAT(ReadPickle(P2("(NNNl"), o), StatusIs(StatusCode::kDataLoss, HasSubstr("max_nodes")));
}

TEST(ReadPickleTest, EveryPrefixOfAValidPickleFails) {
  PickleValue::Items items = {PickleValue::Int(1 << 20), PickleValue::Str("x"),
                              PickleValue::Bytes("\x01\x02"), PickleValue::Float(0.5),
                              PickleValue::Call(PickleValue::MakeGlobal("torch", "Size"),
                                                PickleValue::Tuple({PickleValue::Tuple()}))};
  PickleRef tree = PickleValue::Dict({{PickleValue::Str("k"), PickleValue::List(items)},
                                      {PickleValue::Int(-5), PickleValue::Set(items)}});
  for (int protocol : {2, 4}) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string data, WritePickle(*tree, {.protocol = protocol}));
    DCPP_ASSERT_OK(Read(data).status());
    for (size_t n = 0; n < data.size(); ++n) {
      EXPECT_FALSE(Read(data.substr(0, n)).ok()) << "protocol " << protocol << " prefix " << n;
    }
  }
}

// ---------------------------------------------------------------- accessors and repr

TEST(PickleValueTest, CheckedAccessorsNameKinds) {
  PickleRef s = PickleValue::Str("abc");
  EXPECT_THAT(s->GetInt(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected int, got str 'abc'")));
  EXPECT_THAT(PickleValue::Int(1)->GetStr(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected str, got int")));
  EXPECT_THAT(PickleValue::List()->GetTuple(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected tuple, got list")));
  EXPECT_THAT(PickleValue::Tuple()->GetList(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected list")));
  EXPECT_THAT(PickleValue::None()->GetDict(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected dict, got None")));
  EXPECT_THAT(PickleValue::Str("x")->GetBytes(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected bytes")));
  EXPECT_THAT(PickleValue::Str("x")->GetFloat(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected float")));
  EXPECT_THAT(PickleValue::Int(0)->GetBool(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("expected bool")));
  EXPECT_FALSE(PickleValue::Int(0)->IsCallOf("torch", "Size"));
  EXPECT_EQ(PickleValue::Int(0)->FindStrKey("a"), nullptr);
}

TEST(PickleValueTest, DebugStringCapsSizes) {
  EXPECT_EQ(PickleValue::Bytes(std::string(123456, 'x'))->DebugString(),
            "b'" + std::string(32, 'x') + "...' (123456 bytes)");
  EXPECT_EQ(PickleValue::Bytes("a\x00'\\"s)->DebugString(), "b'a\\x00\\'\\\\'");
  EXPECT_EQ(PickleValue::Float(1.0)->DebugString(), "1.0");
  EXPECT_EQ(PickleValue::Float(-0.25)->DebugString(), "-0.25");
  EXPECT_EQ(PickleValue::Tuple({PickleValue::None()})->DebugString(), "(None,)");
  PickleValue::Items many;
  for (int i = 0; i < 1000; ++i) many.push_back(PickleValue::Int(i));
  std::string s = PickleValue::List(many)->DebugString();
  EXPECT_THAT(s, HasSubstr("48, 49, ... (1000 items)]"));
  // Nesting beyond max_depth is elided.
  PickleRef deep = PickleValue::Int(1);
  for (int i = 0; i < 20; ++i) deep = PickleValue::List({deep});
  EXPECT_EQ(deep->DebugString(2), "[[...]]");
  // A heavily shared tree (2**40 paths) prints in bounded time and size.
  PickleRef shared = PickleValue::Str("leaf");
  for (int i = 0; i < 40; ++i) shared = PickleValue::List({shared, shared});
  EXPECT_LT(shared->DebugString(100).size(), 100000u);
}

// ---------------------------------------------------------------- writer

TEST(WritePickleTest, MatchesCPythonBytes) {
  // Expected strings are pickle.dumps output of CPython 3.11 for the same values.
  EXPECT_EQ(WritePickle(*PickleValue::Bytes("a\xff"
                                            "b"))
                .value(),
            "\x80\x02"
            "c_codecs\nencode\nq\x00X\x04\x00\x00\x00"
            "a\xc3\xbf"
            "bq\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04."s);
  EXPECT_EQ(
      WritePickle(*PickleValue::List({PickleValue::Bytes("x"), PickleValue::Bytes("y")})).value(),
      "\x80\x02]q\x00(c_codecs\nencode\nq\x01X\x01\x00\x00\x00xq\x02X\x06\x00\x00\x00latin1q"
      "\x03\x86q\x04Rq\x05h\x01X\x01\x00\x00\x00yq\x06h\x03\x86q\x07Rq\x08"
      "e."s);
  EXPECT_EQ(WritePickle(*PickleValue::Set({PickleValue::Int(7)})).value(),
            "\x80\x02"
            "c__builtin__\nset\nq\x00]q\x01K\x07"
            "a\x85q\x02Rq\x03."s);
  PickleRef od = PickleValue::Call(PickleValue::MakeGlobal("collections", "OrderedDict"), nullptr);
  od->object().dict_items = {{PickleValue::Str("a"), PickleValue::Int(1)},
                             {PickleValue::Str("b"), PickleValue::Int(2)}};
  EXPECT_EQ(WritePickle(*od).value(),
            "\x80\x02"
            "ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00"
            "aq\x02K\x01X\x01\x00\x00\x00"
            "bq\x03K\x02u."s);
  PickleRef d = PickleValue::Dict(
      {{PickleValue::Str("a"), PickleValue::Int(1)},
       {PickleValue::Str("b"), PickleValue::List({PickleValue::Float(1.5), PickleValue::None(),
                                                  PickleValue::Bool(true)})}});
  EXPECT_EQ(WritePickle(*d, {.protocol = 4}).value(),
            "\x80\x04\x95\x1e\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01"
            "a\x94K\x01\x8c\x01"
            "b\x94]\x94(G?\xf8\x00\x00\x00\x00\x00\x00N\x88"
            "eu."s);
  PickleValue::Items ints;
  for (int64_t v :
       {int64_t{0}, int64_t{255}, int64_t{256}, int64_t{65535}, int64_t{65536}, int64_t{-1},
        -(int64_t{1} << 31), (int64_t{1} << 31) - 1, int64_t{1} << 31, -(int64_t{1} << 31) - 1,
        std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()}) {
    ints.push_back(PickleValue::Int(v));
  }
  EXPECT_EQ(WritePickle(*PickleValue::List(ints)).value(),
            "\x80\x02]q\x00(K\x00K\xffM\x00\x01M\xff\xffJ\x00\x00\x01\x00J\xff\xff\xff\xffJ\x00\x00"
            "\x00\x80J\xff\xff\xff\x7f\x8a\x05\x00\x00\x00\x80\x00\x8a\x05\xff\xff\xff\x7f\xff\x8a"
            "\x08\xff\xff\xff\xff\xff\xff\xff\x7f\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"
            "e."s);
  EXPECT_EQ(WritePickle(*PickleValue::Set({PickleValue::Int(1)}), {.protocol = 4}).value(),
            "\x80\x04\x95\x07\x00\x00\x00\x00\x00\x00\x00\x8f\x94(K\x01\x90."s);
  EXPECT_EQ(WritePickle(*PickleValue::Set(), {.protocol = 4}).value(), "\x80\x04\x8f\x94."s);
  PickleValue::Items thousand;
  for (int i = 0; i < 1000; ++i) thousand.push_back(PickleValue::Int(i));
  // A full last batch is followed by an empty one, as CPython's save_set writes it.
  EXPECT_TRUE(WritePickle(*PickleValue::Set(thousand), {.protocol = 4})
                  .value()
                  .ends_with("M\xe7\x03\x90(\x90."s));
}

TEST(WritePickleTest, GlobalsAreMemoized) {
  PickleRef size = PickleValue::Call(PickleValue::MakeGlobal("torch", "Size"),
                                     PickleValue::Tuple({PickleValue::Tuple()}));
  PickleRef size2 = PickleValue::Call(PickleValue::MakeGlobal("torch", "Size"),
                                      PickleValue::Tuple({PickleValue::Tuple()}));
  PickleRef list = PickleValue::List({size, size2, PickleValue::MakeGlobal("torch", "float32")});
  DCPP_ASSERT_OK_AND_ASSIGN(std::string p2, WritePickle(*list));
  EXPECT_EQ(p2.find("ctorch\nSize\n"), p2.rfind("ctorch\nSize\n"));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string p4, WritePickle(*list, {.protocol = 4}));
  // "torch" is written once; later uses are BINGETs.
  EXPECT_EQ(p4.find("\x8c\x05torch"), p4.rfind("\x8c\x05torch"));
  EXPECT_EQ(Count(p4, '\x93'), 2u);  // STACK_GLOBAL for Size and float32 only
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef back, ReadPickle(p4));
  EXPECT_TRUE(Equal(*back, *list));
}

TEST(WritePickleTest, BatchesOfAThousand) {
  // None items keep the opcode bytes countable: only N, MARK and the batch opcodes appear.
  PickleValue::Items items;
  for (int i = 0; i < 2500; ++i) items.push_back(PickleValue::None());
  DCPP_ASSERT_OK_AND_ASSIGN(std::string l, WritePickle(*PickleValue::List(items)));
  EXPECT_EQ(Count(l, 'e'), 3u);
  EXPECT_EQ(Count(l, '('), 3u);
  PickleValue::DictItems kv;
  for (int i = 0; i < 1001; ++i) kv.emplace_back(PickleValue::None(), PickleValue::None());
  // A real dict: MARK 1000 SETITEMS MARK 1 SETITEMS (CPython's batch_dict_exact).
  DCPP_ASSERT_OK_AND_ASSIGN(std::string d, WritePickle(*PickleValue::Dict(kv)));
  EXPECT_EQ(Count(d, 'u'), 2u);
  EXPECT_EQ(Count(d, 's'), 0u);
  EXPECT_TRUE(d.ends_with("(NNu."));
  // Exactly 1000: CPython's dict loop runs while the last batch was full, so an empty batch
  // follows (lists stop at the item count instead).
  DCPP_ASSERT_OK_AND_ASSIGN(
      std::string d1000,
      WritePickle(*PickleValue::Dict(PickleValue::DictItems(kv.begin(), kv.begin() + 1000))));
  EXPECT_TRUE(d1000.ends_with("NNu(u."));
  DCPP_ASSERT_OK_AND_ASSIGN(
      std::string l1000,
      WritePickle(*PickleValue::List(PickleValue::Items(items.begin(), items.begin() + 1000))));
  EXPECT_TRUE(l1000.ends_with("NNe."));
  // Object items come from an iterator in CPython: the lone last item uses SETITEM.
  PickleRef od = PickleValue::Call(PickleValue::MakeGlobal("collections", "OrderedDict"), nullptr);
  od->object().dict_items = kv;
  DCPP_ASSERT_OK_AND_ASSIGN(std::string o, WritePickle(*od));
  EXPECT_EQ(Count(o, '('), 1u);
  EXPECT_TRUE(o.ends_with("NNuNNs."));
  // A single item: APPEND / SETITEM without MARK.
  DCPP_ASSERT_OK_AND_ASSIGN(std::string one,
                            WritePickle(*PickleValue::List({PickleValue::None()})));
  EXPECT_EQ(one, "\x80\x02]q\x00Na."s);
  for (const std::string& data : {l, d, o, d1000, l1000}) {
    DCPP_ASSERT_OK_AND_ASSIGN(PickleRef back, ReadPickle(data));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string again, WritePickle(*back));
    EXPECT_EQ(again, data);
  }
}

// Frame lengths of a protocol-4 pickle, in order (opcodes walked with a minimal decoder for the
// opcodes this test writes).
std::vector<uint64_t> FrameLengths(const std::string& data) {
  std::vector<uint64_t> frames;
  for (size_t pos = data.find('\x95'); pos != std::string::npos;) {
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i)
      n |= uint64_t{static_cast<unsigned char>(data[pos + 1 + i])} << (8 * i);
    frames.push_back(n);
    size_t next = pos + 9 + n;
    pos = next < data.size() && data[next] == '\x95' ? next : std::string::npos;
  }
  return frames;
}

TEST(WritePickleTest, Protocol4Frames) {
  PickleValue::Items items;
  for (int i = 0; i < 50000; ++i) items.push_back(PickleValue::Int(100000 + i));  // 5 bytes each
  PickleRef list = PickleValue::List(items);
  DCPP_ASSERT_OK_AND_ASSIGN(std::string data, WritePickle(*list, {.protocol = 4}));
  std::vector<uint64_t> frames = FrameLengths(data);
  ASSERT_EQ(frames.size(), 4u);
  uint64_t total = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    if (i + 1 < frames.size()) {
      EXPECT_GE(frames[i], 64u * 1024);
      EXPECT_LT(frames[i], 64u * 1024 + 16);
    }
    total += frames[i];
  }
  EXPECT_EQ(total + 9 * frames.size() + 2, data.size());
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef back, ReadPickle(data));
  EXPECT_TRUE(Equal(*back, *list));

  // A payload of 64 KiB or more is written outside any frame.
  PickleRef big =
      PickleValue::List({PickleValue::Bytes(std::string(70000, 'b')), PickleValue::Int(1)});
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bd, WritePickle(*big, {.protocol = 4}));
  // As CPython: the 3-byte frame before it loses its header (frames under 4 bytes are not
  // framed), the payload follows unframed, and a new 5-byte frame holds the rest.
  EXPECT_EQ(bd.substr(0, 10), "\x80\x04]\x94(B\x70\x11\x01\x00"s);
  EXPECT_EQ(bd.substr(10 + 70000),
            "\x95\x05\x00\x00\x00\x00\x00\x00\x00\x94K\x01"
            "e."s);
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef bback, ReadPickle(bd));
  EXPECT_TRUE(Equal(*bback, *big));
}

PickleRef Representative() {
  PickleRef shared = PickleValue::List({PickleValue::Str("shared")});
  PickleRef size = PickleValue::Call(
      PickleValue::MakeGlobal("torch", "Size"),
      PickleValue::Tuple({PickleValue::Tuple({PickleValue::Int(2), PickleValue::Int(3)})}));
  PickleRef meta = PickleValue::New(
      PickleValue::MakeGlobal("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
      PickleValue::Tuple(),
      PickleValue::Dict({{PickleValue::Str("offsets"), size}, {PickleValue::Str("sizes"), size}}));
  PickleRef od = PickleValue::Call(PickleValue::MakeGlobal("collections", "OrderedDict"), nullptr);
  od->object().dict_items = {{PickleValue::Str("w"), PickleValue::Float(-2.5)}};
  PickleValue::Items long_list;
  for (int i = 0; i < 1500; ++i) long_list.push_back(PickleValue::Int(i * 1000003LL));
  return PickleValue::Dict({
      {PickleValue::Str("none"), PickleValue::None()},
      {PickleValue::Str("bools"),
       PickleValue::Tuple({PickleValue::Bool(true), PickleValue::Bool(false)})},
      {PickleValue::Str("ints"),
       PickleValue::List({PickleValue::Int(0), PickleValue::Int(-1),
                          PickleValue::Int(int64_t{1} << 40),
                          PickleValue::Int(std::numeric_limits<int64_t>::min())})},
      {PickleValue::Str("float"), PickleValue::Float(3.25)},
      {PickleValue::Str("unicode \xc3\xa9\xe2\x82\xac"), PickleValue::Str(std::string(300, 'u'))},
      {PickleValue::Str("bytes"), PickleValue::Bytes("\x00\x80\xff"s)},
      {PickleValue::Str("empty bytes"), PickleValue::Bytes("")},
      {PickleValue::Str("big bytes"), PickleValue::Bytes(std::string(70000, '\xab'))},
      {PickleValue::Str("tuple4"), PickleValue::Tuple({PickleValue::Int(1), PickleValue::Int(2),
                                                       PickleValue::Int(3), PickleValue::Int(4)})},
      {PickleValue::Str("set"), PickleValue::Set({PickleValue::Int(1), PickleValue::Str("s")})},
      {PickleValue::Str("empty set"), PickleValue::Set()},
      {PickleValue::Tuple({PickleValue::Int(1), PickleValue::Str("k")}), shared},
      {PickleValue::Str("again"), shared},
      {PickleValue::Str("meta"), meta},
      {PickleValue::Str("od"), od},
      {PickleValue::Str("pid"), PickleValue::PersistentId(PickleValue::Tuple(
                                    {PickleValue::Str("storage"), PickleValue::Int(0)}))},
      {PickleValue::Str("long"), PickleValue::List(long_list)},
  });
}

TEST(WritePickleTest, RoundTripsBothProtocols) {
  PickleRef tree = Representative();
  PickleAllowList dcp = PickleAllowList::DcpMetadata();
  for (int protocol : {2, 4}) {
    SCOPED_TRACE(protocol);
    DCPP_ASSERT_OK_AND_ASSIGN(std::string data, WritePickle(*tree, {.protocol = protocol}));
    DCPP_ASSERT_OK_AND_ASSIGN(PickleRef back, Read(data, &dcp));
    EXPECT_TRUE(Equal(*back, *tree)) << back->DebugString();
    // Sharing survives: both references read back as one node.
    EXPECT_EQ(back->FindStrKey("again"), back->dict_items()[11].second.get());
    DCPP_ASSERT_OK_AND_ASSIGN(std::string again, WritePickle(*back, {.protocol = protocol}));
    EXPECT_EQ(again, data);
  }
}

TEST(WritePickleTest, SharedNodesAreWrittenOnce) {
  PickleRef v = PickleValue::Str(std::string(1000, 'z'));
  for (int i = 0; i < 64; ++i) v = PickleValue::Tuple({v, v});  // 2**64 paths
  for (int protocol : {2, 4}) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string data, WritePickle(*v, {.protocol = protocol}));
    EXPECT_LT(data.size(), 2000u);
    DCPP_ASSERT_OK_AND_ASSIGN(PickleRef back, ReadPickle(data));
    EXPECT_EQ(back->items()[0].get(), back->items()[1].get());
  }
}

TEST(WritePickleTest, RejectsUnwritableTrees) {
  EXPECT_THAT(WritePickle(*PickleValue::None(), {.protocol = 3}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("protocol 3")));
  PickleValue::Object o;
  PickleRef no_callable = std::make_shared<PickleValue>(Kind::kObject, o);
  EXPECT_THAT(WritePickle(*no_callable),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("callable")));
  PickleRef ex = PickleValue::New(PickleValue::MakeGlobal("torch", "Size"), nullptr);
  ex->object().kwargs = PickleValue::Dict({{PickleValue::Str("k"), PickleValue::Int(1)}});
  EXPECT_THAT(WritePickle(*ex), StatusIs(StatusCode::kInvalidArgument, HasSubstr("protocol 4")));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string p4, WritePickle(*ex, {.protocol = 4}));
  EXPECT_NE(p4.find('\x92'), std::string::npos);
  EXPECT_THAT(WritePickle(*PickleValue::MakeGlobal("a\nb", "c")),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("newline")));
  EXPECT_THAT(WritePickle(*PickleValue::List({nullptr})),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("null list item")));
  PickleRef deep = PickleValue::None();
  for (int i = 0; i < 1000; ++i) deep = PickleValue::List({deep});
  EXPECT_THAT(WritePickle(*deep), StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_depth")));
  EXPECT_THAT(WritePickle(*deep, {.protocol = 2, .max_depth = 1001}), IsOk());
}

}  // namespace
}  // namespace dcpp

namespace dcpp {
namespace {

// A real checkpoint of a large model memoizes one entry per string and object: more than any
// fixed limit allowed before. The default limits scale with the input instead.
TEST(PickleLimitsTest, DefaultLimitsScaleWithTheInput) {
  std::string p("\x80\x02}q\x00(", 6);
  const int kEntries = 1200000;  // past the old fixed 2^20 memo entries
  p.reserve(kEntries * 8);
  for (int i = 0; i < kEntries; ++i) {
    p += 'K';  // BININT1 i % 256 as a key, memoized by LONG_BINPUT, value None
    p += static_cast<char>(i % 256);
    p += 'r';
    const uint32_t idx = static_cast<uint32_t>(i + 1);
    p.append(reinterpret_cast<const char*>(&idx), 4);
    p += 'N';
  }
  p += "u.";
  DCPP_ASSERT_OK_AND_ASSIGN(PickleRef v, ReadPickle(p));
  EXPECT_TRUE(v != nullptr);
}

}  // namespace
}  // namespace dcpp
