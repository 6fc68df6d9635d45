// The streaming `.metadata` encoder against the PickleValue-tree encoder it replaced (kept here,
// unchanged, as the reference): the bytes must be identical for every shape of metadata, since
// PyTorch's unpickler and the checkpoints already written depend on them.
#include <random>

#include "codec/pickle.h"
#include "dcpp/metadata.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using Items = PickleValue::Items;

struct Paths {
  std::string meta;
  std::string storage_info;
  std::string properties;
};

Paths PathsFor(MetadataFlavor f) {
  if (f == MetadataFlavor::kTorch113Prototype) {
    return {"torch.distributed._shard.checkpoint.metadata",
            "torch.distributed._shard.checkpoint.filesystem",
            "torch.distributed._shard.sharded_tensor.metadata"};
  }
  return {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
          "torch.distributed._shard.sharded_tensor.metadata"};
}

class TreeEncoder {
 public:
  explicit TreeEncoder(MetadataFlavor flavor) : flavor_(flavor), paths_(PathsFor(flavor)) {}

  PickleRef Size(const Shape& s) {
    Items items;
    for (int64_t x : s) items.push_back(PickleValue::Int(x));
    return PickleValue::Call(PickleValue::MakeGlobal("torch", "Size"),
                             PickleValue::Tuple({PickleValue::Tuple(std::move(items))}));
  }

  PickleRef DataObject(const std::string& module, const std::string& name,
                       PickleValue::DictItems fields) {
    PickleRef state = fields.empty() ? nullptr : PickleValue::Dict(std::move(fields));
    return PickleValue::New(PickleValue::MakeGlobal(module, name), PickleValue::Tuple(), state);
  }

  static std::pair<PickleRef, PickleRef> F(const char* name, PickleRef v) {
    return {PickleValue::Str(name), std::move(v)};
  }

  PickleRef Properties(const TensorProperties& p) {
    Items state = {
        PickleValue::MakeGlobal("torch", std::string(DTypeName(p.dtype))),
        PickleValue::Call(PickleValue::MakeGlobal("torch.serialization", "_get_layout"),
                          PickleValue::Tuple({PickleValue::Str("torch.strided")})),
        PickleValue::Bool(p.requires_grad),
        PickleValue::Call(
            PickleValue::MakeGlobal(paths_.properties, "MEM_FORMAT_ENCODING"),
            PickleValue::Tuple({PickleValue::Int(static_cast<int>(p.memory_format))})),
        PickleValue::Bool(p.pin_memory),
    };
    return PickleValue::New(PickleValue::MakeGlobal(paths_.properties, "TensorProperties"),
                            PickleValue::Tuple(), PickleValue::Tuple(std::move(state)));
  }

  PickleRef Tensor(const TensorStorageMetadata& t) {
    Items chunks;
    for (const auto& c : t.chunks) {
      chunks.push_back(DataObject(paths_.meta, "ChunkStorageMetadata",
                                  {F("offsets", Size(c.offsets)), F("sizes", Size(c.sizes))}));
    }
    return DataObject(paths_.meta, "TensorStorageMetadata",
                      {F("properties", Properties(t.properties)), F("size", Size(t.size)),
                       F("chunks", PickleValue::List(std::move(chunks)))});
  }

  PickleRef Index(const MetadataIndex& idx) {
    PickleValue::DictItems fields = {
        F("fqn", PickleValue::Str(idx.fqn)),
        F("index", idx.index ? PickleValue::Int(*idx.index) : PickleValue::None())};
    if (idx.offset) fields.push_back(F("offset", Size(*idx.offset)));
    return DataObject(paths_.meta, "MetadataIndex", std::move(fields));
  }

  PickleRef Info(const StorageInfo& s) {
    PickleValue::DictItems fields = {F("relative_path", PickleValue::Str(s.relative_path)),
                                     F("offset", PickleValue::Int(s.offset)),
                                     F("length", PickleValue::Int(s.length))};
    if (!s.transform_descriptors.empty()) {
      Items d;
      for (const auto& x : s.transform_descriptors) d.push_back(PickleValue::Str(x));
      fields.push_back(F("transform_descriptors", PickleValue::List(std::move(d))));
    }
    return DataObject(paths_.storage_info, "_StorageInfo", std::move(fields));
  }

  static PickleRef OptStr(const std::optional<std::string>& s) {
    return s ? PickleValue::Str(*s) : PickleValue::None();
  }

  PickleRef Root(const Metadata& md) {
    PickleValue::DictItems sdm;
    for (const auto& [fqn, m] : md.state_dict_metadata) {
      if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
        sdm.emplace_back(PickleValue::Str(fqn), Tensor(*t));
      } else {
        sdm.emplace_back(PickleValue::Str(fqn),
                         DataObject(paths_.meta, "BytesStorageMetadata", {}));
      }
    }
    PickleRef planner = PickleValue::None();
    if (md.planner_data) {
      PickleValue::DictItems pd;
      for (const auto& [fqn, path] : *md.planner_data) {
        Items parts;
        for (const auto& p : path) {
          if (const auto* s = std::get_if<std::string>(&p)) {
            parts.push_back(PickleValue::Str(*s));
          } else {
            parts.push_back(PickleValue::Int(std::get<int64_t>(p)));
          }
        }
        pd.emplace_back(PickleValue::Str(fqn), PickleValue::Tuple(std::move(parts)));
      }
      planner = PickleValue::Dict(std::move(pd));
    }
    PickleValue::DictItems storage;
    for (const auto& [idx, info] : md.storage_data) storage.emplace_back(Index(idx), Info(info));

    PickleValue::DictItems fields = {F("state_dict_metadata", PickleValue::Dict(std::move(sdm))),
                                     F("planner_data", planner),
                                     F("storage_data", PickleValue::Dict(std::move(storage)))};
    if (flavor_ == MetadataFlavor::kTorch2 && md.storage_meta) {
      Items mods;
      for (const auto& m : md.storage_meta->modules) mods.push_back(PickleValue::Str(m));
      fields.push_back(
          F("storage_meta", DataObject(paths_.meta, "StorageMeta",
                                       {F("checkpoint_id", OptStr(md.storage_meta->checkpoint_id)),
                                        F("save_id", OptStr(md.storage_meta->save_id)),
                                        F("load_id", PickleValue::None()),
                                        F("modules", PickleValue::List(std::move(mods)))})));
    }
    if (flavor_ != MetadataFlavor::kTorch113Prototype) {
      fields.push_back(F("version", OptStr(md.version)));
    }
    return DataObject(paths_.meta, "Metadata", std::move(fields));
  }

 private:
  MetadataFlavor flavor_;
  Paths paths_;
};

std::string ReferenceEncode(const Metadata& md, MetadataFlavor flavor, int protocol) {
  TreeEncoder enc(flavor);
  PickleRef root = enc.Root(md);
  PickleWriteOptions w;
  w.protocol = protocol;
  auto bytes = WritePickle(*root, w);
  EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
  return bytes.ok() ? *bytes : std::string();
}

// Both encoders, every flavor and protocol; returns how many comparisons were made.
int ExpectIdentical(const Metadata& md, const std::string& what) {
  int n = 0;
  for (MetadataFlavor flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch2Portable,
                                MetadataFlavor::kTorch113Prototype}) {
    for (int protocol : {2, 4}) {
      auto bytes = EncodeMetadata(md, {flavor, protocol});
      EXPECT_TRUE(bytes.ok()) << what << ": " << bytes.status().ToString();
      if (!bytes.ok()) continue;
      const std::string ref = ReferenceEncode(md, flavor, protocol);
      if (*bytes != ref) {
        size_t at = 0;
        while (at < ref.size() && at < bytes->size() && ref[at] == (*bytes)[at]) ++at;
        ADD_FAILURE() << what << " (flavor " << static_cast<int>(flavor) << ", protocol "
                      << protocol << "): streaming output differs at byte " << at << " of "
                      << ref.size() << " (streaming " << bytes->size() << " bytes)";
      }
      ++n;
    }
  }
  return n;
}

// A random metadata: tensors of 0-5 dims with 0-n chunks, bytes entries, planner paths with
// str and int parts, storage entries with and without index hints and transforms, integers of
// every pickle width, names up to 300 bytes (past SHORT_BINUNICODE).
Metadata RandomMetadata(std::mt19937_64& rng, int entries, int max_chunks) {
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
  auto name = [&](int i) {
    std::string s = "layer." + std::to_string(i);
    if (pick(0, 20) == 0) s += std::string(static_cast<size_t>(pick(250, 300)), 'x');
    if (pick(0, 10) == 0) s += "\xc3\xa9";  // UTF-8 text
    return s;
  };
  Metadata md;
  md.planner_data.emplace();
  for (int i = 0; i < entries; ++i) {
    const std::string fqn = name(i);
    if (pick(0, 6) == 0) {
      md.state_dict_metadata[fqn] = BytesStorageMetadata{};
      md.storage_data[{fqn, std::nullopt, std::nullopt}] = {"__0_0.distcp", number(), number(), {}};
    } else {
      TensorStorageMetadata t;
      t.properties.dtype = static_cast<DType>(pick(0, kNumDTypes - 1));
      t.properties.requires_grad = pick(0, 1);
      t.properties.pin_memory = pick(0, 1);
      t.properties.memory_format = static_cast<MemoryFormat>(pick(0, 2));
      const int dims = static_cast<int>(pick(0, 5));
      for (int d = 0; d < dims; ++d) t.size.push_back(number());
      const int chunks = static_cast<int>(pick(0, max_chunks));
      for (int c = 0; c < chunks; ++c) {
        ChunkBox box;
        for (int d = 0; d < dims; ++d) {
          box.offsets.push_back(number());
          box.sizes.push_back(number());
        }
        MetadataIndex idx{fqn, box.offsets, std::nullopt};
        if (pick(0, 1)) idx.index = c;
        StorageInfo info{"__" + std::to_string(c) + "_0.distcp", number(), number(), {}};
        if (pick(0, 8) == 0) info.transform_descriptors = {"stream.zstd/1"};
        if (pick(0, 30) == 0) info.transform_descriptors = {"a", "b"};
        md.storage_data[idx] = info;
        t.chunks.push_back(std::move(box));
      }
      md.state_dict_metadata[fqn] = std::move(t);
    }
    ObjectPath path;
    const int parts = static_cast<int>(pick(0, 5));
    for (int p = 0; p < parts; ++p) {
      if (pick(0, 2) == 0) {
        path.emplace_back(number());
      } else {
        path.emplace_back("p" + std::to_string(p));
      }
    }
    (*md.planner_data)[fqn] = std::move(path);
  }
  if (pick(0, 3) == 0) md.planner_data.reset();
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

TEST(MetadataStreamTest, EmptyMetadataIsIdentical) {
  EXPECT_EQ(ExpectIdentical(Metadata{}, "empty"), 6);
  Metadata md;
  md.planner_data.emplace();
  md.storage_meta = StorageMeta{};
  md.version = "1.0.0";
  EXPECT_EQ(ExpectIdentical(md, "empty with planner data"), 6);
}

TEST(MetadataStreamTest, RandomShapesAreIdentical) {
  std::mt19937_64 rng(20261201);
  int compared = 0;
  for (int round = 0; round < 200; ++round) {
    Metadata md = RandomMetadata(rng, 1 + round % 13, round % 5 == 0 ? 40 : 4);
    compared += ExpectIdentical(md, "random metadata #" + std::to_string(round));
  }
  EXPECT_EQ(compared, 200 * 6);
}

// Batch and memo edges: exactly 1, 999, 1000, 1001 and 2000 entries (SETITEM vs batches, the empty
// trailing SETITEMS of a full dict, APPEND vs APPENDS), more than 256 memo entries (LONG_BINPUT in
// protocol 2) and output past several 64 KiB frames.
TEST(MetadataStreamTest, BatchAndFrameEdgesAreIdentical) {
  for (int n : {1, 2, 999, 1000, 1001, 2000}) {
    Metadata md;
    md.planner_data.emplace();
    TensorStorageMetadata big{{DType::kFloat32}, {int64_t{n} * 4, 1024}, {}};
    for (int i = 0; i < n; ++i) {
      const std::string fqn = "w" + std::to_string(i);
      md.state_dict_metadata[fqn] = TensorStorageMetadata{{DType::kBFloat16}, {8}, {{{0}, {8}}}};
      md.storage_data[{fqn, Shape{0}, 0}] = {"__0_0.distcp", i * 100, 100, {}};
      (*md.planner_data)[fqn] = {std::string("m"), int64_t{i}};
      big.chunks.push_back({{int64_t{i} * 4, 0}, {4, 1024}});
      md.storage_data[{"big", Shape{int64_t{i} * 4, 0}, i}] = {
          "__1_0.distcp", i * 16384, 16384, {}};
    }
    md.state_dict_metadata["big"] = std::move(big);
    md.storage_meta = StorageMeta{std::string("/c"), std::string("s"), std::nullopt, {"m"}};
    md.version = "1.0.0";
    ExpectIdentical(md, std::to_string(n) + " entries");
  }
}

// A str of 64 KiB or more is written outside the frames, as CPython does.
TEST(MetadataStreamTest, LongStringsBypassFramesIdentically) {
  Metadata md;
  const std::string long_name(70 * 1024, 'k');
  md.state_dict_metadata[long_name] = BytesStorageMetadata{};
  md.state_dict_metadata["short"] = BytesStorageMetadata{};
  md.storage_data[{long_name, std::nullopt, std::nullopt}] = {"__0_0.distcp", 0, 1, {}};
  md.storage_data[{"short", std::nullopt, std::nullopt}] = {"__0_0.distcp", 1, 1, {}};
  md.storage_meta = StorageMeta{std::string(100 * 1024, 'c'), std::nullopt, std::nullopt, {}};
  md.version = "1.0.0";
  ExpectIdentical(md, "long strings");
}

TEST(MetadataStreamTest, StreamingOutputParsesBack) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 20; ++round) {
    Metadata md = RandomMetadata(rng, 6, 6);
    // Sizes must pass ParseMetadata's checks: small dims, whole-tensor chunks.
    for (auto& [fqn, m] : md.state_dict_metadata) {
      if (auto* t = std::get_if<TensorStorageMetadata>(&m)) {
        for (auto& d : t->size) d = d % 7 + 1;
        for (auto& c : t->chunks) c = WholeBox(t->size);
      }
    }
    md.storage_data.clear();
    if (md.planner_data) {
      for (auto& [fqn, path] : *md.planner_data) {
        for (auto& part : path) {
          if (auto* i = std::get_if<int64_t>(&part)) *i %= 6;  // list indices below the count
        }
      }
    }
    auto bytes = EncodeMetadata(md);
    ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
    auto back = ParseMetadata(*bytes);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->state_dict_metadata.size(), md.state_dict_metadata.size());
    EXPECT_EQ(back->planner_data.has_value(), md.planner_data.has_value());
  }
}

TEST(MetadataStreamTest, RejectsUnknownProtocol) {
  EXPECT_THAT(
      EncodeMetadata(Metadata{}, {MetadataFlavor::kTorch2, 3}).status(),
      ::dcpp::testing::StatusIs(StatusCode::kInvalidArgument, ::testing::HasSubstr("protocol 3")));
}

}  // namespace
}  // namespace dcpp
