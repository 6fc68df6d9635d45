// The direct `.metadata` decoder against the tree path: on every input both accept the Metadata
// must be identical, an input the tree path refuses must not be accepted, and what the writers
// emit (PyTorch 1.13 and 2.13 goldens, every dcpp flavor and protocol) must take the direct path.
#include "codec/metadata_reader.h"

#include <random>

#include "codec/pickle.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using internal::DecodeMetadataDirect;
using internal::DecodeMetadataTree;
using internal::MetadataDifference;
using ::testing::HasSubstr;

enum class Outcome { kBoth, kTreeOnly, kNeither };

// The tree path's verdict stands; the direct decoder may decline, but what it accepts must be
// accepted by the tree path with an identical result.
Outcome ExpectAgree(std::string_view bytes, const std::string& what) {
  auto tree = DecodeMetadataTree(bytes);
  auto direct = DecodeMetadataDirect(bytes);
  if (direct.ok()) {
    EXPECT_TRUE(tree.ok()) << what << ": direct decoder accepted what the tree path refuses: "
                           << tree.status().ToString();
    if (!tree.ok()) return Outcome::kNeither;
    EXPECT_EQ(MetadataDifference(*tree, *direct), "") << what;
    return Outcome::kBoth;
  }
  EXPECT_TRUE(direct.status().code() == StatusCode::kDataLoss ||
              direct.status().code() == StatusCode::kUnimplemented)
      << what << ": " << direct.status().ToString();
  return tree.ok() ? Outcome::kTreeOnly : Outcome::kNeither;
}

// Both must accept and agree (what the writers emit).
void ExpectDirect(std::string_view bytes, const std::string& what) {
  auto tree = DecodeMetadataTree(bytes);
  ASSERT_TRUE(tree.ok()) << what << ": " << tree.status().ToString();
  auto direct = DecodeMetadataDirect(bytes);
  ASSERT_TRUE(direct.ok()) << what << ": " << direct.status().ToString();
  EXPECT_EQ(MetadataDifference(*tree, *direct), "") << what;
}

std::vector<std::string> GoldenFiles() { return ::dcpp::testing::MetadataGoldenPaths(); }

TEST(MetadataReaderTest, GoldensFromPyTorchAndDcppTakeTheDirectPath) {
  const auto files = GoldenFiles();
  ASSERT_GE(files.size(), 8u);
  for (const auto& f : files) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, ::dcpp::testing::ReadFileBytes(f));
    ExpectDirect(bytes, f);
  }
  // Facts of the 2.13 golden the direct path must get right: StorageMeta with a PosixPath id.
  DCPP_ASSERT_OK_AND_ASSIGN(std::string sync, ::dcpp::testing::ReadFileBytes(
                                                  ::dcpp::testing::SourceDir() +
                                                  "/tests/data/dcp_213_2ranks/sync/.metadata"));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, DecodeMetadataDirect(sync));
  ASSERT_TRUE(md.storage_meta.has_value());
  EXPECT_TRUE(md.storage_meta->checkpoint_id.has_value());
  EXPECT_EQ(md.version, "1.0.0");
  EXPECT_TRUE(md.planner_data.has_value());
  EXPECT_GT(md.storage_data.size(), 0u);
}

// Random metadata: sharded tensors of 0-4 dims, bytes entries, planner paths of str and int
// parts, index hints present or absent, transform descriptors, storage_meta present or absent,
// integers of every pickle width, names past SHORT_BINUNICODE and with UTF-8.
Metadata RandomMetadata(std::mt19937_64& rng, int entries) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto number = [&]() -> int64_t {
    switch (pick(0, 4)) {
      case 0:
        return pick(0, 255);
      case 1:
        return pick(256, 65535);
      case 2:
        return pick(65536, (int64_t{1} << 31) - 1);
      case 3:
        return pick(int64_t{1} << 31, int64_t{1} << 40);
      default:
        return pick(int64_t{1} << 40, std::numeric_limits<int64_t>::max());
    }
  };
  Metadata md;
  if (pick(0, 3) != 0) md.planner_data.emplace();
  for (int i = 0; i < entries; ++i) {
    std::string fqn = "m.layer" + std::to_string(i);
    if (pick(0, 15) == 0) fqn += std::string(static_cast<size_t>(pick(250, 300)), 'x');
    if (pick(0, 10) == 0) fqn += "\xc3\xa9";
    if (pick(0, 5) == 0) {
      md.state_dict_metadata[fqn] = BytesStorageMetadata{};
      md.storage_data[{fqn, std::nullopt, pick(0, 1) ? std::optional<int64_t>(0) : std::nullopt}] =
          {"__0_0.distcp", number(), number(), {}};
    } else {
      TensorStorageMetadata t;
      t.properties.dtype = static_cast<DType>(pick(0, kNumDTypes - 1));
      t.properties.requires_grad = pick(0, 1);
      t.properties.pin_memory = pick(0, 1);
      t.properties.memory_format = static_cast<MemoryFormat>(pick(0, 2));
      const int dims = static_cast<int>(pick(0, 4));
      for (int d = 0; d < dims; ++d) t.size.push_back(number());
      const int shards = static_cast<int>(pick(0, 6));
      for (int c = 0; c < shards; ++c) {
        ChunkBox box;
        for (int d = 0; d < dims; ++d) {
          box.offsets.push_back(d == 0 ? c * 1000 : 0);
          box.sizes.push_back(number());
        }
        MetadataIndex idx{fqn, box.offsets, std::nullopt};
        if (pick(0, 1)) idx.index = c;
        StorageInfo info{"__" + std::to_string(c) + "_0.distcp", number(), number(), {}};
        if (pick(0, 6) == 0) info.transform_descriptors = {"stream.zstd/1"};
        if (pick(0, 20) == 0) info.transform_descriptors = {"a", "b"};
        md.storage_data[idx] = info;
        t.chunks.push_back(std::move(box));
      }
      md.state_dict_metadata[fqn] = std::move(t);
    }
    if (md.planner_data) {
      ObjectPath path = {std::string("m")};
      for (int p = 0; p < pick(0, 3); ++p) {
        if (pick(0, 1)) {
          path.emplace_back(int64_t{pick(0, 70000)});
        } else {
          path.emplace_back("p" + std::to_string(p));
        }
      }
      (*md.planner_data)[fqn] = std::move(path);
    }
  }
  if (pick(0, 2) != 0) {
    StorageMeta sm;
    if (pick(0, 1)) sm.checkpoint_id = "/ckpt/step_" + std::to_string(pick(0, 9999));
    if (pick(0, 1)) sm.save_id = "0f3c";
    for (int m = 0; m < pick(0, 3); ++m) sm.modules.push_back("mod" + std::to_string(m));
    md.storage_meta = std::move(sm);
  }
  if (pick(0, 3) != 0) md.version = "1.0.0";
  return md;
}

TEST(MetadataReaderTest, GeneratedMetadataOfEveryFlavorAndProtocolAgrees) {
  std::mt19937_64 rng(20261201);
  int compared = 0;
  for (int round = 0; round < 150; ++round) {
    const Metadata md = RandomMetadata(rng, 1 + round % 17);
    for (auto flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch2Portable,
                        MetadataFlavor::kTorch113Prototype}) {
      for (int protocol : {2, 4}) {
        DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeMetadata(md, {flavor, protocol}));
        ExpectDirect(bytes, "round " + std::to_string(round));
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 150 * 6);
}

TEST(MetadataReaderTest, LargeBatchesAndFramesAgree) {
  // Past 1000-item batches, 256 memo entries and many 64 KiB frames.
  Metadata md;
  md.planner_data.emplace();
  TensorStorageMetadata big{{DType::kFloat32}, {8000, 16}, {}};
  for (int i = 0; i < 2001; ++i) {
    const std::string fqn = "w" + std::to_string(i);
    md.state_dict_metadata[fqn] = TensorStorageMetadata{{DType::kBFloat16}, {8}, {{{0}, {8}}}};
    md.storage_data[{fqn, Shape{0}, 0}] = {"__0_0.distcp", i * 100, 100, {}};
    (*md.planner_data)[fqn] = {std::string("m"), int64_t{i}};
    big.chunks.push_back({{int64_t{i} * 4, 0}, {4, 16}});
    md.storage_data[{"big", Shape{int64_t{i} * 4, 0}, i}] = {"__1_0.distcp", i * 256, 256, {}};
  }
  md.state_dict_metadata["big"] = std::move(big);
  md.storage_meta = StorageMeta{std::string(70 * 1024, 'c'), std::string("s"), std::nullopt, {}};
  for (int protocol : {2, 4}) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes,
                              EncodeMetadata(md, {MetadataFlavor::kTorch2, protocol}));
    ExpectDirect(bytes, "protocol " + std::to_string(protocol));
  }
}

// ---- pickles other writers could produce, built as trees

PickleRef G(const char* module, const char* name) { return PickleValue::MakeGlobal(module, name); }
PickleRef S(const std::string& s) { return PickleValue::Str(s); }
PickleRef I(int64_t i) { return PickleValue::Int(i); }
PickleRef Tup(PickleValue::Items items) { return PickleValue::Tuple(std::move(items)); }
std::pair<PickleRef, PickleRef> F(const char* k, PickleRef v) { return {S(k), std::move(v)}; }
constexpr const char* kMeta = "torch.distributed.checkpoint.metadata";

PickleRef Size(std::initializer_list<int64_t> dims) {
  PickleValue::Items items;
  for (int64_t d : dims) items.push_back(I(d));
  return PickleValue::Call(G("torch", "Size"), Tup({Tup(std::move(items))}));
}
PickleRef Obj(const char* name, PickleValue::DictItems fields) {
  return PickleValue::New(G(kMeta, name), Tup({}), PickleValue::Dict(std::move(fields)));
}
PickleRef Props(PickleRef memory_format, PickleRef strides) {
  PickleValue::Items state = {
      G("torch", "float16"),
      PickleValue::Call(G("torch.serialization", "_get_layout"), Tup({S("torch.strided")})),
      PickleValue::Bool(true), std::move(memory_format), PickleValue::Bool(false)};
  if (strides) state.push_back(std::move(strides));
  return PickleValue::New(G(kMeta, "TensorProperties"), Tup({}), Tup(std::move(state)));
}
PickleRef MemFormat(int i) {
  return PickleValue::Call(G(kMeta, "_MEM_FORMAT_ENCODING"), Tup({I(i)}));
}

struct Parts {
  PickleRef props = Props(MemFormat(0), nullptr);
  PickleRef size = Size({4, 6});
  PickleRef offsets = Size({0, 0});
  PickleRef planner;
  PickleRef checkpoint_id = S("/ck");
  PickleRef extra_field;  // an unknown field of the Metadata object
  bool duplicate_version = false;
};

PickleRef Root(const Parts& p) {
  PickleRef chunk = Obj("ChunkStorageMetadata", {F("offsets", p.offsets), F("sizes", p.size)});
  PickleRef tensor = Obj("TensorStorageMetadata", {F("properties", p.props), F("size", p.size),
                                                   F("chunks", PickleValue::List({chunk, chunk}))});
  PickleRef idx = Obj("MetadataIndex",
                      {F("fqn", S("w")), F("index", PickleValue::None()), F("offset", p.offsets)});
  PickleRef info = PickleValue::New(
      G("torch.distributed.checkpoint.filesystem", "_StorageInfo"), Tup({}),
      PickleValue::Dict({F("relative_path", S("__0_0.distcp")), F("offset", I(0)),
                         F("length", I(96)), F("transform_descriptors", Tup({}))}));
  PickleRef meta = Obj("StorageMeta", {F("checkpoint_id", p.checkpoint_id), F("save_id", S("s")),
                                       F("load_id", PickleValue::None()),
                                       F("modules", PickleValue::List({S("a")}))});
  PickleValue::DictItems fields = {
      F("state_dict_metadata",
        PickleValue::Dict({{S("w"), tensor}, {S("b"), Obj("BytesStorageMetadata", {})}})),
      F("planner_data", p.planner ? p.planner : PickleValue::None()),
      F("storage_data", PickleValue::Dict({{idx, info}})), F("storage_meta", meta),
      F("version", S("1.0.0"))};
  if (p.duplicate_version) fields.push_back(F("version", S("2.0.0")));
  if (p.extra_field) fields.push_back(F("extra", p.extra_field));
  return Obj("Metadata", std::move(fields));
}

std::string Pickled(const PickleRef& root, int protocol = 4) {
  auto bytes = WritePickle(*root, {protocol});
  EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
  return bytes.ok() ? *bytes : std::string();
}

TEST(MetadataReaderTest, VariantsOfOtherWritersTakeTheDirectPath) {
  std::vector<std::pair<std::string, Parts>> cases;
  cases.emplace_back("plain", Parts{});
  Parts six;
  six.props = Props(MemFormat(1), Tup({I(6), I(1)}));
  cases.emplace_back("6-field properties with strides", six);
  Parts six_none;
  six_none.props = Props(MemFormat(2), PickleValue::None());
  cases.emplace_back("6-field properties, strides None", six_none);
  Parts getattr_form;
  getattr_form.props =
      Props(PickleValue::Call(G("builtins", "getattr"),
                              Tup({G(kMeta, "_MEM_FORMAT_ENCODING"), S("TORCH_CHANNELS_LAST")})),
            nullptr);
  cases.emplace_back("getattr enum", getattr_form);
  Parts old_path;
  old_path.checkpoint_id =
      PickleValue::Call(G("pathlib", "PosixPath"), Tup({S("/"), S("tmp"), S("ck")}));
  cases.emplace_back("pathlib parts", old_path);
  Parts new_path;
  new_path.checkpoint_id = PickleValue::Call(G("pathlib._local", "PosixPath"), Tup({S("/tmp/ck")}));
  cases.emplace_back("pathlib._local", new_path);
  Parts unbuilt_props;
  unbuilt_props.props = PickleValue::New(G(kMeta, "TensorProperties"), Tup({}));
  cases.emplace_back("properties never built (defaults)", unbuilt_props);
  Parts planner;
  planner.planner = PickleValue::Dict(
      {{S("w"), Tup({S("w")})}, {S("b"), PickleValue::List({S("x"), I(3), S("b")})}});
  cases.emplace_back("planner data with a list path", planner);
  Parts nested;
  nested.planner = PickleValue::Dict(
      {{S("w"), Tup({S("w")})},
       {S("b"), Tup({PickleValue::List({S("x")}), PickleValue::Dict({{S("k"), I(1)}})})}});
  cases.emplace_back("planner data with nested lists and dicts (dropped)", nested);
  Parts not_dict;
  not_dict.planner = PickleValue::List({S("w")});
  cases.emplace_back("planner data that is not a dict (dropped)", not_dict);
  Parts dup;
  dup.duplicate_version = true;
  cases.emplace_back("duplicate field (last wins)", dup);
  Parts extra;
  extra.extra_field = PickleValue::Dict({{S("deep"), PickleValue::List({Tup({I(1), S("x")})})}});
  cases.emplace_back("unknown field", extra);
  Parts shared;  // torch.Size and TensorProperties referenced from several places (memo)
  shared.size = shared.offsets = Size({4, 4});
  cases.emplace_back("memo-shared sizes", shared);

  for (const auto& [name, parts] : cases) {
    for (int protocol : {2, 4}) {
      ExpectDirect(Pickled(Root(parts), protocol),
                   name + " (protocol " + std::to_string(protocol) + ")");
    }
  }
  // A shared TensorProperties node, written once and fetched with BINGET.
  PickleRef props = Props(MemFormat(0), nullptr);
  PickleRef t1 = Obj(
      "TensorStorageMetadata",
      {F("properties", props), F("size", Size({2})),
       F("chunks", PickleValue::List({Obj("ChunkStorageMetadata",
                                          {F("offsets", Size({0})), F("sizes", Size({2}))})}))});
  PickleRef t2 = Obj("TensorStorageMetadata", {F("properties", props), F("size", Size({3})),
                                               F("chunks", PickleValue::List())});
  PickleRef root = Obj(
      "Metadata",
      {F("state_dict_metadata", PickleValue::Dict({{S("a"), t1}, {S("c"), t2}, {S("d"), t1}}))});
  const std::string bytes = Pickled(root);
  ExpectDirect(bytes, "shared TensorProperties and TensorStorageMetadata");
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, DecodeMetadataDirect(bytes));
  EXPECT_EQ(std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("d")).chunks.size(), 1u);
  EXPECT_EQ(std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("c")).properties.dtype,
            DType::kFloat16);
}

// Lists and tuples shared through the memo are checked once and read alike from every place.
TEST(MetadataReaderTest, SharedListsAndTuplesAgree) {
  for (PickleRef descriptors : {PickleValue::List({S("stream.zstd/1")}),
                                Tup({S("stream.zstd/1"), S("b")}), PickleValue::List({I(1)})}) {
    PickleValue::DictItems storage;
    PickleValue::DictItems entries;
    for (const char* fqn : {"a", "b", "c"}) {
      entries.push_back({S(fqn), Obj("BytesStorageMetadata", {})});
      storage.push_back(
          {Obj("MetadataIndex", {F("fqn", S(fqn))}),
           PickleValue::New(
               G("torch.distributed.checkpoint.filesystem", "_StorageInfo"), Tup({}),
               PickleValue::Dict({F("relative_path", S("__0_0.distcp")), F("offset", I(0)),
                                  F("length", I(4)), F("transform_descriptors", descriptors)}))});
    }
    const std::string bytes =
        Pickled(Obj("Metadata", {F("state_dict_metadata", PickleValue::Dict(std::move(entries))),
                                 F("storage_data", PickleValue::Dict(std::move(storage)))}));
    if (descriptors->is(PickleValue::Kind::kList) &&
        descriptors->items()[0]->is(PickleValue::Kind::kInt)) {
      EXPECT_EQ(ExpectAgree(bytes, "int descriptors"), Outcome::kNeither);
    } else {
      ExpectDirect(bytes, "shared descriptors");
    }
  }
  // A negative torch.Size shared by a chunk and an index: refused by both, wherever it is read.
  Parts negative;
  negative.offsets = Size({-1, 0});
  EXPECT_EQ(ExpectAgree(Pickled(Root(negative)), "negative offsets"), Outcome::kNeither);
}

TEST(MetadataReaderTest, ConstructsItDoesNotModelFallBackToTheTreePath) {
  // OrderedDict state_dict_metadata, dict-form TensorProperties, a class made by REDUCE: the
  // direct decoder declines (Unimplemented), ParseMetadata still reads them.
  PickleRef od = PickleValue::Call(G("collections", "OrderedDict"), Tup({}));
  od->object().dict_items.push_back({S("b"), Obj("BytesStorageMetadata", {})});
  PickleRef info =
      PickleValue::New(G("torch.distributed.checkpoint.filesystem", "_StorageInfo"), Tup({}),
                       PickleValue::Dict({F("relative_path", S("__0_0.distcp")), F("offset", I(0)),
                                          F("length", I(4))}));
  PickleRef root = Obj(
      "Metadata",
      {F("state_dict_metadata", od),
       F("storage_data", PickleValue::Dict({{Obj("MetadataIndex", {F("fqn", S("b"))}), info}}))});
  const std::string bytes = Pickled(root);
  EXPECT_THAT(DecodeMetadataDirect(bytes).status(),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("outside the direct decoder")));
  EXPECT_EQ(ExpectAgree(bytes, "OrderedDict"), Outcome::kTreeOnly);
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, ParseMetadata(bytes));
  EXPECT_EQ(md.state_dict_metadata.size(), 1u);

  PickleRef dict_props =
      PickleValue::New(G(kMeta, "TensorProperties"), Tup({}),
                       PickleValue::Dict({F("dtype", G("torch", "int8")),
                                          F("requires_grad", PickleValue::Bool(1))}));
  Parts p;
  p.props = dict_props;
  EXPECT_EQ(ExpectAgree(Pickled(Root(p)), "dict-form properties"), Outcome::kTreeOnly);
}

TEST(MetadataReaderTest, MalformedInputIsDataLossWithTheOffset) {
  const std::string good = Pickled(Root(Parts{}));
  EXPECT_THAT(DecodeMetadataDirect(good.substr(0, good.size() / 2)).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("metadata offset")));
  EXPECT_THAT(DecodeMetadataDirect(good + "x").status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("trailing bytes")));
  EXPECT_THAT(DecodeMetadataDirect(std::string("\x80\x04\x8c\xff", 4)).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("offset 2")));
  // A length of 2^64 - 1 is refused before anything is allocated.
  EXPECT_THAT(DecodeMetadataDirect(std::string("\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff", 11))
                  .status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("truncated")));
  EXPECT_THAT(DecodeMetadataDirect(std::string("\x80\x04h\x05.", 5)).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("memo index 5 is not set")));
  // os.system is not in the allow-list: never resolved, and the tree path's error stands.
  PickleRef evil = PickleValue::Call(G("os", "system"), Tup({S("true")}));
  EXPECT_FALSE(DecodeMetadataDirect(Pickled(evil)).ok());
  EXPECT_THAT(ParseMetadata(Pickled(evil)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("os.system")));
}

// Hand-written opcodes for the rules both readers must apply alike.
class Ops {
 public:
  Ops& Raw(std::string_view b) {
    out_.append(b);
    return *this;
  }
  Ops& Op(char c) { return Raw(std::string_view(&c, 1)); }
  Ops& Str(std::string_view s) {
    Op('X');
    const auto n = static_cast<uint32_t>(s.size());
    for (int i = 0; i < 4; ++i) Op(static_cast<char>((n >> (8 * i)) & 0xff));
    return Raw(s);
  }
  Ops& Global(std::string_view module, std::string_view name) {
    return Op('c').Raw(module).Op('\n').Raw(name).Op('\n');
  }
  // cls () NEWOBJ for a metadata class.
  Ops& New(std::string_view name) {
    return Global(kMeta, name).Op(')').Op(static_cast<char>(0x81));
  }
  std::string str() const { return out_; }

 private:
  std::string out_ = "\x80\x02";
};

// The Metadata of one float32 tensor "w" [2, 3], written with the MARK-based opcodes of
// protocols 0 and 1 (LIST, DICT, TUPLE, text INT/LONG, PUT/GET) where protocol 2 allows them.
std::string MarkBased() {
  Ops o;
  o.New("Metadata").Raw("p0\n").Op('(');
  o.Str("state_dict_metadata").Op('(').Str("w").New("TensorStorageMetadata").Op('(');
  o.Str("properties")
      .Global("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties")
      .Op(')')
      .Op(static_cast<char>(0x81))
      .Op('(')
      .Global("torch", "float32")
      .Global("torch.serialization", "_get_layout")
      .Op('(')
      .Str("torch.strided")
      .Op('t')
      .Op('R')
      .Raw("I00\n")
      .Global("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")
      .Op('(')
      .Raw("I0\n")
      .Op('t')
      .Op('R')
      .Raw("I01\n")
      .Op('t')
      .Op('b');
  // size: torch.Size((2, 3)) put in the memo as 7 and fetched again for the chunk's sizes.
  o.Str("size").Global("torch", "Size").Op('(').Op('(').Raw("I2\n").Raw("L3L\n").Op('t').Op('t');
  o.Op('R').Raw("p7\n");
  o.Str("chunks").Op('(').New("ChunkStorageMetadata").Op('(').Str("offsets");
  o.Global("torch", "Size").Op('(').Op('(').Raw("I0\nI0\n").Op('t').Op('t').Op('R');
  o.Str("sizes").Raw("g7\n").Op('d').Op('b').Op('l');  // chunk fields DICT, BUILD, LIST
  o.Op('d').Op('b');                                   // tensor fields DICT, BUILD
  o.Op('d');                                           // state_dict_metadata DICT
  o.Str("storage_data").Op('(');
  o.New("MetadataIndex").Op('(').Str("fqn").Str("w").Str("offset");
  o.Op('(').Raw("I0\nI0\n").Op('t').Op('d').Op('b');  // offset as a plain tuple
  o.Global("torch.distributed.checkpoint.filesystem", "_StorageInfo")
      .Op(')')
      .Op(static_cast<char>(0x81));
  o.Op('(').Str("relative_path").Str("__0_0.distcp").Str("offset").Raw("I0\n");
  o.Str("length").Raw("I24\n").Op('d').Op('b');
  o.Op('d');                                      // storage_data
  o.Str("version").Str("1.0.0").Op('2').Op('0');  // DUP, POP
  o.Op('d').Op('b').Op('.');
  return o.str();
}

TEST(MetadataReaderTest, MarkBasedOpcodesAgree) {
  const std::string bytes = MarkBased();
  ExpectDirect(bytes, "MARK-based");
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, ParseMetadata(bytes));
  const auto& t = std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("w"));
  EXPECT_EQ(t.size, (Shape{2, 3}));
  EXPECT_TRUE(t.properties.pin_memory);
  EXPECT_EQ(t.chunks[0].sizes, (Shape{2, 3}));
  DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* info, md.FindStorage({"w", Shape{0, 0}, {}}));
  EXPECT_EQ(info->length, 24);
}

// A BINUNICODE str, and single opcode bytes, for hand-written pickle pieces.
std::string U(std::string_view s) {
  std::string out = "X";
  const auto n = static_cast<uint32_t>(s.size());
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out.append(s);
}
std::string Bytes(std::initializer_list<int> b) {
  std::string out;
  for (int c : b) out.push_back(static_cast<char>(c));
  return out;
}

TEST(MetadataReaderTest, StructuralRulesMatchTheTreeReader) {
  const std::string base = MarkBased();
  const std::string head = base.substr(0, base.size() - 3);  // without "d b ."
  auto finish = [&](const std::string& extra) { return head + extra + "db."; };
  ASSERT_EQ(ExpectAgree(finish(""), "unchanged"), Outcome::kBoth);
  // "z": ([],), then an item appended to that list: a change after adoption, both refuse.
  const std::string adopted = U("z") + "]" + Bytes({'q', 9, 0x85, 'h', 9, 'K', 1, 'a', '0'});
  EXPECT_EQ(ExpectAgree(finish(adopted), "modified after adoption"), Outcome::kNeither);
  // The same append before the tuple is made: both accept.
  EXPECT_EQ(ExpectAgree(finish(U("z") + "]" + Bytes({'K', 1, 'a', 0x85})), "append first"),
            Outcome::kBoth);
  // A list that would contain itself.
  EXPECT_EQ(ExpectAgree(finish(U("z") + "]" + Bytes({'2', 'a'})), "self-containing list"),
            Outcome::kNeither);
  // A value nested 998 deep under an unknown field: within the tree reader's bound (the root
  // object ends at 1000), both accept; 999 and 1001 deep, both refuse.
  for (int depth : {998, 999, 1001}) {
    std::string nested = U("extra");
    for (int i = 0; i < depth; ++i) nested += ']';
    for (int i = 0; i < depth - 1; ++i) nested += 'a';
    const Outcome want = depth <= 998 ? Outcome::kBoth : Outcome::kNeither;
    EXPECT_EQ(ExpectAgree(finish(nested), "depth " + std::to_string(depth)), want);
  }
  // A memo index far past the input, put with LONG_BINPUT and read back.
  const std::string far =
      U("q") + U("v") + Bytes({'r', 0xff, 0xff, 0xff, 0x7f, '0', 'j', 0xff, 0xff, 0xff, 0x7f});
  EXPECT_EQ(ExpectAgree(finish(far), "sparse memo"), Outcome::kBoth);
  // MEMOIZE numbers an entry by the count of indices set: 2 after p0 and p7.
  EXPECT_EQ(ExpectAgree(finish(U("m") + U("v") + Bytes({0x94, '0', 'h', 2})), "MEMOIZE count"),
            Outcome::kBoth);
  EXPECT_EQ(ExpectAgree(finish(U("m") + U("v") + Bytes({0x94, '0', 'h', 3})), "unset index"),
            Outcome::kNeither);
  // STOP with two values, an open MARK; POP of a bare MARK.
  EXPECT_EQ(ExpectAgree(head + "dbN.", "two values"), Outcome::kNeither);
  EXPECT_EQ(ExpectAgree(head + "db(.", "open mark"), Outcome::kNeither);
  EXPECT_EQ(ExpectAgree(head + "db(0.", "pop of a mark"), Outcome::kBoth);
  // BUILD twice on the root.
  EXPECT_EQ(ExpectAgree(head + "db}b.", "second BUILD"), Outcome::kNeither);
}

// Every prefix of a real file, and random damage to it: never a crash, never an acceptance the
// tree path refuses, never a different result.
TEST(MetadataReaderTest, DamagedFilesNeverDisagree) {
  DCPP_ASSERT_OK_AND_ASSIGN(std::string golden, ::dcpp::testing::ReadFileBytes(
                                                    ::dcpp::testing::SourceDir() +
                                                    "/tests/data/dcp_213_2ranks/sync/.metadata"));
  Metadata small;
  small.state_dict_metadata["w"] = TensorStorageMetadata{{DType::kFloat32}, {4}, {{{0}, {4}}}};
  small.storage_data[{"w", Shape{0}, 0}] = {"__0_0.distcp", 0, 16, {}};
  small.storage_meta = StorageMeta{std::string("/c"), std::string("s"), std::nullopt, {}};
  small.version = "1.0.0";
  DCPP_ASSERT_OK_AND_ASSIGN(std::string mine, EncodeMetadata(small));
  for (size_t n = 0; n < mine.size(); ++n) {
    EXPECT_FALSE(DecodeMetadataDirect(mine.substr(0, n)).ok()) << n;
  }
  std::mt19937_64 rng(99);
  int both = 0, tree_only = 0, neither = 0;
  for (const std::string* input : {&golden, &mine}) {
    for (int round = 0; round < 3000; ++round) {
      std::string b = *input;
      const int edits = 1 + static_cast<int>(rng() % 3);
      for (int e = 0; e < edits; ++e) {
        const size_t at = rng() % b.size();
        switch (rng() % 4) {
          case 0:
            b[at] = static_cast<char>(rng());
            break;
          case 1:
            b[at] = static_cast<char>(b[at] ^ (1 << (rng() % 8)));
            break;
          case 2:
            b.erase(at, 1 + rng() % 4);
            break;
          default:
            b.insert(at, 1, static_cast<char>(rng()));
        }
        if (b.empty()) b = "x";
      }
      switch (ExpectAgree(b, "damaged round " + std::to_string(round))) {
        case Outcome::kBoth:
          ++both;
          break;
        case Outcome::kTreeOnly:
          ++tree_only;
          break;
        case Outcome::kNeither:
          ++neither;
      }
    }
  }
  // The damage leaves some files readable (changed strings, numbers), so the comparison bites.
  EXPECT_GT(both, 200);
  EXPECT_GT(neither, 1000);
  RecordProperty("both", both);
  RecordProperty("tree_only", tree_only);
}

TEST(MetadataReaderTest, DifferenceNamesWhatDiffers) {
  Metadata a;
  a.state_dict_metadata["w"] = TensorStorageMetadata{{DType::kFloat32}, {4}, {{{0}, {4}}}};
  a.storage_data[{"w", Shape{0}, 0}] = {"__0_0.distcp", 0, 16, {}};
  Metadata b = a;
  EXPECT_EQ(MetadataDifference(a, b), "");
  b.storage_data.begin()->second.length = 17;
  EXPECT_THAT(MetadataDifference(a, b), HasSubstr("storage of w@[0]"));
  b = a;
  auto node = b.storage_data.extract(b.storage_data.begin());
  node.key().index = 3;
  b.storage_data.insert(std::move(node));
  EXPECT_THAT(MetadataDifference(a, b), HasSubstr("index 3"));
  b = a;
  std::get<TensorStorageMetadata>(*b.state_dict_metadata.Find("w")).properties.strides = Shape{1};
  EXPECT_THAT(MetadataDifference(a, b), HasSubstr("properties"));
  b = a;
  b.planner_data.emplace();
  EXPECT_THAT(MetadataDifference(a, b), HasSubstr("planner_data"));
  b = a;
  b.version = "1.0.0";
  EXPECT_THAT(MetadataDifference(a, b), HasSubstr("version"));
}

}  // namespace
}  // namespace dcpp
