#include "dcpp/metadata.h"

#include "codec/metadata_encoder.h"
#include "codec/pickle.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

Metadata Sample() {
  Metadata md;
  md.state_dict_metadata["model.w"] = TensorStorageMetadata{
      {DType::kBFloat16, false, MemoryFormat::kContiguous, false, std::nullopt},
      {4, 6},
      {{{0, 0}, {2, 6}}, {{2, 0}, {2, 6}}}};
  md.state_dict_metadata["step"] = BytesStorageMetadata{};
  md.planner_data = std::map<std::string, ObjectPath>{
      {"model.w", {std::string("model"), std::string("w")}}, {"step", {std::string("step")}}};
  md.storage_data[{"model.w", Shape{0, 0}, 0}] = {"__0_0.distcp", 0, 1000, {}};
  md.storage_data[{"model.w", Shape{2, 0}, 1}] = {"__1_0.distcp", 0, 1000, {}};
  md.storage_data[{"step", std::nullopt, std::nullopt}] = {"__0_0.distcp", 1000, 700, {}};
  md.storage_meta = StorageMeta{std::string("/tmp/ck"), std::string("abc"), std::nullopt, {}};
  md.version = "1.0.0";
  return md;
}

void ExpectSame(const Metadata& a, const Metadata& b) {
  ASSERT_EQ(a.state_dict_metadata.size(), b.state_dict_metadata.size());
  for (const auto& [fqn, m] : a.state_dict_metadata) {
    const StorageMetadata* o = b.state_dict_metadata.Find(fqn);
    ASSERT_NE(o, nullptr) << fqn;
    ASSERT_EQ(m.index(), o->index()) << fqn;
    if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
      const auto& u = std::get<TensorStorageMetadata>(*o);
      EXPECT_EQ(t->properties, u.properties);
      EXPECT_EQ(t->size, u.size);
      EXPECT_EQ(t->chunks, u.chunks);
    }
  }
  EXPECT_EQ(a.storage_data.size(), b.storage_data.size());
  for (const auto& [k, v] : a.storage_data) {
    auto it = b.storage_data.find(k);
    ASSERT_NE(it, b.storage_data.end()) << k.ToString();
    EXPECT_EQ(it->second, v);
    EXPECT_EQ(it->first.index, k.index);
  }
}

TEST(MetadataTest, RoundTripsEveryFlavorAndProtocol) {
  Metadata md = Sample();
  for (auto flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch2Portable,
                      MetadataFlavor::kTorch113Prototype}) {
    for (int protocol : {2, 4}) {
      DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeMetadata(md, {flavor, protocol}));
      DCPP_ASSERT_OK_AND_ASSIGN(Metadata back, ParseMetadata(bytes));
      ExpectSame(md, back);
      EXPECT_EQ(back.planner_data, md.planner_data);
      if (flavor == MetadataFlavor::kTorch2) {
        ASSERT_TRUE(back.storage_meta.has_value());
        EXPECT_EQ(back.storage_meta->checkpoint_id, "/tmp/ck");
        EXPECT_EQ(back.version, "1.0.0");
      } else {
        EXPECT_FALSE(back.storage_meta.has_value());
      }
    }
  }
}

// A save encodes the planned part while it writes and the storage part at commit: the bytes
// must be EncodeMetadata's for every flavor and protocol, with or without the early step.
TEST(MetadataTest, EncoderInTwoStepsGivesEncodeMetadatasBytes) {
  const Metadata full = Sample();
  for (auto flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch2Portable,
                      MetadataFlavor::kTorch113Prototype}) {
    for (int protocol : {2, 4}) {
      SCOPED_TRACE(::testing::Message()
                   << "flavor " << static_cast<int>(flavor) << " protocol " << protocol);
      DCPP_ASSERT_OK_AND_ASSIGN(std::string want, EncodeMetadata(full, {flavor, protocol}));
      Metadata planned = full;
      planned.storage_data.clear();
      planned.storage_meta.reset();
      internal::MetadataEncoder early({flavor, protocol});
      early.Begin(planned);
      DCPP_ASSERT_OK_AND_ASSIGN(std::string two_steps, early.Finish(full));
      EXPECT_EQ(two_steps, want);
      internal::MetadataEncoder late({flavor, protocol});
      DCPP_ASSERT_OK_AND_ASSIGN(std::string one_step, late.Finish(full));
      EXPECT_EQ(one_step, want);
    }
  }
}

TEST(MetadataTest, SplitChecksTogetherAreValidateMetadata) {
  Metadata md = Sample();
  DCPP_EXPECT_OK(internal::ValidatePlannedMetadata(md, "ck"));
  DCPP_EXPECT_OK(internal::ValidateStorageData(md, "ck"));
  Metadata bad_chunk = Sample();
  std::get<TensorStorageMetadata>(*bad_chunk.state_dict_metadata.Find("model.w"))
      .chunks[1]
      .offsets[0] = 3;
  EXPECT_THAT(internal::ValidatePlannedMetadata(bad_chunk, "ck"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("model.w")));
  Metadata bad_file = Sample();
  bad_file.storage_data.begin()->second.relative_path = "../escape.distcp";
  DCPP_EXPECT_OK(internal::ValidatePlannedMetadata(bad_file, "ck"));
  EXPECT_FALSE(internal::ValidateStorageData(bad_file, "ck").ok());
  EXPECT_FALSE(ValidateMetadata(bad_file, "ck").ok());
}

// Builds TensorProperties the way other PyTorch versions pickle it.
PickleRef Props(PickleRef enum_value, bool six) {
  PickleValue::Items state = {
      PickleValue::MakeGlobal("torch", "float32"),
      PickleValue::Call(PickleValue::MakeGlobal("torch.serialization", "_get_layout"),
                        PickleValue::Tuple({PickleValue::Str("torch.strided")})),
      PickleValue::Bool(false), enum_value, PickleValue::Bool(false)};
  if (six) {
    state.push_back(PickleValue::Tuple({PickleValue::Int(3), PickleValue::Int(1)}));
  }
  return PickleValue::New(
      PickleValue::MakeGlobal("torch.distributed.checkpoint.metadata", "TensorProperties"),
      PickleValue::Tuple(), PickleValue::Tuple(std::move(state)));
}

PickleRef Size(std::initializer_list<int64_t> dims) {
  PickleValue::Items items;
  for (int64_t d : dims) items.push_back(PickleValue::Int(d));
  return PickleValue::Call(PickleValue::MakeGlobal("torch", "Size"),
                           PickleValue::Tuple({PickleValue::Tuple(std::move(items))}));
}

PickleRef Obj(const char* name, PickleValue::DictItems fields) {
  return PickleValue::New(PickleValue::MakeGlobal("torch.distributed.checkpoint.metadata", name),
                          PickleValue::Tuple(), PickleValue::Dict(std::move(fields)));
}

std::pair<PickleRef, PickleRef> F(const char* k, PickleRef v) { return {PickleValue::Str(k), v}; }

std::string Newest(PickleRef enum_value, PickleRef checkpoint_id) {
  PickleRef chunk =
      Obj("ChunkStorageMetadata", {F("offsets", Size({0, 0})), F("sizes", Size({2, 3}))});
  PickleRef tmd = Obj("TensorStorageMetadata",
                      {F("properties", Props(enum_value, true)), F("size", Size({2, 3})),
                       F("chunks", PickleValue::List({chunk}))});
  PickleRef idx =
      Obj("MetadataIndex", {F("fqn", PickleValue::Str("w")), F("index", PickleValue::Int(0)),
                            F("offset", Size({0, 0}))});
  PickleRef info = PickleValue::New(
      PickleValue::MakeGlobal("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
      PickleValue::Tuple(),
      PickleValue::Dict({F("relative_path", PickleValue::Str("__0_0.distcp")),
                         F("offset", PickleValue::Int(0)), F("length", PickleValue::Int(500)),
                         F("transform_descriptors", PickleValue::List())}));
  PickleRef meta =
      Obj("StorageMeta", {F("checkpoint_id", checkpoint_id), F("save_id", PickleValue::Str("s")),
                          F("load_id", PickleValue::None()), F("modules", PickleValue::List())});
  PickleRef root = Obj(
      "Metadata",
      {F("state_dict_metadata", PickleValue::Dict({{PickleValue::Str("w"), tmd}})),
       F("planner_data",
         PickleValue::Dict({{PickleValue::Str("w"), PickleValue::Tuple({PickleValue::Str("w")})}})),
       F("storage_data", PickleValue::Dict({{idx, info}})), F("storage_meta", meta),
       F("version", PickleValue::Str("1.0.0"))});
  return *WritePickle(*root, {4});
}

TEST(MetadataTest, ReadsNewestVariants) {
  const char* kEnum = "torch.distributed.checkpoint.metadata";
  PickleRef value_form = PickleValue::Call(PickleValue::MakeGlobal(kEnum, "_MEM_FORMAT_ENCODING"),
                                           PickleValue::Tuple({PickleValue::Int(1)}));
  PickleRef getattr_form =
      PickleValue::Call(PickleValue::MakeGlobal("builtins", "getattr"),
                        PickleValue::Tuple({PickleValue::MakeGlobal(kEnum, "_MEM_FORMAT_ENCODING"),
                                            PickleValue::Str("TORCH_CHANNELS_LAST")}));
  PickleRef old_path = PickleValue::Call(
      PickleValue::MakeGlobal("pathlib", "PosixPath"),
      PickleValue::Tuple({PickleValue::Str("/"), PickleValue::Str("tmp"), PickleValue::Str("ck")}));
  PickleRef new_path = PickleValue::Call(PickleValue::MakeGlobal("pathlib._local", "PosixPath"),
                                         PickleValue::Tuple({PickleValue::Str("/tmp/ck")}));
  for (const auto& e : {value_form, getattr_form}) {
    for (const auto& p : {old_path, new_path}) {
      DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, ParseMetadata(Newest(e, p)));
      const auto& t = std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("w"));
      EXPECT_EQ(t.properties.memory_format, MemoryFormat::kChannelsLast);
      EXPECT_EQ(t.properties.strides, (Shape{3, 1}));
      EXPECT_EQ(md.storage_meta->checkpoint_id, "/tmp/ck");
      DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* info, md.FindStorage({"w", Shape{0, 0}, {}}));
      EXPECT_EQ(info->length, 500);
    }
  }
}

TEST(MetadataTest, RejectsHostileContent) {
  Metadata md = Sample();
  md.storage_data[{"step", std::nullopt, std::nullopt}].relative_path = "../../etc/passwd";
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeMetadata(md));
  EXPECT_THAT(ParseMetadata(bytes),
              StatusIs(StatusCode::kDataLoss, HasSubstr("outside the checkpoint directory")));
  Metadata md2 = Sample();
  std::get<TensorStorageMetadata>(*md2.state_dict_metadata.Find("model.w")).chunks[1].offsets = {3,
                                                                                                 0};
  DCPP_ASSERT_OK_AND_ASSIGN(bytes, EncodeMetadata(md2));
  EXPECT_THAT(ParseMetadata(bytes), StatusIs(StatusCode::kDataLoss, HasSubstr("does not fit")));
  EXPECT_FALSE(ParseMetadata("not a pickle").ok());
  // A global outside the allow-list never runs.
  PickleRef evil = PickleValue::Call(PickleValue::MakeGlobal("os", "system"),
                                     PickleValue::Tuple({PickleValue::Str("true")}));
  EXPECT_THAT(ParseMetadata(*WritePickle(*evil, {4})),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("os.system")));
}

TEST(MetadataTest, StateDictMetadataKeepsOrderAndFindsEveryKey) {
  StateDictMetadata m;
  EXPECT_EQ(m.Find("a"), nullptr);
  EXPECT_TRUE(m.empty());
  // Enough keys to grow the index several times, inserted out of sorted order, some twice.
  constexpr int kKeys = 5000;
  std::vector<std::string> keys;
  for (int i = 0; i < kKeys; ++i) keys.push_back("layer." + std::to_string((i * 7919) % kKeys));
  for (int i = 0; i < kKeys; ++i) {
    m[keys[i]] = TensorStorageMetadata{{DType::kInt32}, {i}, {}};
    if (i % 3 == 0) {
      // An existing key gives its entry back and adds nothing.
      StorageMetadata& again = m[keys[i]];
      EXPECT_EQ(std::get<TensorStorageMetadata>(again).size, Shape{i});
    }
  }
  ASSERT_EQ(m.size(), static_cast<size_t>(kKeys));
  int i = 0;
  for (const auto& [key, entry] : m) {
    EXPECT_EQ(key, keys[i]);
    EXPECT_EQ(std::get<TensorStorageMetadata>(entry).size, Shape{i});
    ++i;
  }
  const StateDictMetadata copy = m;
  for (int k = 0; k < kKeys; ++k) {
    const StorageMetadata* found = copy.Find(keys[k]);
    ASSERT_NE(found, nullptr) << keys[k];
    EXPECT_EQ(std::get<TensorStorageMetadata>(*found).size, Shape{k});
    EXPECT_EQ(m.Find(std::string_view(keys[k])), &m[keys[k]]);
  }
  for (const char* absent : {"", "layer.", "layer.5000", "layer.-1", "Layer.1"}) {
    EXPECT_EQ(copy.Find(absent), nullptr) << absent;
  }
  // Reserve before inserting, and after: nothing is lost.
  StateDictMetadata r;
  r.Reserve(100);
  r["x"] = BytesStorageMetadata{};
  r.Reserve(10000);
  r["y"] = BytesStorageMetadata{};
  ASSERT_NE(r.Find("x"), nullptr);
  ASSERT_NE(r.Find("y"), nullptr);
  EXPECT_EQ(r.size(), 2u);
  EXPECT_EQ(r.begin()->first, "x");
}

TEST(MetadataTest, LookupsByReferenceFollowTheIndexOrder) {
  // MetadataIndexRef compares as the MetadataIndex it refers to, so storage_data finds a chunk's
  // entry without a copied key; absent offsets (bytes) sort first, as std::optional does.
  const std::vector<MetadataIndex> keys = {
      {"a", std::nullopt, {}}, {"a", Shape{}, {}},     {"a", Shape{0}, {}},
      {"a", Shape{0, 4}, {}},  {"a", Shape{1}, {}},    {"ab", std::nullopt, {}},
      {"ab", Shape{0}, {}},    {"b", Shape{2, 0}, {}},
  };
  const MetadataIndexLess less;
  const auto ref = [](const MetadataIndex& k) {
    return MetadataIndexRef{k.fqn, k.offset ? &*k.offset : nullptr};
  };
  for (const auto& a : keys) {
    for (const auto& b : keys) {
      EXPECT_EQ(less(a, ref(b)), a < b) << a.ToString() << " vs " << b.ToString();
      EXPECT_EQ(less(ref(a), b), a < b) << a.ToString() << " vs " << b.ToString();
    }
  }
  Metadata md;
  for (size_t i = 0; i < keys.size(); i += 2) {
    md.storage_data[keys[i]] = StorageInfo{"f" + std::to_string(i), 0, 1, {}};
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = md.storage_data.find(ref(keys[i]));
    if (i % 2 == 0) {
      ASSERT_NE(it, md.storage_data.end()) << keys[i].ToString();
      EXPECT_EQ(it->second.relative_path, "f" + std::to_string(i));
    } else {
      EXPECT_EQ(it, md.storage_data.end()) << keys[i].ToString();
    }
  }
  md.state_dict_metadata["layer.w"] = BytesStorageMetadata{};
  EXPECT_NE(md.state_dict_metadata.Find(std::string_view("layer.w")), nullptr);
  EXPECT_EQ(md.state_dict_metadata.Find(std::string_view("layer")), nullptr);
}

}  // namespace
}  // namespace dcpp
