// Default save and load planners (PyTorch's DefaultSavePlanner / DefaultLoadPlanner).
//
// Save: 1. flatten; 2. one WriteItem per tensor, local chunk or bytes leaf; 3. on the
// coordinator: dedup, build Metadata (chunk index hints rewritten), merge the flattening
// mappings (earlier ranks win), validate the chunk layout; 4. resolve items to memory.
// Load: 1. flatten the caller's tree (or build it from the metadata when it is empty);
// 2. overlap requested chunks with stored chunks; 3. hand out destination views.
#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "codec/torch_save.h"
#include "core/thread_pool.h"
#include "dcpp/planner.h"
#include "planner/plan_wire.h"
#include "xxhash.h"

namespace dcpp {

int64_t WriteItem::StorageSize() const {
  if (!tensor_data) return 1;
  return tensor_data->chunk.numel() *
         static_cast<int64_t>(ElementSize(tensor_data->properties.dtype));
}

// ------------------------------------------------------------------ save

namespace {

std::vector<FlatEntry> TopLevelEntries(const StateDict& sd) {
  std::vector<FlatEntry> out;
  for (const auto& [k, v] : sd.dict()) {
    std::string key = k.is_str() ? k.as_str() : k.DebugString();
    out.push_back({key, ObjectPath{key}, &v});
  }
  return out;
}

}  // namespace

Status DefaultSavePlanner::SetUp(const StateDict& state_dict, bool /*is_coordinator*/) {
  if (!state_dict.is_dict()) return InvalidArgumentError("a state dict must be a dict");
  if (options_.flatten_state_dict) {
    DCPP_ASSIGN_OR_RETURN(flat_, FlattenStateDict(state_dict));
  } else {
    flat_ = TopLevelEntries(state_dict);
  }
  by_fqn_.clear();
  by_fqn_.reserve(flat_.size());
  for (const auto& e : flat_) by_fqn_[e.fqn] = e.value;
  return Status::Ok();
}

Result<SavePlan> DefaultSavePlanner::CreateLocalPlan() {
  SavePlan plan;
  // The items and the flattening mappings are built side by side (neither reads the other):
  // each allocates a few small objects per entry, ~1 us a tensor on the first save of a process.
  auto add_items = [&]() -> Status {
    plan.items.reserve(flat_.size());
    for (const auto& e : flat_) {
      const Value& v = *e.value;
      if (v.is_tensor()) {
        const Tensor& t = v.tensor();
        if (!t.defined()) return InvalidArgumentError("tensor \"" + e.fqn + "\" has no storage");
        WriteItem item;
        item.index = {e.fqn, Shape(t.dim(), 0), std::nullopt};
        item.type = WriteItemType::kTensor;
        item.tensor_data =
            TensorWriteData{WholeBox(t.shape()), TensorProperties{t.dtype()}, t.shape()};
        plan.items.push_back(std::move(item));
      } else if (v.is_sharded()) {
        const ShardedTensor& st = v.sharded();
        for (const Shard& s : st.shards) {
          if (s.tensor.dtype() != st.dtype || s.offsets.size() != st.global_shape.size() ||
              s.tensor.dim() != static_cast<int>(st.global_shape.size())) {
            return InvalidArgumentError("sharded tensor \"" + e.fqn + "\": chunk " +
                                        s.box().ToString() + " of " +
                                        std::string(DTypeName(s.tensor.dtype())) +
                                        " does not match the tensor's dtype and rank");
          }
          WriteItem item;
          item.index = {e.fqn, s.offsets, std::nullopt};
          item.type = WriteItemType::kShard;
          item.tensor_data = TensorWriteData{s.box(), TensorProperties{st.dtype}, st.global_shape};
          plan.items.push_back(std::move(item));
        }
      } else {
        WriteItem item;
        item.index = {e.fqn, std::nullopt, std::nullopt};
        item.type = WriteItemType::kByteIO;
        plan.items.push_back(std::move(item));
      }
    }
    return Status::Ok();
  };
  auto add_mappings = [&] {
    for (const auto& e : flat_) {
      // Flattening lists names in order: each lands at the end of the map without a search.
      if (plan.mappings.empty() || plan.mappings.rbegin()->first < e.fqn) {
        plan.mappings.emplace_hint(plan.mappings.end(), e.fqn, e.path);
      } else {
        plan.mappings[e.fqn] = e.path;
      }
    }
  };
  const std::vector<Status> done = internal::ParallelFor(2, 2, [&](size_t part) -> Status {
    if (part == 0) return add_items();
    add_mappings();
    return Status::Ok();
  });
  DCPP_RETURN_IF_ERROR(done[0]);
  return plan;
}

namespace {

// Every item's key (fqn + offsets) numbered once, in first-appearance order, so dedup and
// metadata creation work on integers instead of comparing strings and shapes in ordered maps.
// Consecutive ranks usually list the same fqns in the same order, so an item's fqn is first
// compared with the previous plan's item at the same position before it is hashed.
struct PlanKeys {
  std::vector<std::vector<uint32_t>> key;            // [plan][item] -> key id
  std::vector<uint32_t> key_fqn;                     // key id -> fqn id
  std::vector<std::pair<uint32_t, uint32_t>> first;  // key id -> (plan, item) first holding it
  std::vector<uint32_t> holders;                     // key id -> number of plans holding it
  std::deque<std::string> fqns;                      // fqn id -> name
};

uint64_t HashKey(uint32_t fqn, const std::optional<Shape>& offset) {
  uint64_t h = (fqn + 1) * 0x9e3779b97f4a7c15ULL;
  if (offset) {
    for (int64_t x : *offset) h = (h ^ static_cast<uint64_t>(x)) * 0x100000001b3ULL;
  } else {
    h ^= 0x5bd1e995;
  }
  // MurmurHash3's finalizer: the low bits pick the slot, the high bits are the tag.
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  return h ^ (h >> 33);
}

PlanKeys ComputeKeys(const std::vector<SavePlan>& plans) {
  PlanKeys k;
  k.key.resize(plans.size());
  size_t total = 0;
  for (const auto& p : plans) total += p.items.size();
  k.key_fqn.reserve(total);
  k.first.reserve(total);
  k.holders.reserve(total);
  std::unordered_map<std::string_view, uint32_t> fqn_id;
  // Open addressing over key ids (no node per key): a slot holds the key's hash in its high 32
  // bits and id + 1 in its low 32 bits (0 when empty), so a probe only reads the key's identity
  // back from its first holder when the hashes agree.
  size_t cap = 16;
  while (cap < total * 2) cap <<= 1;
  std::vector<uint64_t> slots(cap, 0);
  const size_t mask = cap - 1;
  std::vector<uint32_t> prev_fqn, cur_fqn;  // fqn ids of the previous / this plan's items
  std::vector<uint64_t> hashes;             // this plan's key hashes; 0: same key as prev rank
  for (size_t p = 0; p < plans.size(); ++p) {
    const auto& items = plans[p].items;
    const auto* prev_items = p > 0 ? &plans[p - 1].items : nullptr;
    cur_fqn.resize(items.size());
    hashes.resize(items.size());
    auto& keys = k.key[p];
    keys.resize(items.size());
    // 1. Each item's fqn id and key hash. Consecutive ranks usually list the same fqns in the
    // same order, and replicated items sit at the same position on every rank: those are
    // recognised by comparing with the previous rank's item, without hashing.
    for (size_t i = 0; i < items.size(); ++i) {
      const MetadataIndex& idx = items[i].index;
      uint32_t f;
      if (prev_items && i < prev_items->size() && (*prev_items)[i].index.fqn == idx.fqn) {
        f = prev_fqn[i];
        if ((*prev_items)[i].index.offset == idx.offset) {
          cur_fqn[i] = f;
          hashes[i] = 0;
          keys[i] = k.key[p - 1][i];
          ++k.holders[keys[i]];
          continue;
        }
      } else {
        auto it = fqn_id.find(idx.fqn);
        if (it == fqn_id.end()) {
          k.fqns.push_back(idx.fqn);
          it = fqn_id.emplace(k.fqns.back(), static_cast<uint32_t>(k.fqns.size() - 1)).first;
        }
        f = it->second;
      }
      cur_fqn[i] = f;
      hashes[i] = HashKey(f, idx.offset) | 1;  // never 0
    }
    // 2. The other keys through the table, in item order. The table is far larger than the
    // caches, so the slot of an item a few places ahead is prefetched.
    constexpr size_t kAhead = 16;
    for (size_t i = 0; i < items.size(); ++i) {
      if (i + kAhead < items.size() && hashes[i + kAhead] != 0) {
        __builtin_prefetch(&slots[hashes[i + kAhead] & mask]);
      }
      const uint64_t h = hashes[i];
      if (h == 0) continue;
      const uint32_t f = cur_fqn[i];
      const uint64_t tag = h >> 32;
      size_t slot = h & mask;
      uint32_t id;
      for (;; slot = (slot + 1) & mask) {
        const uint64_t v = slots[slot];
        if (v == 0) {
          id = static_cast<uint32_t>(k.key_fqn.size());
          slots[slot] = (tag << 32) | (id + 1);
          k.key_fqn.push_back(f);
          k.first.push_back({static_cast<uint32_t>(p), static_cast<uint32_t>(i)});
          k.holders.push_back(0);
          break;
        }
        if ((v >> 32) != tag) continue;
        const uint32_t cand = static_cast<uint32_t>(v & 0xffffffffu) - 1;
        if (k.key_fqn[cand] != f) continue;
        const auto [fp, fi] = k.first[cand];
        if (plans[fp].items[fi].index.offset == items[i].index.offset) {
          id = cand;
          break;
        }
      }
      ++k.holders[id];
      keys[i] = id;
    }
    std::swap(prev_fqn, cur_fqn);
  }
  return k;
}

// Dedup on computed keys: each key held by several plans stays in one of them, the holder with
// the least bytes assigned so far (or the lowest rank). Keys are visited in first-appearance
// order, as PyTorch's dedup_save_plans does. `keys.key` is compacted along with the items.
// `kept`, when given, receives the original positions of the items each plan keeps.
void DedupWithKeys(std::vector<SavePlan>& plans, PlanKeys& keys, bool save_to_lowest_rank,
                   std::vector<std::vector<uint32_t>>* kept = nullptr) {
  const size_t n_keys = keys.key_fqn.size();
  // Holders of shared keys in CSR form: (plan, item) pairs in plan order.
  std::vector<uint32_t> start(n_keys + 1, 0);
  for (size_t id = 0; id < n_keys; ++id) {
    start[id + 1] = start[id] + (keys.holders[id] > 1 ? keys.holders[id] : 0);
  }
  std::vector<std::pair<uint32_t, uint32_t>> holders(start[n_keys]);
  {
    std::vector<uint32_t> fill(start.begin(), start.end() - 1);
    for (size_t p = 0; p < plans.size(); ++p) {
      const auto& ks = keys.key[p];
      for (size_t i = 0; i < ks.size(); ++i) {
        if (keys.holders[ks[i]] > 1) {
          holders[fill[ks[i]]++] = {static_cast<uint32_t>(p), static_cast<uint32_t>(i)};
        }
      }
    }
  }
  std::vector<int64_t> assigned(plans.size(), 0);
  std::vector<std::vector<char>> drop(plans.size());
  for (size_t id = 0; id < n_keys; ++id) {
    const auto [fp, fi] = keys.first[id];
    const int64_t size = plans[fp].items[fi].StorageSize();
    if (keys.holders[id] == 1) {
      assigned[fp] += size;
      continue;
    }
    size_t chosen = holders[start[id]].first;
    if (!save_to_lowest_rank) {
      for (uint32_t h = start[id]; h < start[id + 1]; ++h) {
        if (assigned[holders[h].first] < assigned[chosen]) chosen = holders[h].first;
      }
    }
    assigned[chosen] += size;
    for (uint32_t h = start[id]; h < start[id + 1]; ++h) {
      const auto [p, i] = holders[h];
      if (p == chosen) continue;
      if (drop[p].empty()) drop[p].assign(plans[p].items.size(), 0);
      drop[p][i] = 1;
    }
  }
  if (kept) kept->resize(plans.size());
  for (size_t p = 0; p < plans.size(); ++p) {
    if (drop[p].empty()) {
      if (kept) {
        (*kept)[p].resize(plans[p].items.size());
        for (size_t i = 0; i < plans[p].items.size(); ++i) (*kept)[p][i] = static_cast<uint32_t>(i);
      }
      continue;
    }
    auto& items = plans[p].items;
    auto& ks = keys.key[p];
    size_t out = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      if (drop[p][i]) continue;
      if (kept) (*kept)[p].push_back(static_cast<uint32_t>(i));
      if (out != i) {
        items[out] = std::move(items[i]);
        ks[out] = ks[i];
      }
      ++out;
    }
    items.resize(out);
    ks.resize(out);
  }
}

// What GlobalPlanWithKeys learns about each tensor's chunks while it collects them, so the
// validation that follows need not visit them again: the first chunk outside the tensor, the
// chunks' total volume, and the dimensions along which the chunks, in order, are disjoint
// intervals (row or column shards as ranks list them), which rules out any overlap.
struct ChunkFacts {
  int64_t first_outside = -1;             // index of the first chunk outside the tensor, or -1
  __int128 volume = 0;                    // overlapping chunks (refused below) may sum past int64
  uint64_t disjoint_dims = ~uint64_t{0};  // bit d: chunks disjoint and ascending along d
  Shape last_end;                         // offsets + sizes of the previous chunk
};

void AddChunkFacts(ChunkFacts& facts, const Shape& size, const ChunkBox& c, int64_t index) {
  const size_t dims = size.size();
  // Contains(WholeBox(size), c) without building the box: 128-bit sums, as there.
  bool inside = c.offsets.size() == dims && c.sizes.size() == dims;
  for (size_t d = 0; inside && d < dims; ++d) {
    inside = c.offsets[d] >= 0 && __int128{c.offsets[d]} + c.sizes[d] <= __int128{size[d]};
  }
  if (facts.first_outside < 0 && !inside) facts.first_outside = index;
  facts.volume += c.numel();
  if (facts.first_outside >= 0 || dims > 64) {
    facts.disjoint_dims = 0;
    return;
  }
  if (index == 0) {
    facts.disjoint_dims = dims == 64 ? ~uint64_t{0} : (uint64_t{1} << dims) - 1;
    facts.last_end.resize(dims);
  } else {
    for (size_t d = 0; d < dims; ++d) {
      if (c.offsets[d] < facts.last_end[d]) facts.disjoint_dims &= ~(uint64_t{1} << d);
    }
  }
  for (size_t d = 0; d < dims; ++d) facts.last_end[d] = c.offsets[d] + c.sizes[d];
}

// Plans with at least this many items in all have their metadata collected in kMetadataParts
// parts on two threads. At 4096 ranks most of the time goes to allocating and first touching
// the chunk copies (3.7 M of them); on a VM whose page faults do not scale with cores, two
// threads cut the caching planner's first plan by about 30 %, not by half.
constexpr size_t kParallelMetadataItems = size_t{1} << 16;
constexpr size_t kMetadataParts = 6;

// PyTorch's create_default_global_save_plan on computed keys: one metadata entry per fqn (in the
// order the deduplicated plans first name them), chunks in plan order, index hints rewritten.
// `facts`, when given, receives each fqn's ChunkFacts (indexed like md.state_dict_metadata).
// `fqn_of(p, i)` is the fqn id of plan p's item i, `fqn_name(f)` its name, for n_fqns ids.
// An fqn's chunks depend only on its own items, so large plans are collected in parts, each
// taking the fqns f with f % parts == part; `alongside`, when set, runs as one more task beside
// them. The error reported is the one of the first offending item in plan order, as in one pass.
template <typename FqnOf, typename FqnName>
Result<Metadata> BuildMetadata(std::vector<SavePlan>& plans, size_t n_fqns, FqnOf&& fqn_of,
                               FqnName&& fqn_name, std::vector<ChunkFacts>* facts,
                               const std::function<void()>& alongside = nullptr) {
  struct Entry {
    bool seen = false;
    StorageMetadata m;
    ChunkFacts facts;
  };
  std::vector<Entry> entries(n_fqns);
  std::vector<uint32_t> order;
  std::vector<int64_t> chunk_count(n_fqns, 0);
  size_t n_items = 0;
  for (size_t p = 0; p < plans.size(); ++p) {
    n_items += plans[p].items.size();
    for (size_t i = 0; i < plans[p].items.size(); ++i) {
      const uint32_t f = fqn_of(p, i);
      if (chunk_count[f]++ == 0) order.push_back(f);
    }
  }
  const size_t parts = n_items >= kParallelMetadataItems ? kMetadataParts : 1;
  struct Failure {
    size_t p = SIZE_MAX, i = 0;
    Status status;
  };
  std::vector<Failure> failures(parts);
  auto collect = [&](size_t part) {
    for (size_t p = 0; p < plans.size(); ++p) {
      auto& items = plans[p].items;
      for (size_t i = 0; i < items.size(); ++i) {
        const uint32_t f = fqn_of(p, i);
        if (f % parts != part) continue;
        auto fail = [&](std::string what) {
          failures[part] = {p, i,
                            InvalidArgumentError("rank " + std::to_string(p) + ": key \"" +
                                                 fqn_name(f) + "\" " + what)};
        };
        WriteItem& item = items[i];
        Entry& e = entries[f];
        if (item.type == WriteItemType::kByteIO) {
          if (e.seen) return fail("is saved twice with different kinds");
          e.seen = true;
          e.m = BytesStorageMetadata{};
          continue;
        }
        const TensorWriteData& td = *item.tensor_data;
        if (!e.seen) {
          e.seen = true;
          e.m = TensorStorageMetadata{td.properties, td.size, {}};
          std::get<TensorStorageMetadata>(e.m).chunks.reserve(chunk_count[f]);
        } else if (item.type != WriteItemType::kShard) {
          return fail(
              "is saved twice (a plain tensor must be identical on every rank that holds it)");
        }
        auto* tmd = std::get_if<TensorStorageMetadata>(&e.m);
        if (!tmd) return fail("is a tensor on one rank and bytes on another");
        if (tmd->size != td.size || tmd->properties.dtype != td.properties.dtype) {
          return fail("is " + std::string(DTypeName(td.properties.dtype)) + ShapeToString(td.size) +
                      " but another rank saves it as " +
                      std::string(DTypeName(tmd->properties.dtype)) + ShapeToString(tmd->size));
        }
        const auto index = static_cast<int64_t>(tmd->chunks.size());
        item.index.index = index;
        if (facts) AddChunkFacts(e.facts, tmd->size, td.chunk, index);
        tmd->chunks.push_back(td.chunk);
      }
    }
  };
  const size_t tasks = parts + (alongside ? 1 : 0);
  internal::ParallelFor(tasks, 2, [&](size_t t) {
    if (t == parts) {
      alongside();
    } else {
      collect(t);
    }
    return Status::Ok();
  });
  const Failure* first = nullptr;
  for (const Failure& f : failures) {
    if (f.p != SIZE_MAX && (!first || std::pair(f.p, f.i) < std::pair(first->p, first->i))) {
      first = &f;
    }
  }
  if (first) return first->status;
  Metadata md;
  md.state_dict_metadata.Reserve(order.size());
  if (facts) facts->reserve(order.size());
  for (uint32_t f : order) {
    md.state_dict_metadata[fqn_name(f)] = std::move(entries[f].m);
    if (facts) facts->push_back(std::move(entries[f].facts));
  }
  return md;
}

Result<Metadata> GlobalPlanWithKeys(std::vector<SavePlan>& plans, const PlanKeys& keys,
                                    std::vector<ChunkFacts>* facts = nullptr,
                                    const std::function<void()>& alongside = nullptr) {
  return BuildMetadata(
      plans, keys.fqns.size(), [&](size_t p, size_t i) { return keys.key_fqn[keys.key[p][i]]; },
      [&](uint32_t f) -> const std::string& { return keys.fqns[f]; }, facts, alongside);
}

// Items several ranks hold under one key must describe the same data, or dedup would silently
// keep one rank's version.
Status CheckSharedItemsAgree(const std::vector<SavePlan>& plans, const PlanKeys& keys) {
  for (size_t p = 0; p < plans.size(); ++p) {
    const auto& items = plans[p].items;
    for (size_t i = 0; i < items.size(); ++i) {
      const uint32_t id = keys.key[p][i];
      if (keys.holders[id] == 1) continue;
      const auto [fp, fi] = keys.first[id];
      if (fp == p && fi == i) continue;
      const WriteItem& other = plans[fp].items[fi];
      const WriteItem& item = items[i];
      const bool same =
          other.type == item.type &&
          (!item.tensor_data ||
           (other.tensor_data->size == item.tensor_data->size &&
            other.tensor_data->chunk == item.tensor_data->chunk &&
            other.tensor_data->properties.dtype == item.tensor_data->properties.dtype));
      if (!same) {
        auto describe = [](const WriteItem& w) {
          if (!w.tensor_data) return std::string("a bytes value");
          return std::string(DTypeName(w.tensor_data->properties.dtype)) +
                 ShapeToString(w.tensor_data->chunk.sizes) + " of " +
                 ShapeToString(w.tensor_data->size);
        };
        return InvalidArgumentError("key \"" + item.index.fqn + "\" is " + describe(other) +
                                    " on rank " + std::to_string(fp) + " but " + describe(item) +
                                    " on rank " + std::to_string(p));
      }
    }
  }
  return Status::Ok();
}

// The flattening mappings of every rank merged, earlier ranks winning. A rank whose mappings
// name the same keys as the previous rank's adds nothing, which a lockstep comparison finds
// without hashing.
std::map<std::string, ObjectPath> MergeMappings(const std::vector<SavePlan>& plans) {
  if (plans.size() == 1) return plans[0].mappings;
  std::map<std::string, ObjectPath> merged;
  std::unordered_set<std::string_view> seen;
  for (size_t p = 0; p < plans.size(); ++p) {
    const auto& m = plans[p].mappings;
    if (p > 0 && m.size() == plans[p - 1].mappings.size() &&
        std::equal(m.begin(), m.end(), plans[p - 1].mappings.begin(),
                   [](const auto& a, const auto& b) { return a.first == b.first; })) {
      continue;
    }
    for (const auto& [fqn, path] : m) {
      if (seen.count(fqn)) continue;
      auto it = merged.emplace(fqn, path).first;
      seen.insert(it->first);
    }
  }
  return merged;
}

}  // namespace

std::vector<SavePlan> DedupSavePlans(std::vector<SavePlan> plans, bool save_to_lowest_rank) {
  PlanKeys keys = ComputeKeys(plans);
  DedupWithKeys(plans, keys, save_to_lowest_rank);
  return plans;
}

Result<std::pair<std::vector<SavePlan>, Metadata>> CreateDefaultGlobalSavePlan(
    std::vector<SavePlan> plans) {
  PlanKeys keys = ComputeKeys(plans);
  DCPP_ASSIGN_OR_RETURN(Metadata md, GlobalPlanWithKeys(plans, keys));
  return std::make_pair(std::move(plans), std::move(md));
}

namespace {

// Overlap check for the chunks of one tensor. A sweep along the dimension with the most
// distinct offsets keeps the chunks that are open at the sweep position; a new chunk is only
// compared with open chunks whose interval along a second dimension can intersect its own
// (found through an ordered map). Row, column, block and grid shardings cost O(n log n).
Status CheckNoOverlap(const std::string& fqn, const std::vector<ChunkBox>& chunks) {
  const size_t n = chunks.size();
  if (n < 2) return Status::Ok();
  const int dims = chunks[0].dim();
  auto distinct = [&](int d) {
    std::vector<int64_t> v;
    v.reserve(n);
    for (const auto& c : chunks) v.push_back(c.offsets[d]);
    std::sort(v.begin(), v.end());
    return std::unique(v.begin(), v.end()) - v.begin();
  };
  std::vector<std::pair<long, int>> rank;
  for (int d = 0; d < dims; ++d) rank.push_back({distinct(d), d});
  std::sort(rank.begin(), rank.end(), std::greater<>());
  const int sweep = rank[0].second;
  const int key = dims > 1 ? rank[1].second : -1;

  std::vector<size_t> by_start(n);
  for (size_t i = 0; i < n; ++i) by_start[i] = i;
  std::sort(by_start.begin(), by_start.end(), [&](size_t a, size_t b) {
    return chunks[a].offsets[sweep] < chunks[b].offsets[sweep];
  });
  int64_t max_key_len = 0;
  if (key >= 0) {
    for (const auto& c : chunks) max_key_len = std::max(max_key_len, c.sizes[key]);
  }
  using End = std::pair<int64_t, size_t>;
  std::priority_queue<End, std::vector<End>, std::greater<>> ends;
  std::multimap<int64_t, size_t> open;  // key-dim start -> chunk
  std::vector<std::multimap<int64_t, size_t>::iterator> where(n);
  for (size_t i : by_start) {
    const ChunkBox& c = chunks[i];
    if (c.numel() == 0) continue;  // empty chunks cover nothing
    while (!ends.empty() && ends.top().first <= c.offsets[sweep]) {
      open.erase(where[ends.top().second]);
      ends.pop();
    }
    auto lo = key >= 0 ? open.upper_bound(c.offsets[key] - max_key_len) : open.begin();
    auto hi = key >= 0 ? open.lower_bound(c.offsets[key] + c.sizes[key]) : open.end();
    for (auto it = lo; it != hi; ++it) {
      if (Intersect(c, chunks[it->second])) {
        return InvalidArgumentError("chunks " + chunks[it->second].ToString() + " and " +
                                    c.ToString() + " of \"" + fqn + "\" overlap");
      }
    }
    where[i] = open.emplace(key >= 0 ? c.offsets[key] : 0, i);
    ends.push({c.offsets[sweep] + c.sizes[sweep], i});
  }
  return Status::Ok();
}

}  // namespace

namespace {

// ValidateGlobalPlan with what GlobalPlanWithKeys learnt (same checks, same messages): chunks
// are only visited again for tensors whose chunks are not disjoint along some dimension.
Status ValidateWithFacts(const Metadata& metadata, const std::vector<ChunkFacts>& facts,
                         bool require_full_coverage) {
  size_t n = 0;
  for (const auto& [fqn, m] : metadata.state_dict_metadata) {
    const ChunkFacts& f = facts[n++];
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    if (f.first_outside >= 0) {
      return InvalidArgumentError("chunk " + t->chunks[f.first_outside].ToString() + " of \"" +
                                  fqn + "\" is outside its tensor of size " +
                                  ShapeToString(t->size));
    }
    // Sizes that overflow would make the sums meaningless; load refuses such metadata.
    if (auto bytes = CheckedNumBytes(t->properties.dtype, t->size); !bytes.ok()) {
      return InvalidArgumentError("\"" + fqn + "\": " + std::string(bytes.status().message()));
    }
    if (t->size.empty()) continue;  // a 0-d tensor: every copy is the whole tensor
    if (f.disjoint_dims == 0) DCPP_RETURN_IF_ERROR(CheckNoOverlap(fqn, t->chunks));
    if (require_full_coverage && f.volume != NumElements(t->size)) {
      return InvalidArgumentError("the saved chunks of \"" + fqn + "\" cover " +
                                  std::to_string(static_cast<int64_t>(f.volume)) + " of its " +
                                  std::to_string(NumElements(t->size)) + " elements");
    }
  }
  return Status::Ok();
}

}  // namespace

Status ValidateGlobalPlan(const Metadata& metadata, bool require_full_coverage) {
  for (const auto& [fqn, m] : metadata.state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    // Sizes that overflow, negative extents and mismatched ranks would make the sums below
    // meaningless; load refuses such metadata, so save must not commit it.
    if (auto bytes = CheckedNumBytes(t->properties.dtype, t->size); !bytes.ok()) {
      return InvalidArgumentError("\"" + fqn + "\": " + std::string(bytes.status().message()));
    }
    const ChunkBox whole = WholeBox(t->size);
    __int128 volume = 0;  // overlapping chunks (found below) may sum past int64
    for (const auto& c : t->chunks) {
      const bool negative =
          std::any_of(c.sizes.begin(), c.sizes.end(), [](int64_t x) { return x < 0; });
      if (c.dim() != whole.dim() || c.offsets.size() != c.sizes.size() || negative ||
          !Contains(whole, c)) {
        return InvalidArgumentError("chunk " + c.ToString() + " of \"" + fqn +
                                    "\" is outside its tensor of size " + ShapeToString(t->size));
      }
      volume += c.numel();
    }
    if (whole.dim() == 0) continue;  // a 0-d tensor: every copy is the whole tensor
    DCPP_RETURN_IF_ERROR(CheckNoOverlap(fqn, t->chunks));
    if (require_full_coverage && volume != whole.numel()) {
      return InvalidArgumentError("the saved chunks of \"" + fqn + "\" cover " +
                                  std::to_string(static_cast<int64_t>(volume)) + " of its " +
                                  std::to_string(whole.numel()) + " elements");
    }
  }
  return Status::Ok();
}

// ------------------------------------------------------------------ plan cache

namespace internal {

// What a global plan did to its inputs, so that the same inputs get the same answer without
// redoing the work (PyTorch's enable_plan_caching): the items each plan keeps and the fqn of
// each, the fqn names and the merged mappings. The metadata is rebuilt from the kept items
// (chunks in the same order, so the same index hints) rather than stored: the first answer
// then costs no copy of it, and a hit copies the chunks once, as a stored copy would too.
struct PlanCache {
  PlanFingerprint fingerprint;
  std::vector<std::vector<uint32_t>> kept;      // [plan] -> positions of kept items
  std::vector<std::vector<uint32_t>> item_fqn;  // [plan] -> fqn id of each kept item
  std::vector<std::string> fqns;                // fqn id -> name
  std::optional<std::map<std::string, ObjectPath>> planner_data;

  // `keys` as dedup left them (compacted along with the items).
  static std::shared_ptr<const PlanCache> Make(
      const PlanFingerprint& fp, std::vector<std::vector<uint32_t>> kept, const PlanKeys& keys,
      const std::pair<std::vector<SavePlan>, Metadata>& global) {
    auto c = std::make_shared<PlanCache>();
    c->fingerprint = fp;
    c->kept = std::move(kept);
    c->item_fqn.resize(keys.key.size());
    for (size_t p = 0; p < keys.key.size(); ++p) {
      c->item_fqn[p].reserve(keys.key[p].size());
      for (uint32_t id : keys.key[p]) c->item_fqn[p].push_back(keys.key_fqn[id]);
    }
    c->fqns.assign(keys.fqns.begin(), keys.fqns.end());
    c->planner_data = global.second.planner_data;
    return c;
  }

  Result<std::pair<std::vector<SavePlan>, Metadata>> Apply(std::vector<SavePlan> plans) const {
    if (plans.size() != kept.size()) return InternalError("plan cache: wrong number of plans");
    for (size_t p = 0; p < plans.size(); ++p) {
      auto& items = plans[p].items;
      for (size_t k = 0; k < kept[p].size(); ++k) {
        const uint32_t from = kept[p][k];
        if (from >= items.size() || from < k) return InternalError("plan cache: bad position");
        if (from != k) items[k] = std::move(items[from]);
      }
      items.resize(kept[p].size());
    }
    DCPP_ASSIGN_OR_RETURN(
        Metadata md, BuildMetadata(
                         plans, fqns.size(), [&](size_t p, size_t i) { return item_fqn[p][i]; },
                         [&](uint32_t f) -> const std::string& { return fqns[f]; }, nullptr));
    md.planner_data = planner_data;
    return std::make_pair(std::move(plans), std::move(md));
  }
};

}  // namespace internal

namespace {

// A 128-bit hash of everything the global plan depends on: each plan's byte encoding and the
// planner's options. Equal fingerprints mean the same structure (same keys, chunks, dtypes).
PlanFingerprint FingerprintPlans(const std::vector<SavePlan>& plans,
                                 const SavePlannerOptions& options) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_128bits_reset(state);
  std::string buf;  // one plan's fields, fixed-width, hashed at once
  auto u64 = [&buf](uint64_t v) { buf.append(reinterpret_cast<const char*>(&v), sizeof v); };
  auto str = [&](const std::string& x) {
    u64(x.size());
    buf.append(x);
  };
  auto dims = [&](const Shape& d) {
    u64(d.size());
    buf.append(reinterpret_cast<const char*>(d.data()), d.size() * sizeof(int64_t));
  };
  u64((options.flatten_state_dict ? 1 : 0) | (options.dedup_save_to_lowest_rank ? 2 : 0) |
      (options.require_full_coverage ? 4 : 0));
  u64(plans.size());
  for (const auto& p : plans) {
    str(p.storage_prefix);
    u64(p.items.size());
    for (const auto& item : p.items) {
      str(item.index.fqn);
      u64(static_cast<uint64_t>(item.type) | (item.index.offset ? 0x100 : 0));
      if (item.index.offset) dims(*item.index.offset);
      if (item.tensor_data) {
        const auto& td = *item.tensor_data;
        dims(td.chunk.offsets);
        dims(td.chunk.sizes);
        dims(td.size);
        u64(static_cast<uint64_t>(td.properties.dtype) | (td.properties.requires_grad ? 0x100 : 0) |
            (td.properties.pin_memory ? 0x200 : 0) |
            (static_cast<uint64_t>(td.properties.memory_format) << 16));
      }
    }
    u64(p.mappings.size());
    for (const auto& [fqn, path] : p.mappings) {
      str(fqn);
      u64(path.size());
      for (const auto& part : path) {
        if (const auto* x = std::get_if<std::string>(&part)) {
          str(*x);
        } else {
          u64(~static_cast<uint64_t>(std::get<int64_t>(part)));
        }
      }
    }
    XXH3_128bits_update(state, buf.data(), buf.size());
    buf.clear();
  }
  const XXH128_hash_t h = XXH3_128bits_digest(state);
  XXH3_freeState(state);
  return {h.low64, h.high64};
}

}  // namespace

// The coordinator's work runs in sections whose independent parts run side by side on the
// thread pool when a thread is free (the caller runs whatever no thread has taken):
//   1. keys and the agreement check of shared items  ||  the plans' fingerprint (first caching
//      plan only; later ones need it before anything else, to look up the cache);
//   2. dedup (which rewrites items);
//   3. the metadata, in parts by fqn (each writes only its own items' index hints)  ||  the
//      merged flattening mappings (which read only `mappings`).
// Then the chunk layout is validated with what the metadata pass learnt.
Result<std::pair<std::vector<SavePlan>, Metadata>> DefaultSavePlanner::CreateGlobalPlan(
    std::vector<SavePlan> plans) {
  last_plan_cached_ = false;
  std::optional<PlanFingerprint> fingerprint;
  if (options_.enable_plan_caching && cache_) {
    fingerprint = FingerprintPlans(plans, options_);
    if (cache_->fingerprint == *fingerprint) {
      DCPP_ASSIGN_OR_RETURN(auto global, cache_->Apply(std::move(plans)));
      last_plan_cached_ = true;
      return global;
    }
  }
  const bool fingerprint_alongside = options_.enable_plan_caching && !fingerprint;
  PlanKeys keys;
  std::vector<Status> done = internal::ParallelFor(2, 2, [&](size_t part) {
    if (part == 1) {
      if (fingerprint_alongside) fingerprint = FingerprintPlans(plans, options_);
      return Status::Ok();
    }
    keys = ComputeKeys(plans);
    return CheckSharedItemsAgree(plans, keys);
  });
  DCPP_RETURN_IF_ERROR(internal::FirstError(done));

  std::vector<std::vector<uint32_t>> kept;
  std::vector<ChunkFacts> facts;
  std::optional<std::map<std::string, ObjectPath>> mappings;
  DedupWithKeys(plans, keys, options_.dedup_save_to_lowest_rank, fingerprint ? &kept : nullptr);
  std::function<void()> merge_mappings;
  if (options_.flatten_state_dict) merge_mappings = [&] { mappings = MergeMappings(plans); };
  DCPP_ASSIGN_OR_RETURN(Metadata md, GlobalPlanWithKeys(plans, keys, &facts, merge_mappings));
  md.planner_data = std::move(mappings);
  DCPP_RETURN_IF_ERROR(ValidateWithFacts(md, facts, options_.require_full_coverage));
  // Planner data load would refuse is refused now, before any byte is written (the chunks were
  // checked above, so the whole-metadata check is not repeated).
  if (Status s = ValidatePlannerData(md, "global plan"); !s.ok()) {
    return InvalidArgumentError(std::string(s.message()));
  }
  auto global = std::make_pair(std::move(plans), std::move(md));
  if (fingerprint) cache_ = internal::PlanCache::Make(*fingerprint, std::move(kept), keys, global);
  return global;
}

Result<SavePlan> DefaultSavePlanner::FinishPlan(SavePlan central_plan) { return central_plan; }

Result<WriteData> DefaultSavePlanner::ResolveData(const WriteItem& item) {
  auto it = by_fqn_.find(item.index.fqn);
  if (it == by_fqn_.end()) {
    return InternalError("write item \"" + item.index.ToString() + "\" is not in the state dict");
  }
  const Value& v = *it->second;
  WriteData out;
  if (item.type == WriteItemType::kByteIO) {
    if (v.is_opaque()) {
      out.bytes = v.opaque().torch_save_bytes;
    } else {
      auto bytes = EncodeTorchSave(v);
      if (!bytes.ok()) return bytes.status().WithContext("encoding \"" + item.index.fqn + "\"");
      out.bytes = std::move(*bytes);
    }
    return out;
  }
  if (v.is_tensor()) {
    out.tensor = v.tensor().view();
    return out;
  }
  if (v.is_sharded()) {
    for (const Shard& s : v.sharded().shards) {
      if (item.index.offset && s.offsets == *item.index.offset) {
        out.tensor = s.tensor.view();
        return out;
      }
    }
  }
  return InternalError("no local data for write item \"" + item.index.ToString() + "\"");
}

// ------------------------------------------------------------------ plan encoding

std::string EncodeSavePlan(const SavePlan& plan) {
  internal::WireWriter w;
  w.Str(plan.storage_prefix);
  w.U64(plan.items.size());
  for (const auto& item : plan.items) {
    internal::PutIndex(w, item.index);
    w.U64(static_cast<uint64_t>(item.type));
    if (item.tensor_data) {
      const auto& td = *item.tensor_data;
      w.Dims(td.chunk.offsets);
      w.Dims(td.chunk.sizes);
      w.Dims(td.size);
      w.U64(static_cast<uint64_t>(td.properties.dtype) | (td.properties.requires_grad ? 0x100 : 0) |
            (td.properties.pin_memory ? 0x200 : 0) |
            (static_cast<uint64_t>(td.properties.memory_format) << 16));
    }
  }
  w.U64(plan.mappings.size());
  for (const auto& [fqn, path] : plan.mappings) {
    w.Str(fqn);
    w.U64(path.size());
    for (const auto& part : path) {
      if (const auto* s = std::get_if<std::string>(&part)) {
        w.U64(0);
        w.Str(*s);
      } else {
        w.U64(1);
        w.U64(static_cast<uint64_t>(std::get<int64_t>(part)));
      }
    }
  }
  return w.Release();
}

namespace {

// One rank per shape, sizes and offsets non-negative, the tensor's byte size within int64, and
// the chunk inside the tensor (so its byte size fits too).
bool ValidItemGeometry(const TensorWriteData& td) {
  const size_t dims = td.size.size();
  if (td.chunk.offsets.size() != dims || td.chunk.sizes.size() != dims) return false;
  for (size_t d = 0; d < dims; ++d) {
    if (td.chunk.offsets[d] < 0 || td.chunk.sizes[d] < 0) return false;
  }
  return CheckedNumBytes(td.properties.dtype, td.size).ok() &&
         Contains(WholeBox(td.size), td.chunk);
}

}  // namespace

Result<SavePlan> DecodeSavePlan(std::string_view bytes) {
  internal::WireReader r(bytes, "save plan");
  SavePlan plan;
  DCPP_ASSIGN_OR_RETURN(plan.storage_prefix, r.Str());
  DCPP_ASSIGN_OR_RETURN(uint64_t n, r.Count());
  // Grown as items decode: a count is only bounded by the bytes left, and a WriteItem takes far
  // more memory than a byte.
  for (uint64_t i = 0; i < n; ++i) {
    WriteItem& item = plan.items.emplace_back();
    DCPP_RETURN_IF_ERROR(internal::GetIndex(r, &item.index));
    DCPP_ASSIGN_OR_RETURN(uint64_t type, r.U64());
    if (type < 1 || type > 3) return r.Malformed();
    item.type = static_cast<WriteItemType>(type);
    if (item.type != WriteItemType::kByteIO) {
      TensorWriteData td;
      DCPP_ASSIGN_OR_RETURN(td.chunk.offsets, r.Dims());
      DCPP_ASSIGN_OR_RETURN(td.chunk.sizes, r.Dims());
      DCPP_ASSIGN_OR_RETURN(td.size, r.Dims());
      DCPP_ASSIGN_OR_RETURN(uint64_t props, r.U64());
      if ((props & 0xff) >= static_cast<uint64_t>(kNumDTypes) || ((props >> 16) & 0xff) > 2) {
        return r.Malformed();
      }
      td.properties.dtype = static_cast<DType>(props & 0xff);
      td.properties.requires_grad = props & 0x100;
      td.properties.pin_memory = props & 0x200;
      td.properties.memory_format = static_cast<MemoryFormat>((props >> 16) & 0xff);
      // The coordinator sums and sorts by these sizes: geometry that does not hold together is
      // refused here, before any arithmetic on it.
      if (!ValidItemGeometry(td)) return r.Malformed();
      item.tensor_data = std::move(td);
    }
  }
  DCPP_ASSIGN_OR_RETURN(uint64_t m, r.Count());
  for (uint64_t i = 0; i < m; ++i) {
    DCPP_ASSIGN_OR_RETURN(std::string fqn, r.Str());
    DCPP_ASSIGN_OR_RETURN(uint64_t parts, r.Count());
    ObjectPath path;
    for (uint64_t j = 0; j < parts; ++j) {
      DCPP_ASSIGN_OR_RETURN(uint64_t tag, r.U64());
      if (tag == 0) {
        DCPP_ASSIGN_OR_RETURN(std::string part, r.Str());
        path.emplace_back(std::move(part));
      } else {
        DCPP_ASSIGN_OR_RETURN(uint64_t v, r.U64());
        path.emplace_back(static_cast<int64_t>(v));
      }
    }
    plan.mappings.emplace(std::move(fqn), std::move(path));
  }
  if (!r.done()) return r.Malformed();
  return plan;
}

// ------------------------------------------------------------------ load

std::vector<ReadItem> CreateReadItemsForChunks(const std::string& fqn,
                                               const std::vector<ChunkBox>& local,
                                               const std::vector<ChunkBox>& saved) {
  std::vector<ReadItem> out;
  if (local.empty() || saved.empty()) return out;
  const int dims = local[0].dim();
  auto make = [&](size_t li, size_t si, const ChunkBox& l, const ChunkBox& s) {
    ReadItem r;
    r.type = LoadItemType::kTensor;
    r.dest_index = {fqn, l.offsets, static_cast<int64_t>(li)};
    r.storage_index = {fqn, s.offsets, static_cast<int64_t>(si)};
    r.dest_offsets.resize(dims);
    r.storage_offsets.resize(dims);
    r.lengths.resize(dims);
    for (int d = 0; d < dims; ++d) {
      int64_t lo = std::max(s.offsets[d], l.offsets[d]);
      int64_t hi = std::min(s.offsets[d] + s.sizes[d], l.offsets[d] + l.sizes[d]);
      r.lengths[d] = hi - lo;
      r.storage_offsets[d] = lo - s.offsets[d];
      r.dest_offsets[d] = lo - l.offsets[d];
    }
    out.push_back(std::move(r));
  };
  if (dims == 0) {
    for (size_t li = 0; li < local.size(); ++li) make(li, 0, local[li], saved[0]);
    return out;
  }
  // Sweep along the dimension with the largest extent: saved chunks sorted by start; for a local
  // chunk only saved chunks starting in (start - longest, end) can overlap it.
  int sweep = 0;
  int64_t extent = -1;
  for (int d = 0; d < dims; ++d) {
    int64_t e = 0;
    for (const auto& s : saved) e = std::max(e, s.offsets[d] + s.sizes[d]);
    if (e > extent) extent = e, sweep = d;
  }
  std::vector<size_t> order(saved.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  // Saved chunks usually come in row order already (ranks in order): sort only when not.
  auto by_start = [&](size_t a, size_t b) {
    return saved[a].offsets[sweep] < saved[b].offsets[sweep];
  };
  if (!std::is_sorted(order.begin(), order.end(), by_start)) {
    std::sort(order.begin(), order.end(), by_start);
  }
  std::vector<int64_t> starts;
  int64_t longest = 0;
  for (size_t i : order) {
    starts.push_back(saved[i].offsets[sweep]);
    longest = std::max(longest, saved[i].sizes[sweep]);
  }
  for (size_t li = 0; li < local.size(); ++li) {
    const ChunkBox& l = local[li];
    auto first = std::upper_bound(starts.begin(), starts.end(), l.offsets[sweep] - longest);
    auto last = std::lower_bound(starts.begin(), starts.end(), l.offsets[sweep] + l.sizes[sweep]);
    for (auto it = first; it != last; ++it) {
      size_t si = order[it - starts.begin()];
      if (Intersect(l, saved[si])) make(li, si, l, saved[si]);
    }
  }
  return out;
}

Status DefaultLoadPlanner::SetUp(StateDict* state_dict, const Metadata& metadata,
                                 bool /*is_coordinator*/) {
  if (!state_dict || !state_dict->is_dict()) {
    return InvalidArgumentError("a state dict must be a dict");
  }
  state_dict_ = state_dict;
  metadata_ = &metadata;
  dest_.clear();
  if (state_dict->dict().empty()) {
    // Load everything as stored: allocate from the metadata and rebuild the nesting.
    for (const auto& [fqn, m] : metadata.state_dict_metadata) {
      ObjectPath path{fqn};
      if (metadata.planner_data) {
        auto it = metadata.planner_data->find(fqn);
        if (it != metadata.planner_data->end()) path = it->second;
      }
      Value leaf;
      if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
        leaf = Value::FromTensor(Tensor::Zeros(t->properties.dtype, t->size));
      }
      DCPP_RETURN_IF_ERROR(SetElement(*state_dict, path, std::move(leaf)));
      dest_[fqn] = {path, nullptr};
    }
    for (auto& [fqn, d] : dest_) {
      d.value = GetElement(*state_dict, d.path);
      if (!d.value) return InternalError("rebuilt state dict lost \"" + fqn + "\"");
    }
    IndexDestinations();
    return Status::Ok();
  }
  std::vector<FlatEntry> flat;
  if (options_.flatten_state_dict) {
    DCPP_ASSIGN_OR_RETURN(flat, FlattenStateDict(*state_dict));
  } else {
    flat = TopLevelEntries(*state_dict);
  }
  for (const auto& e : flat) dest_[e.fqn] = {e.path, const_cast<Value*>(e.value)};
  IndexDestinations();
  return Status::Ok();
}

void DefaultLoadPlanner::IndexDestinations() {
  by_fqn_.clear();
  by_fqn_.reserve(dest_.size());
  for (auto& [fqn, d] : dest_) by_fqn_.emplace(fqn, &d);
}

namespace {

// The stored chunks must cover each destination box exactly once: a gap would leave values
// unloaded (zero or stale) and an overlap would load one of two stored versions.
Status CheckCoverage(const std::string& fqn, const std::vector<ChunkBox>& local,
                     const std::vector<ReadItem>& reads) {
  for (const ChunkBox& box : local) {
    std::vector<ChunkBox> parts;  // the destination regions read into this box
    for (const ReadItem& r : reads) {
      if (r.dest_index.offset && *r.dest_index.offset == box.offsets) {
        ChunkBox part{r.dest_offsets, r.lengths};
        for (int d = 0; d < part.dim(); ++d) part.offsets[d] += box.offsets[d];
        parts.push_back(std::move(part));
      }
    }
    unsigned __int128 covered = 0;
    for (const ChunkBox& p : parts) covered += static_cast<uint64_t>(p.numel());
    if (box.numel() == 0) continue;
    if (box.dim() == 0) {
      if (parts.size() == 1) continue;
      return DataLossError("key \"" + fqn + "\": " + std::to_string(parts.size()) +
                           " stored chunks for a 0-d tensor");
    }
    // Overlaps: sorted along dim 0, a part can only meet the parts that are still open there.
    std::sort(parts.begin(), parts.end(),
              [](const ChunkBox& a, const ChunkBox& b) { return a.offsets < b.offsets; });
    for (size_t i = 0; i < parts.size(); ++i) {
      for (size_t j = i + 1; j < parts.size(); ++j) {
        if (parts[j].offsets[0] >= parts[i].offsets[0] + parts[i].sizes[0]) break;
        if (Intersect(parts[i], parts[j])) {
          return InvalidArgumentError("key \"" + fqn + "\": stored chunks overlap at " +
                                      Intersect(parts[i], parts[j])->ToString());
        }
      }
    }
    if (covered != static_cast<uint64_t>(box.numel())) {
      return DataLossError("key \"" + fqn + "\": the checkpoint's chunks cover " +
                           std::to_string(static_cast<uint64_t>(covered)) + " of the " +
                           std::to_string(box.numel()) + " elements of " + box.ToString() +
                           " (set allow_partial_load to load the rest as it is)");
    }
  }
  return Status::Ok();
}

// One stored chunk that is the whole (non-empty) tensor: chunks == {WholeBox(size)} without
// building the box, as this runs once per key of the load.
bool IsWholeChunk(const std::vector<ChunkBox>& chunks, const Shape& size) {
  if (chunks.size() != 1 || chunks[0].sizes != size || NumElements(size) == 0) return false;
  const Shape& o = chunks[0].offsets;
  return o.size() == size.size() &&
         std::all_of(o.begin(), o.end(), [](int64_t x) { return x == 0; });
}

}  // namespace

Result<LoadPlan> DefaultLoadPlanner::CreateLocalPlan() {
  LoadPlan plan;
  plan.items.reserve(dest_.size());
  for (const auto& [fqn, dest] : dest_) {
    const StorageMetadata* m = metadata_->state_dict_metadata.Find(fqn);
    if (!m) {
      if (options_.allow_partial_load) continue;
      return NotFoundError("key \"" + fqn + "\" is not in the checkpoint");
    }
    const Value& v = *dest.value;
    if (const auto* t = std::get_if<TensorStorageMetadata>(m)) {
      std::vector<ChunkBox> local;
      DType dtype;
      if (v.is_tensor()) {
        if (v.tensor().shape() != t->size) {
          return InvalidArgumentError("key \"" + fqn + "\": checkpoint holds " +
                                      ShapeToString(t->size) + " but the destination is " +
                                      ShapeToString(v.tensor().shape()));
        }
        dtype = v.tensor().dtype();
        if (dtype == t->properties.dtype && IsWholeChunk(t->chunks, t->size)) {
          // The common case, a whole tensor saved as one chunk: one read of all of it, which
          // covers it exactly (CreateReadItemsForChunks would give the same item).
          ReadItem& r = plan.items.emplace_back();
          r.dest_index = {fqn, t->chunks[0].offsets, 0};
          r.storage_index = r.dest_index;
          r.dest_offsets = t->chunks[0].offsets;
          r.storage_offsets = t->chunks[0].offsets;
          r.lengths = t->size;
          continue;
        }
        local.push_back(WholeBox(t->size));
      } else if (v.is_sharded()) {
        if (v.sharded().global_shape != t->size) {
          return InvalidArgumentError("key \"" + fqn + "\": checkpoint holds " +
                                      ShapeToString(t->size) + " but the destination is " +
                                      ShapeToString(v.sharded().global_shape));
        }
        dtype = v.sharded().dtype;
        for (const Shard& s : v.sharded().shards) {
          if (s.tensor.dtype() != dtype) {
            return InvalidArgumentError("key \"" + fqn + "\": shard dtype differs");
          }
          local.push_back(s.box());
        }
      } else {
        return InvalidArgumentError("key \"" + fqn + "\" is a tensor in the checkpoint but a " +
                                    std::string(KindName(v.kind())) + " in the state dict");
      }
      if (dtype != t->properties.dtype) {
        return InvalidArgumentError("key \"" + fqn + "\": checkpoint holds " +
                                    std::string(DTypeName(t->properties.dtype)) +
                                    " but the destination is " + std::string(DTypeName(dtype)));
      }
      std::vector<ReadItem> reads = CreateReadItemsForChunks(fqn, local, t->chunks);
      if (!options_.allow_partial_load) DCPP_RETURN_IF_ERROR(CheckCoverage(fqn, local, reads));
      for (auto& r : reads) plan.items.push_back(std::move(r));
    } else {
      ReadItem r;
      r.type = LoadItemType::kByteIO;
      r.dest_index = {fqn, std::nullopt, std::nullopt};
      r.storage_index = r.dest_index;
      r.dest_offsets = r.storage_offsets = r.lengths = {0};
      plan.items.push_back(std::move(r));
    }
  }
  return plan;
}

Result<TensorView> DefaultLoadPlanner::ResolveTensor(const ReadItem& item) {
  auto it = by_fqn_.find(item.dest_index.fqn);
  if (it == by_fqn_.end()) {
    return InternalError("read item for unknown key \"" + item.dest_index.fqn + "\"");
  }
  const Value& v = *it->second->value;
  if (v.is_tensor()) return v.tensor().view();
  if (v.is_sharded()) {
    const auto& shards = v.sharded().shards;
    if (item.dest_index.index && *item.dest_index.index >= 0 &&
        *item.dest_index.index < static_cast<int64_t>(shards.size()) &&
        shards[*item.dest_index.index].offsets == item.dest_index.offset) {
      return shards[*item.dest_index.index].tensor.view();
    }
    for (const Shard& s : shards) {
      if (s.offsets == item.dest_index.offset) return s.tensor.view();
    }
  }
  return InternalError("no destination for \"" + item.dest_index.ToString() + "\"");
}

Status DefaultLoadPlanner::LoadBytes(const ReadItem& item, Value value) {
  auto it = by_fqn_.find(item.dest_index.fqn);
  if (it == by_fqn_.end()) {
    return InternalError("read item for unknown key \"" + item.dest_index.fqn + "\"");
  }
  *it->second->value = std::move(value);
  return Status::Ok();
}

}  // namespace dcpp
