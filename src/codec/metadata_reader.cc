// The direct `.metadata` decoder (see metadata_reader.h), step by step:
//   1. Each opcode is decoded at its offset; every length is compared with the bytes left first.
//   2. Values are 16-byte handles (Val): None, bools, ints and floats inline; str and bytes as
//      views into the input; tuples of ints as ranges of one int pool, other tuples as ranges
//      of one value pool (tuples never change); lists, dicts and dataclass objects as nodes that
//      record their nesting depth and whether another value holds them yet. The stack, the
//      marks and the memo follow the tree reader's rules exactly (codec/pickle.cc).
//   3. Calls are recognised where they happen: torch.Size(ints) is an int range, _get_layout,
//      the memory-format enum (both pickles) and pathlib paths become small values; any other
//      callable stops the decoder.
//   4. At its BUILD a dataclass object is reduced to a record of handles (a chunk: two int
//      ranges) and its field dict is recycled; nothing is copied yet, so a hostile memo cannot
//      multiply copies.
//   5. STOP assembles the dcpp::Metadata from the Metadata object's fields, copying each string
//      and shape once per reference, each charged first to the DecodeBudget (a memo-shared chunk
//      list costs its chunks at every key that holds it; the sum is kept in the list), with the
//      tree interpretation's rules (last duplicate field wins, None is
//      absent, a storage key keeps its first index hint, planner data that is not
//      {str: (str | int, ...)} is dropped).
#include "codec/metadata_reader.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstring>
#include <limits>
#include <unordered_set>
#include <vector>

#include "codec/decode_budget.h"
#include "codec/pickle.h"
#include "codec/pickle_opcodes.h"

namespace dcpp::internal {
namespace {

constexpr int kMaxDepth = 1000;  // PickleReadOptions' default, the tree reader's bound
constexpr int kHighestProtocol = 5;

enum class T : uint8_t {
  kNone,
  kBool,
  kInt,
  kFloat,
  kStr,        // x: offset in the input, n: length
  kBytes,      // same
  kGlobal,     // x: index in globals_
  kTuple,      // x: first item in items_, n: count
  kIntTuple,   // a tuple of ints only: x: first in ints_, n: count
  kList,       // x: node in lists_
  kDict,       // x: node in dicts_
  kObj,        // x: node in objs_ (a dataclass instance made by NEWOBJ)
  kSize,       // torch.Size(ints): x: first in ints_, n: count
  kLayout,     // _get_layout("torch.strided")
  kMemFormat,  // x: the MemoryFormat value
  kPath,       // pathlib path: x: first part in items_, n: number of parts (all str)
  kUnset,      // a memo slot not written yet
};

// Facts of a tuple, computed once when it is made, so a tuple read through the memo again and
// again costs nothing to check (a hostile pickle must not make checking quadratic).
constexpr uint8_t kNegative = 1;  // kIntTuple / kSize: some item is negative
constexpr uint8_t kAllStr = 2;    // kTuple: every item is a str

struct Val {
  T tag = T::kNone;
  uint8_t facts = 0;
  uint16_t depth = 1;  // the tree reader's nesting measure; nodes keep theirs in the node
  uint32_t n = 0;
  uint64_t x = 0;
};
static_assert(sizeof(Val) == 16);

// What a global is to the metadata.
enum class G : uint8_t {
  kOther,  // allowed, but not modelled: a plain value; as a callable it stops the decoder
  kClass,
  kDType,
  kStrided,
  kSizeFn,
  kGetLayout,
  kMemFormatEnum,
  kGetattr,
  kPathClass,
};
enum class Cls : uint8_t {
  kMetadata,
  kTensor,
  kBytes,
  kChunk,
  kStorageMeta,
  kIndex,
  kProperties,
  kInfo,
};
struct GlobalInfo {
  G kind = G::kOther;
  Cls cls = Cls::kMetadata;
  DType dtype = DType::kFloat32;
};

template <size_t N>
bool In(std::string_view s, const std::string_view (&list)[N]) {
  return std::find(std::begin(list), std::end(list), s) != std::end(list);
}

GlobalInfo Classify(std::string_view module, std::string_view name) {
  GlobalInfo g;
  if (In(module, kMetaModules)) {
    static constexpr std::pair<std::string_view, Cls> kClasses[] = {
        {"Metadata", Cls::kMetadata},          {"TensorStorageMetadata", Cls::kTensor},
        {"BytesStorageMetadata", Cls::kBytes}, {"ChunkStorageMetadata", Cls::kChunk},
        {"StorageMeta", Cls::kStorageMeta},    {"MetadataIndex", Cls::kIndex},
    };
    for (const auto& [n, c] : kClasses) {
      if (name == n) return {G::kClass, c};
    }
  }
  if (name == "TensorProperties" && In(module, kPropertiesModules)) {
    return {G::kClass, Cls::kProperties};
  }
  if (name == "_StorageInfo" && In(module, kStorageInfoModules)) return {G::kClass, Cls::kInfo};
  if (name == "_MEM_FORMAT_ENCODING" || name == "MEM_FORMAT_ENCODING") {
    g.kind = G::kMemFormatEnum;
    return g;
  }
  if (module == "torch") {
    if (name == "Size") return {G::kSizeFn};
    if (name == "strided") return {G::kStrided};
    if (auto d = DTypeFromName(name); d.ok()) return {G::kDType, Cls::kMetadata, *d};
    return g;
  }
  if (module == "torch.serialization" && name == "_get_layout") return {G::kGetLayout};
  if (module == "builtins" && name == "getattr") return {G::kGetattr};
  if ((module == "pathlib" || module == "pathlib._local") &&
      (name == "PosixPath" || name == "PurePosixPath" || name == "Path")) {
    return {G::kPathClass};
  }
  return g;
}

struct ListNode {
  std::vector<Val> items;
  uint16_t depth = 1;
  bool adopted = false;  // inside another value: no longer modifiable
  int8_t all_str = -1;   // IsStrSeq / IsChunkList, once known (-1: not yet)
  int8_t all_chunks = -1;
  uint64_t chunks_cost = 0;  // of its chunks when copied, once known (assembly)
  bool chunks_cost_known = false;
};
struct DictNode {
  std::vector<Val> items;  // key, value, key, value, ...
  uint16_t depth = 1;
  bool adopted = false;
  bool dead = false;  // its items were recycled after the BUILD that read them
};
struct ObjNode {
  Cls cls;
  bool built = false;
  bool adopted = false;
  uint16_t depth = 2;
  uint32_t rec = 0;  // the record of its class (Metadata: the field dict's node)
};

struct Range {
  uint32_t begin = 0;
  uint32_t n = 0;
};
struct PropsRec {
  DType dtype = DType::kFloat32;
  bool requires_grad = false;
  MemoryFormat memory_format = MemoryFormat::kContiguous;
  bool pin_memory = false;
  bool has_strides = false;
  Range strides;
};
struct ChunkRec {
  Range offsets, sizes;
};
struct TensorRec {
  uint32_t props = 0;  // in props_; kDefaultProps for an object never built
  Range size;
  uint32_t chunks = 0;  // list node of built ChunkStorageMetadata objects
};
struct IndexRec {
  std::string_view fqn;
  bool has_offset = false;
  bool has_index = false;
  Range offset;
  int64_t index = 0;
};
struct InfoRec {
  std::string_view path;
  int64_t offset = 0;
  int64_t length = 0;
  Val descriptors;  // kNone, or a list / tuple of str
};
struct StorageMetaRec {
  Val checkpoint_id, save_id, load_id, modules;  // kNone when absent
};

constexpr uint32_t kDefaultProps = std::numeric_limits<uint32_t>::max();

using pickle_op::Hex;
using pickle_op::Py3Module;

namespace op = pickle_op;

class Decoder {
 public:
  Decoder(std::string_view data, uint64_t budget)
      : data_(data), max_values_(data.size() + 16), budget_(data.size(), budget) {}

  Result<Metadata> Run() {
    // Ranges are 32-bit: each pool entry costs at least one input byte, so 4 GiB bounds them.
    if (data_.size() >= (uint64_t{1} << 32) - 64) {
      Unhandled("a pickle of 4 GiB or more");
      return error_;
    }
    if (!Prescan()) return error_;
    stack_.reserve(64);
    lists_.reserve(n_lists_);
    dicts_.reserve(n_dicts_);
    objs_.reserve(n_objs_);
    items_.reserve(n_tuple_items_);
    while (!stopped_) {
      op_pos_ = pos_;
      if (pos_ >= data_.size()) {
        op_ = 0;
        Malformed("truncated: input ends before STOP");
        return error_;
      }
      op_ = static_cast<uint8_t>(data_[pos_++]);
      if (!Step(op_)) return error_;
    }
    return std::move(result_);
  }

 private:
  // ---- errors: both make ParseMetadata ask the tree path
  bool Malformed(std::string_view message) {
    error_ = DataLossError("metadata offset " + std::to_string(op_pos_) + " (opcode 0x" + Hex(op_) +
                           "): " + std::string(message));
    return false;
  }
  bool Unhandled(std::string_view what) {
    error_ = UnimplementedError("metadata offset " + std::to_string(op_pos_) + ": " +
                                std::string(what) + " is outside the direct decoder");
    return false;
  }

  // Takes `units` of the budget; past it, the error names what `context()` returns.
  template <typename F>
  bool Charge(uint64_t units, F&& context) {
    if (budget_.Take(units)) return true;
    error_ = budget_.Exceeded().WithContext(context());
    return false;
  }
  // What copying the chunks of list node `l` costs, summed once.
  uint64_t ChunksCost(uint32_t l) {
    ListNode& list = lists_[l];
    if (!list.chunks_cost_known) {
      for (const Val& c : list.items) {
        const ChunkRec& cr = chunks_[objs_[c.x].rec];
        list.chunks_cost += CostChunk(cr.offsets.n, cr.sizes.n);
      }
      list.chunks_cost_known = true;
    }
    return list.chunks_cost;
  }

  // ---- input
  size_t Remaining() const { return data_.size() - pos_; }
  bool Need(uint64_t n) {
    if (n > Remaining()) {
      return Malformed("truncated: needs " + std::to_string(n) + " bytes, " +
                       std::to_string(Remaining()) + " left");
    }
    return true;
  }
  uint64_t LE(size_t width) {  // after Need(width)
    uint64_t v = 0;
    for (size_t i = 0; i < width; ++i) {
      v |= uint64_t{static_cast<unsigned char>(data_[pos_ + i])} << (8 * i);
    }
    pos_ += width;
    return v;
  }
  bool ReadLE(size_t width, uint64_t* v) {
    if (!Need(width)) return false;
    *v = LE(width);
    return true;
  }
  bool ReadLine(std::string_view* line) {
    size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) return Malformed("truncated: unterminated text argument");
    *line = data_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return true;
  }
  // A payload behind a length prefix of `width` bytes, as a view (offset, length) of the input.
  bool ReadCounted(size_t width, bool is_signed, uint64_t* at, uint64_t* n) {
    if (!ReadLE(width, n)) return false;
    if (is_signed && width == 4 && (*n & 0x80000000u)) return Malformed("negative length");
    if (!Need(*n)) return false;
    if (*n >= (uint64_t{1} << 32)) return Unhandled("a string of 4 GiB or more");
    *at = pos_;
    pos_ += static_cast<size_t>(*n);
    return true;
  }
  std::string_view View(const Val& v) const { return data_.substr(v.x, v.n); }

  // ---- the stack
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  bool Push(const Val& v) {
    if (++values_ > max_values_) return Malformed("too many values");
    stack_.push_back(v);
    return true;
  }
  bool Pop(Val* v) {
    if (stack_.size() <= Floor()) return Malformed("stack underflow");
    *v = stack_.back();
    stack_.pop_back();
    return true;
  }
  bool CheckTop() {
    if (stack_.size() <= Floor()) return Malformed("stack underflow");
    return true;
  }
  // Start of the items above the last MARK, which is removed.
  bool PopMark(size_t* start) {
    if (marks_.empty()) return Malformed("no MARK on the stack");
    *start = marks_.back();
    marks_.pop_back();
    return true;
  }

  // ---- nesting and adoption, as the tree reader keeps them
  uint16_t Depth(const Val& v) const {
    switch (v.tag) {
      case T::kList:
        return lists_[v.x].depth;
      case T::kDict:
        return dicts_[v.x].depth;
      case T::kObj:
        return objs_[v.x].depth;
      default:
        return v.depth;
    }
  }
  void Adopt(const Val& v) {
    if (v.tag == T::kList) lists_[v.x].adopted = true;
    if (v.tag == T::kDict) dicts_[v.x].adopted = true;
    if (v.tag == T::kObj) objs_[v.x].adopted = true;
  }
  // Parent depth after taking `child`; false past the bound.
  bool Grow(uint16_t* depth, const Val& child) {
    const int d = std::max<int>(*depth, Depth(child) + 1);
    if (d > kMaxDepth) return Malformed("values nested deeper than 1000");
    *depth = static_cast<uint16_t>(d);
    return true;
  }
  static bool Same(const Val& a, const Val& b) { return a.tag == b.tag && a.x == b.x; }

  // Item i of a tuple (kTuple or kIntTuple).
  Val TupleItem(const Val& t, uint32_t i) const {
    if (t.tag == T::kTuple) return items_[t.x + i];
    Val v;
    v.tag = T::kInt;
    v.x = static_cast<uint64_t>(ints_[t.x + i]);
    return v;
  }
  static bool IsTuple(const Val& v) { return v.tag == T::kTuple || v.tag == T::kIntTuple; }

  // ---- values
  bool PushInt(int64_t i) {
    Val v;
    v.tag = T::kInt;
    v.x = static_cast<uint64_t>(i);
    return Push(v);
  }
  bool PushBool(bool b) {
    Val v;
    v.tag = T::kBool;
    v.x = b;
    return Push(v);
  }
  bool PushView(T tag, uint64_t at, uint64_t n) {
    Val v;
    v.tag = tag;
    v.x = at;
    v.n = static_cast<uint32_t>(n);
    return Push(v);
  }
  // The items stack_[start..] become one tuple.
  bool MakeTuple(size_t start) {
    const size_t n = stack_.size() - start;
    bool ints = true;
    for (size_t i = start; i < stack_.size() && ints; ++i) ints = stack_[i].tag == T::kInt;
    Val t;
    t.n = static_cast<uint32_t>(n);
    if (ints) {
      t.tag = T::kIntTuple;
      t.x = ints_.size();
      t.depth = n ? 2 : 1;
      for (size_t i = start; i < stack_.size(); ++i) {
        const auto v = static_cast<int64_t>(stack_[i].x);
        if (v < 0) t.facts |= kNegative;
        ints_.push_back(v);
      }
    } else {
      t.tag = T::kTuple;
      t.x = items_.size();
      t.facts = kAllStr;
      for (size_t i = start; i < stack_.size(); ++i) {
        if (stack_[i].tag != T::kStr) t.facts = 0;
        if (!Grow(&t.depth, stack_[i])) return false;
        Adopt(stack_[i]);
        items_.push_back(stack_[i]);
      }
    }
    stack_.resize(start);
    return Push(t);
  }
  uint32_t NewDict() {
    dicts_.emplace_back();
    if (!free_.empty()) {
      dicts_.back().items = std::move(free_.back());
      dicts_.back().items.clear();
      free_.pop_back();
    }
    return static_cast<uint32_t>(dicts_.size() - 1);
  }

  // APPEND(S) of stack_[start..] onto the list below them.
  bool Appends(size_t start) {
    if (start <= Floor()) return Malformed("stack underflow");
    const Val& target = stack_[start - 1];
    if (target.tag != T::kList) {
      if (target.tag == T::kObj) return Unhandled("items appended to an object");
      return Malformed("APPEND(S) onto a value that is not a list");
    }
    ListNode& l = lists_[target.x];
    if (l.adopted) return Malformed("a list changed after it was placed in another value");
    for (size_t i = start; i < stack_.size(); ++i) {
      if (Same(stack_[i], target)) return Malformed("a list cannot contain itself");
      if (!Grow(&l.depth, stack_[i])) return false;
      Adopt(stack_[i]);
      l.items.push_back(stack_[i]);
    }
    stack_.resize(start);
    return true;
  }
  // SETITEM(S) of the pairs stack_[start..] onto the dict below them.
  bool SetItems(size_t start) {
    if ((stack_.size() - start) % 2 != 0) return Malformed("odd number of items for a dict");
    if (start <= Floor()) return Malformed("stack underflow");
    const Val& target = stack_[start - 1];
    if (target.tag != T::kDict) {
      if (target.tag == T::kObj) return Unhandled("items set on an object");
      return Malformed("SETITEM(S) onto a value that is not a dict");
    }
    DictNode& d = dicts_[target.x];
    if (d.adopted) return Malformed("a dict changed after it was placed in another value");
    for (size_t i = start; i < stack_.size(); ++i) {
      if (Same(stack_[i], target)) return Malformed("a dict cannot contain itself");
      if (!Grow(&d.depth, stack_[i])) return false;
      Adopt(stack_[i]);
      d.items.push_back(stack_[i]);
    }
    stack_.resize(start);
    return true;
  }

  bool DoGlobal(std::string_view module, std::string_view name) {
    if (proto_ < 3) module = Py3Module(module);
    static const PickleAllowList kAllow = PickleAllowList::DcpMetadata();
    if (!kAllow.Allows(module, name)) return Unhandled("a global outside the allow-list");
    globals_.push_back(Classify(module, name));
    Val v;
    v.tag = T::kGlobal;
    v.x = globals_.size() - 1;
    return Push(v);
  }

  bool DoReduce() {
    Val args, f;
    if (!Pop(&args) || !Pop(&f)) return false;
    if (f.tag != T::kGlobal) return Unhandled("a call of a value that is not a global");
    if (!IsTuple(args)) return Malformed("REDUCE arguments are not a tuple");
    Val r;
    r.depth = static_cast<uint16_t>(std::max<int>(2, args.depth + 1));
    if (r.depth > kMaxDepth) return Malformed("values nested deeper than 1000");
    switch (globals_[f.x].kind) {
      case G::kSizeFn: {
        if (args.n != 1) return Unhandled("torch.Size with other than one argument");
        const Val inner = TupleItem(args, 0);
        if (inner.tag != T::kIntTuple) return Unhandled("torch.Size of something but ints");
        r.tag = T::kSize;
        r.x = inner.x;
        r.n = inner.n;
        r.facts = inner.facts;
        return Push(r);
      }
      case G::kGetLayout: {
        if (args.n != 1) return Unhandled("_get_layout with other than one argument");
        const Val s = TupleItem(args, 0);
        if (s.tag != T::kStr || View(s) != "torch.strided") return Unhandled("a tensor layout");
        r.tag = T::kLayout;
        return Push(r);
      }
      case G::kMemFormatEnum: {
        if (args.n != 1) return Unhandled("a memory format enum call");
        const Val i = TupleItem(args, 0);
        if (i.tag != T::kInt || i.x > 2) return Unhandled("a memory format value");
        r.tag = T::kMemFormat;
        r.x = i.x;
        return Push(r);
      }
      case G::kGetattr: {
        if (args.n != 2) return Unhandled("a getattr call");
        const Val cls = TupleItem(args, 0);
        const Val member = TupleItem(args, 1);
        if (cls.tag != T::kGlobal || globals_[cls.x].kind != G::kMemFormatEnum ||
            member.tag != T::kStr) {
          return Unhandled("a getattr call");
        }
        const std::string_view m = View(member);
        r.tag = T::kMemFormat;
        if (m == "TORCH_CONTIGUOUS_FORMAT") {
          r.x = static_cast<uint64_t>(MemoryFormat::kContiguous);
        } else if (m == "TORCH_CHANNELS_LAST") {
          r.x = static_cast<uint64_t>(MemoryFormat::kChannelsLast);
        } else if (m == "TORCH_PRESERVE_FORMAT") {
          r.x = static_cast<uint64_t>(MemoryFormat::kPreserve);
        } else {
          return Unhandled("a memory format member");
        }
        return Push(r);
      }
      case G::kPathClass: {
        if (!IsStrSeq(args)) return Unhandled("a path whose parts are not all str");
        r.tag = T::kPath;
        r.x = args.tag == T::kTuple ? args.x : 0;
        r.n = args.n;
        return Push(r);
      }
      default:
        return Unhandled("a call of a global it does not model");
    }
  }

  bool DoNewObj() {
    Val args, cls;
    if (!Pop(&args) || !Pop(&cls)) return false;
    if (cls.tag != T::kGlobal || globals_[cls.x].kind != G::kClass) {
      return Unhandled("NEWOBJ of a class it does not model");
    }
    if (!IsTuple(args)) return Malformed("NEWOBJ arguments are not a tuple");
    if (args.n != 0) return Unhandled("NEWOBJ with arguments");
    objs_.push_back(ObjNode{globals_[cls.x].cls});
    Val v;
    v.tag = T::kObj;
    v.x = objs_.size() - 1;
    return Push(v);
  }

  // ---- records
  // A size: torch.Size(ints) or a tuple of ints, none negative (ParseSize).
  bool AsSize(const Val& v, Range* r) {
    if (v.tag != T::kSize && v.tag != T::kIntTuple) return Unhandled("a size of another form");
    if (v.facts & kNegative) return Unhandled("a negative size or offset");
    *r = Range{static_cast<uint32_t>(v.x), v.n};
    return true;
  }
  // Field values of a dataclass state dict: the last str key of each name wins; None is absent.
  template <size_t N>
  bool Fields(const Val& state, const std::string_view (&names)[N], Val (&out)[N]) {
    if (state.tag != T::kDict) return Unhandled("an object state that is not a dict");
    const DictNode& d = dicts_[state.x];
    if (d.dead) return Unhandled("a field dict used twice");
    for (size_t i = 0; i + 1 < d.items.size(); i += 2) {
      const Val& k = d.items[i];
      if (k.tag != T::kStr) continue;
      const std::string_view key = View(k);
      for (size_t f = 0; f < N; ++f) {
        if (key == names[f]) {
          out[f] = d.items[i + 1];
          break;
        }
      }
    }
    return true;
  }
  void Recycle(const Val& state) {
    DictNode& d = dicts_[state.x];
    d.dead = true;
    free_.push_back(std::move(d.items));
    d.items = {};
  }
  // A tuple or list of str only. A list is checked once: it is read here only from inside a
  // field dict, so it is adopted and can no longer change.
  bool IsStrSeq(const Val& v) {
    if (v.tag == T::kIntTuple) return v.n == 0;
    if (v.tag == T::kTuple) return (v.facts & kAllStr) != 0;
    if (v.tag != T::kList) return false;
    ListNode& l = lists_[v.x];
    if (l.all_str < 0 || !l.adopted) {
      l.all_str = std::all_of(l.items.begin(), l.items.end(),
                              [](const Val& x) { return x.tag == T::kStr; });
    }
    return l.all_str != 0;
  }
  // A list of built ChunkStorageMetadata objects only, checked once as above.
  bool IsChunkList(const Val& v) {
    if (v.tag != T::kList) return false;
    ListNode& l = lists_[v.x];
    if (l.all_chunks < 0 || !l.adopted) {
      l.all_chunks = std::all_of(l.items.begin(), l.items.end(),
                                 [&](const Val& c) { return IsBuilt(c, Cls::kChunk); });
    }
    return l.all_chunks != 0;
  }
  bool IsBuilt(const Val& v, Cls cls) const {
    return v.tag == T::kObj && objs_[v.x].cls == cls && objs_[v.x].built;
  }

  bool BuildProperties(const Val& state, uint32_t* rec) {
    if (state.tag != T::kTuple) return Unhandled("a TensorProperties state that is not a tuple");
    if (state.n != 5 && state.n != 6) return Unhandled("a TensorProperties state of that length");
    const Val* t = &items_[state.x];
    PropsRec p;
    if (t[0].tag != T::kGlobal || globals_[t[0].x].kind != G::kDType) return Unhandled("a dtype");
    p.dtype = globals_[t[0].x].dtype;
    const bool strided =
        t[1].tag == T::kLayout || (t[1].tag == T::kGlobal && globals_[t[1].x].kind == G::kStrided);
    if (!strided) return Unhandled("a tensor layout");
    if (t[2].tag != T::kBool || t[3].tag != T::kMemFormat || t[4].tag != T::kBool) {
      return Unhandled("TensorProperties fields of other kinds");
    }
    p.requires_grad = t[2].x != 0;
    p.memory_format = static_cast<MemoryFormat>(t[3].x);
    p.pin_memory = t[4].x != 0;
    if (state.n == 6 && t[5].tag != T::kNone) {
      if (!AsSize(t[5], &p.strides)) return false;
      p.has_strides = true;
    }
    props_.push_back(p);
    *rec = static_cast<uint32_t>(props_.size() - 1);
    return true;
  }

  bool BuildRecord(Cls cls, const Val& state, uint32_t* rec) {
    switch (cls) {
      case Cls::kMetadata:
        // Read at STOP; its dict stays.
        if (state.tag != T::kDict) return Unhandled("a Metadata state that is not a dict");
        *rec = static_cast<uint32_t>(state.x);
        return true;
      case Cls::kBytes:
        return true;  // fields, if any, are not read
      case Cls::kProperties:
        return BuildProperties(state, rec);
      case Cls::kChunk: {
        static constexpr std::string_view kNames[] = {"offsets", "sizes"};
        Val f[2];
        if (!Fields(state, kNames, f)) return false;
        ChunkRec c;
        if (!AsSize(f[0], &c.offsets) || !AsSize(f[1], &c.sizes)) return false;
        chunks_.push_back(c);
        *rec = static_cast<uint32_t>(chunks_.size() - 1);
        break;
      }
      case Cls::kTensor: {
        static constexpr std::string_view kNames[] = {"properties", "size", "chunks"};
        Val f[3];
        if (!Fields(state, kNames, f)) return false;
        TensorRec t;
        if (f[0].tag != T::kObj || objs_[f[0].x].cls != Cls::kProperties) {
          return Unhandled("TensorStorageMetadata.properties of another kind");
        }
        t.props = objs_[f[0].x].built ? objs_[f[0].x].rec : kDefaultProps;
        if (!AsSize(f[1], &t.size)) return false;
        if (!IsChunkList(f[2])) return Unhandled("chunks that are not a list of chunks");
        t.chunks = static_cast<uint32_t>(f[2].x);
        tensors_.push_back(t);
        *rec = static_cast<uint32_t>(tensors_.size() - 1);
        break;
      }
      case Cls::kIndex: {
        static constexpr std::string_view kNames[] = {"fqn", "offset", "index"};
        Val f[3];
        if (!Fields(state, kNames, f)) return false;
        IndexRec r;
        if (f[0].tag != T::kStr) return Unhandled("MetadataIndex.fqn of another kind");
        r.fqn = View(f[0]);
        if (f[1].tag != T::kNone) {
          if (!AsSize(f[1], &r.offset)) return false;
          r.has_offset = true;
        }
        if (f[2].tag != T::kNone) {
          if (f[2].tag != T::kInt) return Unhandled("MetadataIndex.index of another kind");
          r.has_index = true;
          r.index = static_cast<int64_t>(f[2].x);
        }
        indexes_.push_back(r);
        *rec = static_cast<uint32_t>(indexes_.size() - 1);
        break;
      }
      case Cls::kInfo: {
        static constexpr std::string_view kNames[] = {"relative_path", "offset", "length",
                                                      "transform_descriptors"};
        Val f[4];
        if (!Fields(state, kNames, f)) return false;
        InfoRec r;
        if (f[0].tag != T::kStr || f[1].tag != T::kInt || f[2].tag != T::kInt) {
          return Unhandled("_StorageInfo fields of other kinds");
        }
        r.path = View(f[0]);
        r.offset = static_cast<int64_t>(f[1].x);
        r.length = static_cast<int64_t>(f[2].x);
        if (r.offset < 0 || r.length < 0) return Unhandled("a negative offset or length");
        if (f[3].tag != T::kNone) {
          if (!IsStrSeq(f[3])) return Unhandled("transform descriptors of another kind");
          r.descriptors = f[3];
        }
        infos_.push_back(r);
        *rec = static_cast<uint32_t>(infos_.size() - 1);
        break;
      }
      case Cls::kStorageMeta: {
        static constexpr std::string_view kNames[] = {"checkpoint_id", "save_id", "load_id",
                                                      "modules"};
        Val f[4];
        if (!Fields(state, kNames, f)) return false;
        if (f[0].tag != T::kNone && f[0].tag != T::kStr && f[0].tag != T::kPath) {
          return Unhandled("a checkpoint id of another kind");
        }
        if ((f[1].tag != T::kNone && f[1].tag != T::kStr) ||
            (f[2].tag != T::kNone && f[2].tag != T::kStr)) {
          return Unhandled("a save or load id of another kind");
        }
        if (f[3].tag != T::kNone && !(f[3].tag == T::kList && IsStrSeq(f[3]))) {
          return Unhandled("modules of another kind");
        }
        smetas_.push_back(StorageMetaRec{f[0], f[1], f[2], f[3]});
        *rec = static_cast<uint32_t>(smetas_.size() - 1);
        break;
      }
    }
    Recycle(state);
    return true;
  }

  bool DoBuild() {
    Val state;
    if (!Pop(&state) || !CheckTop()) return false;
    const Val target = stack_.back();
    if (target.tag != T::kObj) return Unhandled("BUILD on a value that is not a dataclass");
    ObjNode& o = objs_[target.x];
    if (o.built) return Malformed("object state is already set");
    if (o.adopted) return Malformed("an object changed after it was placed in another value");
    if (Same(state, target)) return Malformed("a value cannot contain itself");
    uint16_t depth = o.depth;
    if (!Grow(&depth, state)) return false;
    uint32_t rec = 0;
    if (!BuildRecord(o.cls, state, &rec)) return false;
    Adopt(state);
    ObjNode& built = objs_[target.x];
    built.depth = depth;
    built.rec = rec;
    built.built = true;
    return true;
  }

  // The memo keeps the values of the indices some GET reads (Prescan found them); for the
  // others it only remembers that they are set, which MEMOIZE's numbering needs.
  bool Read(uint64_t index) const {
    if (index < read_bits_.size() * 64) return (read_bits_[index / 64] >> (index % 64)) & 1;
    return std::binary_search(read_far_.begin(), read_far_.end(), index);
  }
  Val* ReadSlot(uint64_t index) {
    auto it = std::lower_bound(read_list_.begin(), read_list_.end(), index);
    return &read_vals_[static_cast<size_t>(it - read_list_.begin())];
  }
  bool MemoPut(uint64_t index) {
    if (!CheckTop()) return false;
    if (Read(index)) *ReadSlot(index) = stack_.back();
    // Set-ness and numbering as in the tree reader: dense indices first, any others apart.
    if (index < memo_dense_) return true;
    if (memo_sparse_.count(index)) return true;
    if (memo_count_ >= max_values_) return Malformed("too many memo entries");
    ++memo_count_;
    if (index == memo_dense_) {
      ++memo_dense_;
    } else {
      memo_sparse_.insert(index);
    }
    return true;
  }
  bool MemoGet(uint64_t index) {
    Val* v = Read(index) ? ReadSlot(index) : nullptr;
    if (!v || v->tag == T::kUnset) {
      return Malformed("memo index " + std::to_string(index) + " is not set");
    }
    stack_.push_back(*v);
    return true;
  }
  bool Prescan();

  bool DecodeLong(std::string_view bytes, int64_t* out) {
    size_t n = bytes.size();
    *out = 0;
    if (n == 0) return true;
    auto byte = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
    const bool negative = (byte(n - 1) & 0x80) != 0;
    if (n > 8) {
      const unsigned char fill = negative ? 0xff : 0x00;
      for (size_t i = 8; i < n; ++i) {
        if (byte(i) != fill) return Malformed("integer too large");
      }
      if (((byte(7) & 0x80) != 0) != negative) return Malformed("integer too large");
      n = 8;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= uint64_t{byte(i)} << (8 * i);
    if (negative && n < 8) v |= ~uint64_t{0} << (8 * n);
    *out = static_cast<int64_t>(v);
    return true;
  }
  bool ParseDecimal(std::string_view text, int64_t* v) {
    std::string_view t = text;
    if (!t.empty() && t.front() == '+') t.remove_prefix(1);
    auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), *v);
    if (ec != std::errc() || end != t.data() + t.size() || t.empty()) {
      return Malformed("bad decimal integer");
    }
    return true;
  }

  bool Step(uint8_t code);
  bool Finish();
  // ---- assembling the result (step 5)
  Shape MakeShape(Range r) const {
    return Shape(ints_.begin() + r.begin, ints_.begin() + r.begin + r.n);
  }
  // As the tree interpretation charges a path: the string, then each part and its separator.
  bool PathString(const Val& p, std::string* out) {
    const auto context = [] { return std::string("metadata: storage_meta"); };
    if (!Charge(CostStr(0), context)) return false;
    for (uint32_t i = 0; i < p.n; ++i) {
      const std::string_view part = View(items_[p.x + i]);
      if (!Charge(part.size() + 1, context)) return false;
      if (!out->empty() && out->back() != '/') *out += '/';
      *out += part;
    }
    return true;
  }
  bool Assemble(const Val& root, Metadata* md);
  std::optional<std::map<std::string, ObjectPath>> Planner(const Val& v, bool* ok);

  std::string_view data_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  uint8_t op_ = 0;
  int proto_ = 0;
  bool stopped_ = false;
  Status error_;
  Metadata result_;
  size_t values_ = 0;
  const size_t max_values_;
  DecodeBudget budget_;

  std::vector<Val> stack_;
  std::vector<size_t> marks_;
  uint64_t memo_dense_ = 0;  // indices 0..memo_dense_-1 are set; others set in memo_sparse_
  std::unordered_set<uint64_t> memo_sparse_;
  size_t memo_count_ = 0;
  std::vector<uint64_t> read_bits_;  // indices a GET reads, below the input's size
  std::vector<uint64_t> read_far_;   // those at or past it (sorted)
  std::vector<uint64_t> read_list_;  // all of them, sorted: the slot of read_vals_
  std::vector<Val> read_vals_;
  size_t n_lists_ = 0, n_dicts_ = 0, n_objs_ = 0, n_tuple_items_ = 0;

  std::vector<int64_t> ints_;
  std::vector<Val> items_;
  std::vector<GlobalInfo> globals_;
  std::vector<ListNode> lists_;
  std::vector<DictNode> dicts_;
  std::vector<ObjNode> objs_;
  std::vector<std::vector<Val>> free_;  // recycled field dicts' storage

  std::vector<PropsRec> props_;
  std::vector<ChunkRec> chunks_;
  std::vector<TensorRec> tensors_;
  std::vector<IndexRec> indexes_;
  std::vector<InfoRec> infos_;
  std::vector<StorageMetaRec> smetas_;
};

// One pass over the opcodes, arguments skipped, that collects the memo indices GETs read and
// counts what the pools will hold. It decodes argument lengths exactly as Step does; where it
// cannot go on (truncation, an opcode Step declines) it stops and leaves the error to Step,
// which reaches the same place. A GET it did not see finds no value: declined, never wrong.
bool Decoder::Prescan() {
  read_bits_.assign((data_.size() + 16 + 63) / 64, 0);
  size_t p = 0;
  auto skip = [&](uint64_t n) {
    if (n > data_.size() - p) return false;
    p += static_cast<size_t>(n);
    return true;
  };
  auto le = [&](size_t width, uint64_t* v) {
    if (width > data_.size() - p) return false;
    *v = 0;
    for (size_t i = 0; i < width; ++i) {
      *v |= uint64_t{static_cast<unsigned char>(data_[p + i])} << (8 * i);
    }
    p += width;
    return true;
  };
  auto line = [&](std::string_view* l) {
    const size_t nl = data_.find('\n', p);
    if (nl == std::string_view::npos) return false;
    *l = data_.substr(p, nl - p);
    p = nl + 1;
    return true;
  };
  auto read = [&](uint64_t index) {
    if (index < read_bits_.size() * 64) {
      uint64_t& w = read_bits_[index / 64];
      if ((w >> (index % 64)) & 1) return;
      w |= uint64_t{1} << (index % 64);
    } else {
      read_far_.push_back(index);
    }
    read_list_.push_back(index);
  };
  bool go = true;
  while (go && p < data_.size()) {
    const auto code = static_cast<uint8_t>(data_[p++]);
    uint64_t v = 0;
    std::string_view l;
    switch (code) {
      case op::kStop:
        go = false;
        break;
      case op::kFrame:
      case op::kBinFloat:
        go = skip(8);
        break;
      case op::kProto:
      case op::kBinInt1:
      case op::kBinPut:
        go = skip(1);
        break;
      case op::kBinInt2:
        go = skip(2);
        break;
      case op::kBinInt:
      case op::kLongBinPut:
        go = skip(4);
        break;
      case op::kLong1:
      case op::kShortBinUnicode:
      case op::kShortBinString:
      case op::kShortBinBytes:
        go = le(1, &v) && skip(v);
        break;
      case op::kLong4:
      case op::kBinUnicode:
      case op::kBinString:
      case op::kBinBytes:
        go = le(4, &v) && skip(v);
        break;
      case op::kBinUnicode8:
      case op::kBinBytes8:
      case op::kByteArray8:
        go = le(8, &v) && skip(v);
        break;
      case op::kInt:
      case op::kLong:
      case op::kFloat:
      case op::kPut:
        go = line(&l);
        break;
      case op::kGlobal:
        go = line(&l) && line(&l);
        break;
      case op::kBinGet:
      case op::kLongBinGet:
        go = le(code == op::kBinGet ? 1 : 4, &v);
        if (go) read(v);
        break;
      case op::kGet: {
        go = line(&l);
        int64_t i = 0;
        auto [end, ec] =
            std::from_chars(l.data() + (!l.empty() && l[0] == '+'), l.data() + l.size(), i);
        if (go && ec == std::errc() && end == l.data() + l.size() && i >= 0) {
          read(static_cast<uint64_t>(i));
        }
        break;
      }
      case op::kEmptyList:
      case op::kList:
        ++n_lists_;
        break;
      case op::kEmptyDict:
      case op::kDict:
        ++n_dicts_;
        break;
      case op::kNewObj:
        ++n_objs_;
        break;
      case op::kTuple1:
      case op::kTuple2:
      case op::kTuple3:
        n_tuple_items_ += code - op::kTuple1 + 1;
        break;
      case op::kMark:
      case op::kPop:
      case op::kPopMark:
      case op::kDup:
      case op::kNone:
      case op::kNewTrue:
      case op::kNewFalse:
      case op::kReduce:
      case op::kAppend:
      case op::kAppends:
      case op::kBuild:
      case op::kSetItem:
      case op::kSetItems:
      case op::kTuple:
      case op::kEmptyTuple:
      case op::kStackGlobal:
      case op::kMemoize:
        break;
      default:
        go = false;  // Step declines it
    }
  }
  std::sort(read_far_.begin(), read_far_.end());
  std::sort(read_list_.begin(), read_list_.end());
  Val unset;
  unset.tag = T::kUnset;
  read_vals_.assign(read_list_.size(), unset);
  return true;
}

bool Decoder::Step(uint8_t code) {
  switch (code) {
    case op::kFrame: {
      uint64_t n = 0;
      if (!ReadLE(8, &n)) return false;
      if (n > Remaining()) return Malformed("frame longer than the input");
      return true;
    }
    case op::kProto: {
      uint64_t v = 0;
      if (!ReadLE(1, &v)) return false;
      if (v > kHighestProtocol) return Malformed("unsupported protocol");
      proto_ = static_cast<int>(v);
      return true;
    }
    case op::kStop:
      return Finish();
    case op::kNone: {
      return Push(Val{});
    }
    case op::kNewTrue:
      return PushBool(true);
    case op::kNewFalse:
      return PushBool(false);
    case op::kBinInt1:
    case op::kBinInt2:
    case op::kBinInt: {
      const size_t width = code == op::kBinInt1 ? 1 : code == op::kBinInt2 ? 2 : 4;
      uint64_t v = 0;
      if (!ReadLE(width, &v)) return false;
      if (width == 4) return PushInt(static_cast<int32_t>(static_cast<uint32_t>(v)));
      return PushInt(static_cast<int64_t>(v));
    }
    case op::kLong1:
    case op::kLong4: {
      uint64_t at = 0, n = 0;
      if (!ReadCounted(code == op::kLong1 ? 1 : 4, true, &at, &n)) return false;
      int64_t v = 0;
      if (!DecodeLong(data_.substr(at, n), &v)) return false;
      return PushInt(v);
    }
    case op::kInt:
    case op::kLong: {
      std::string_view line;
      if (!ReadLine(&line)) return false;
      if (code == op::kInt && line == "01") return PushBool(true);
      if (code == op::kInt && line == "00") return PushBool(false);
      if (code == op::kLong && !line.empty() && line.back() == 'L') line.remove_suffix(1);
      int64_t v = 0;
      if (!ParseDecimal(line, &v)) return false;
      return PushInt(v);
    }
    case op::kFloat: {
      std::string_view line;
      if (!ReadLine(&line)) return false;
      double d = 0;
      auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), d);
      if (ec != std::errc() || end != line.data() + line.size() || line.empty()) {
        return Malformed("bad float");
      }
      Val v;
      v.tag = T::kFloat;
      v.x = std::bit_cast<uint64_t>(d);
      return Push(v);
    }
    case op::kBinFloat: {
      if (!Need(8)) return false;
      uint64_t bits = 0;
      for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<unsigned char>(data_[pos_ + i]);
      pos_ += 8;
      Val v;
      v.tag = T::kFloat;
      v.x = bits;
      return Push(v);
    }
    case op::kShortBinUnicode:
    case op::kBinUnicode:
    case op::kBinUnicode8:
    case op::kShortBinString:
    case op::kBinString: {
      const size_t width = (code == op::kShortBinUnicode || code == op::kShortBinString) ? 1
                           : code == op::kBinUnicode8                                    ? 8
                                                                                         : 4;
      uint64_t at = 0, n = 0;
      if (!ReadCounted(width, code == op::kBinString, &at, &n)) return false;
      return PushView(T::kStr, at, n);
    }
    case op::kShortBinBytes:
    case op::kBinBytes:
    case op::kBinBytes8:
    case op::kByteArray8: {
      const size_t width = code == op::kShortBinBytes ? 1 : code == op::kBinBytes ? 4 : 8;
      uint64_t at = 0, n = 0;
      if (!ReadCounted(width, false, &at, &n)) return false;
      return PushView(T::kBytes, at, n);
    }
    case op::kEmptyTuple:
      return MakeTuple(stack_.size());
    case op::kTuple1:
    case op::kTuple2:
    case op::kTuple3: {
      const size_t n = code - op::kTuple1 + 1;
      if (stack_.size() - Floor() < n) return Malformed("stack underflow");
      return MakeTuple(stack_.size() - n);
    }
    case op::kTuple: {
      size_t start = 0;
      return PopMark(&start) && MakeTuple(start);
    }
    case op::kEmptyList: {
      lists_.emplace_back();
      Val v;
      v.tag = T::kList;
      v.x = lists_.size() - 1;
      return Push(v);
    }
    case op::kList: {
      size_t start = 0;
      if (!PopMark(&start)) return false;
      ListNode l;
      for (size_t i = start; i < stack_.size(); ++i) {
        if (!Grow(&l.depth, stack_[i])) return false;
        Adopt(stack_[i]);
        l.items.push_back(stack_[i]);
      }
      stack_.resize(start);
      lists_.push_back(std::move(l));
      Val v;
      v.tag = T::kList;
      v.x = lists_.size() - 1;
      return Push(v);
    }
    case op::kAppend: {
      if (stack_.size() <= Floor()) return Malformed("stack underflow");
      return Appends(stack_.size() - 1);
    }
    case op::kAppends: {
      size_t start = 0;
      return PopMark(&start) && Appends(start);
    }
    case op::kEmptyDict: {
      Val v;
      v.tag = T::kDict;
      v.x = NewDict();
      return Push(v);
    }
    case op::kDict: {
      size_t start = 0;
      if (!PopMark(&start)) return false;
      if ((stack_.size() - start) % 2 != 0) return Malformed("odd number of items for a dict");
      // The new dict goes below its items, which SetItems then moves in.
      Val v;
      v.tag = T::kDict;
      v.x = NewDict();
      if (++values_ > max_values_) return Malformed("too many values");
      stack_.insert(stack_.begin() + static_cast<std::ptrdiff_t>(start), v);
      return SetItems(start + 1);
    }
    case op::kSetItem: {
      if (stack_.size() - Floor() < 2) return Malformed("stack underflow");
      return SetItems(stack_.size() - 2);
    }
    case op::kSetItems: {
      size_t start = 0;
      return PopMark(&start) && SetItems(start);
    }
    case op::kMark:
      if (marks_.size() >= static_cast<size_t>(kMaxDepth)) return Malformed("too many open MARKs");
      marks_.push_back(stack_.size());
      return true;
    case op::kPop:
      if (stack_.size() > Floor()) {
        stack_.pop_back();
      } else if (!marks_.empty()) {
        marks_.pop_back();
      } else {
        return Malformed("stack underflow");
      }
      return true;
    case op::kPopMark: {
      size_t start = 0;
      if (!PopMark(&start)) return false;
      stack_.resize(start);
      return true;
    }
    case op::kDup: {
      if (!CheckTop()) return false;
      const Val top = stack_.back();
      stack_.push_back(top);
      return true;
    }
    case op::kGlobal: {
      std::string_view module, name;
      if (!ReadLine(&module) || !ReadLine(&name)) return false;
      return DoGlobal(module, name);
    }
    case op::kStackGlobal: {
      Val name, module;
      if (!Pop(&name) || !Pop(&module)) return false;
      if (module.tag != T::kStr || name.tag != T::kStr) {
        return Malformed("module and name must be str");
      }
      return DoGlobal(View(module), View(name));
    }
    case op::kReduce:
      return DoReduce();
    case op::kNewObj:
      return DoNewObj();
    case op::kBuild:
      return DoBuild();
    case op::kBinPut:
    case op::kLongBinPut: {
      uint64_t i = 0;
      return ReadLE(code == op::kBinPut ? 1 : 4, &i) && MemoPut(i);
    }
    case op::kPut: {
      std::string_view line;
      int64_t i = 0;
      if (!ReadLine(&line) || !ParseDecimal(line, &i)) return false;
      if (i < 0) return Malformed("negative memo index");
      return MemoPut(static_cast<uint64_t>(i));
    }
    case op::kMemoize:
      return MemoPut(memo_count_);
    case op::kBinGet:
    case op::kLongBinGet: {
      uint64_t i = 0;
      return ReadLE(code == op::kBinGet ? 1 : 4, &i) && MemoGet(i);
    }
    case op::kGet: {
      std::string_view line;
      int64_t i = 0;
      if (!ReadLine(&line) || !ParseDecimal(line, &i)) return false;
      if (i < 0) return Malformed("negative memo index");
      return MemoGet(static_cast<uint64_t>(i));
    }
    default:
      // Sets, persistent ids, NEWOBJ_EX, extensions, protocol-0 text and unknown bytes: the tree
      // path decides.
      return Unhandled("opcode 0x" + Hex(code));
  }
}

bool Decoder::Finish() {
  if (!marks_.empty()) return Malformed("STOP with an open MARK");
  if (stack_.size() != 1) return Malformed("STOP without exactly one value on the stack");
  if (pos_ != data_.size()) return Malformed("trailing bytes after STOP");
  stopped_ = true;
  return Assemble(stack_[0], &result_);
}

std::optional<std::map<std::string, ObjectPath>> Decoder::Planner(const Val& v, bool* ok) {
  *ok = true;
  if (v.tag != T::kDict) return std::nullopt;
  const DictNode& d = dicts_[v.x];
  if (d.dead) {
    *ok = Unhandled("a field dict used twice");
    return std::nullopt;
  }
  std::map<std::string, ObjectPath> out;
  for (size_t i = 0; i + 1 < d.items.size(); i += 2) {
    const Val& k = d.items[i];
    const Val& path = d.items[i + 1];
    if (k.tag != T::kStr) return std::nullopt;
    if (path.tag != T::kIntTuple && path.tag != T::kTuple && path.tag != T::kList) {
      return std::nullopt;
    }
    // Charged as the tree interpretation charges: the entry and its key, then part by part.
    const auto context = [] { return std::string("metadata: planner_data"); };
    if (!Charge(kCostEntry + CostStr(k.n), context)) {
      *ok = false;
      return std::nullopt;
    }
    ObjectPath p;
    bool charged = true;
    auto part = [&](const Val& x) {
      if (x.tag == T::kStr) {
        charged = Charge(kCostPathPart + x.n, context);
        if (!charged) return false;
        p.emplace_back(std::string(View(x)));
      } else if (x.tag == T::kInt) {
        charged = Charge(kCostPathPart, context);
        if (!charged) return false;
        p.emplace_back(static_cast<int64_t>(x.x));
      } else {
        return false;
      }
      return true;
    };
    if (path.tag == T::kIntTuple) {
      if (!Charge(kCostPathPart * path.n, context)) {
        *ok = false;
        return std::nullopt;
      }
      p.reserve(path.n);
      for (uint32_t j = 0; j < path.n; ++j) p.emplace_back(ints_[path.x + j]);
    } else if (path.tag == T::kTuple) {
      for (uint32_t j = 0; j < path.n; ++j) {
        if (!part(items_[path.x + j])) {
          *ok = charged;
          return std::nullopt;
        }
      }
    } else {
      for (const Val& x : lists_[path.x].items) {
        if (!part(x)) {
          *ok = charged;
          return std::nullopt;
        }
      }
    }
    // The first of duplicate keys stays (std::map::emplace), as in the tree interpretation.
    std::string key(View(k));
    if (out.empty() || std::prev(out.end())->first < key) {
      out.emplace_hint(out.end(), std::move(key), std::move(p));
    } else {
      out.emplace(std::move(key), std::move(p));
    }
  }
  return out;
}

bool Decoder::Assemble(const Val& root, Metadata* md) {
  if (!IsBuilt(root, Cls::kMetadata)) return Unhandled("a result that is not a built Metadata");
  Val state;
  state.tag = T::kDict;
  state.x = objs_[root.x].rec;
  static constexpr std::string_view kNames[] = {"state_dict_metadata", "planner_data",
                                                "storage_data", "storage_meta", "version"};
  Val f[5];
  if (!Fields(state, kNames, f)) return false;

  // state_dict_metadata
  if (f[0].tag != T::kDict || dicts_[f[0].x].dead) {
    return Unhandled("state_dict_metadata of another kind");
  }
  const DictNode& sdm = dicts_[f[0].x];
  for (size_t i = 0; i + 1 < sdm.items.size(); i += 2) {
    const Val& k = sdm.items[i];
    const Val& v = sdm.items[i + 1];
    if (k.tag != T::kStr) return Unhandled("a state dict key that is not a str");
    const std::string_view fqn = View(k);
    const auto context = [fqn] { return "metadata: key \"" + std::string(fqn) + "\""; };
    if (md->state_dict_metadata.Find(fqn)) return Unhandled("a duplicate key");
    if (!Charge(kCostEntry + CostStr(fqn.size()), context)) return false;
    StorageMetadata& entry = md->state_dict_metadata[std::string(fqn)];
    if (v.tag != T::kObj) return Unhandled("storage metadata of another kind");
    const ObjNode& o = objs_[v.x];
    if (o.cls == Cls::kBytes) continue;  // the entry is BytesStorageMetadata already
    if (o.cls != Cls::kTensor || !o.built) return Unhandled("storage metadata of another kind");
    const TensorRec& tr = tensors_[o.rec];
    TensorStorageMetadata t;
    if (tr.props != kDefaultProps) {
      const PropsRec& p = props_[tr.props];
      t.properties.dtype = p.dtype;
      t.properties.requires_grad = p.requires_grad;
      t.properties.memory_format = p.memory_format;
      t.properties.pin_memory = p.pin_memory;
      if (p.has_strides) {
        if (!Charge(CostShape(p.strides.n), context)) return false;
        t.properties.strides = MakeShape(p.strides);
      }
    }
    if (!Charge(CostShape(tr.size.n) + ChunksCost(tr.chunks), context)) return false;
    t.size = MakeShape(tr.size);
    const std::vector<Val>& chunks = lists_[tr.chunks].items;
    t.chunks.reserve(chunks.size());
    for (const Val& c : chunks) {
      const ChunkRec& cr = chunks_[objs_[c.x].rec];
      t.chunks.push_back(ChunkBox{MakeShape(cr.offsets), MakeShape(cr.sizes)});
    }
    entry = std::move(t);
  }

  // planner_data
  if (f[1].tag != T::kNone) {
    bool ok = true;
    md->planner_data = Planner(f[1], &ok);
    if (!ok) return false;
  }

  // storage_data
  if (f[2].tag != T::kNone) {
    if (f[2].tag != T::kDict || dicts_[f[2].x].dead)
      return Unhandled("storage_data of another kind");
    const DictNode& sd = dicts_[f[2].x];
    for (size_t i = 0; i + 1 < sd.items.size(); i += 2) {
      const Val& k = sd.items[i];
      const Val& v = sd.items[i + 1];
      if (!IsBuilt(k, Cls::kIndex) || !IsBuilt(v, Cls::kInfo)) {
        return Unhandled("a storage entry of another kind");
      }
      const IndexRec& ir = indexes_[objs_[k.x].rec];
      const InfoRec& fr = infos_[objs_[v.x].rec];
      uint64_t cost = kCostEntry + CostStr(ir.fqn.size()) + CostStr(fr.path.size());
      if (ir.has_offset) cost += CostShape(ir.offset.n);
      const Val& td = fr.descriptors;
      if (td.tag == T::kTuple) {
        for (uint32_t j = 0; j < td.n; ++j) cost += CostStr(items_[td.x + j].n);
      } else if (td.tag == T::kList) {
        // A shared list is summed at each reference, but only as far as the budget reaches.
        for (const Val& x : lists_[td.x].items) {
          cost += CostStr(x.n);
          if (cost > budget_.left()) break;
        }
      }
      if (!Charge(cost, [&] { return "metadata: storage of \"" + std::string(ir.fqn) + "\""; })) {
        return false;
      }
      MetadataIndex idx;
      idx.fqn = std::string(ir.fqn);
      if (ir.has_offset) idx.offset = MakeShape(ir.offset);
      if (ir.has_index) idx.index = ir.index;
      StorageInfo info;
      info.relative_path = std::string(fr.path);
      info.offset = fr.offset;
      info.length = fr.length;
      if (td.tag == T::kTuple) {
        for (uint32_t j = 0; j < td.n; ++j) {
          info.transform_descriptors.emplace_back(View(items_[td.x + j]));
        }
      } else if (td.tag == T::kList) {
        for (const Val& x : lists_[td.x].items) info.transform_descriptors.emplace_back(View(x));
      }
      // A repeated key keeps its first index hint and takes the later value (map operator[]).
      auto& storage = md->storage_data;
      if (storage.empty() || std::prev(storage.end())->first < idx) {
        storage.emplace_hint(storage.end(), std::move(idx), std::move(info));
      } else {
        storage[idx] = std::move(info);
      }
    }
  }

  // storage_meta
  if (f[3].tag != T::kNone) {
    if (!IsBuilt(f[3], Cls::kStorageMeta)) return Unhandled("storage_meta of another kind");
    const StorageMetaRec& r = smetas_[objs_[f[3].x].rec];
    StorageMeta m;
    const auto context = [] { return std::string("metadata: storage_meta"); };
    for (auto [val, dst] : {std::pair{&r.checkpoint_id, &m.checkpoint_id},
                            std::pair{&r.save_id, &m.save_id}, std::pair{&r.load_id, &m.load_id}}) {
      if (val->tag == T::kStr) {
        if (!Charge(CostStr(val->n), context)) return false;
        *dst = std::string(View(*val));
      }
    }
    if (r.checkpoint_id.tag == T::kPath) {
      std::string path;
      if (!PathString(r.checkpoint_id, &path)) return false;
      m.checkpoint_id = std::move(path);
    }
    if (r.modules.tag == T::kList) {
      for (const Val& x : lists_[r.modules.x].items) {
        if (!Charge(CostStr(x.n), context)) return false;
        m.modules.emplace_back(View(x));
      }
    }
    md->storage_meta = std::move(m);
  }

  // version
  if (f[4].tag != T::kNone) {
    if (f[4].tag != T::kStr) return Unhandled("a version that is not a str");
    if (!Charge(CostStr(f[4].n), [] { return std::string("metadata: version"); })) return false;
    md->version = std::string(View(f[4]));
  }
  return true;
}

// ---------------------------------------------------------------- comparison

std::string OptText(const std::optional<std::string>& s) { return s ? "\"" + *s + "\"" : "None"; }

}  // namespace

Result<Metadata> DecodeMetadataDirect(std::string_view pickle_bytes) {
  return Decoder(pickle_bytes, DecodeBudget::For(pickle_bytes.size())).Run();
}

Result<Metadata> DecodeMetadataDirect(std::string_view pickle_bytes, uint64_t budget) {
  return Decoder(pickle_bytes, budget).Run();
}

uint64_t DecodedCost(const Metadata& md) {
  uint64_t cost = 0;
  for (const auto& [fqn, m] : md.state_dict_metadata) {
    cost += kCostEntry + CostStr(fqn.size());
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    if (t->properties.strides) cost += CostShape(t->properties.strides->size());
    cost += CostShape(t->size.size());
    for (const ChunkBox& c : t->chunks) cost += CostChunk(c.offsets.size(), c.sizes.size());
  }
  if (md.planner_data) {
    for (const auto& [fqn, path] : *md.planner_data) {
      cost += kCostEntry + CostStr(fqn.size());
      for (const auto& part : path) {
        const auto* s = std::get_if<std::string>(&part);
        cost += kCostPathPart + (s ? s->size() : 0);
      }
    }
  }
  for (const auto& [idx, info] : md.storage_data) {
    cost += kCostEntry + CostStr(idx.fqn.size()) + CostStr(info.relative_path.size());
    if (idx.offset) cost += CostShape(idx.offset->size());
    for (const auto& d : info.transform_descriptors) cost += CostStr(d.size());
  }
  if (md.storage_meta) {
    for (const auto* s :
         {&md.storage_meta->checkpoint_id, &md.storage_meta->save_id, &md.storage_meta->load_id}) {
      if (*s) cost += CostStr((*s)->size());
    }
    for (const auto& m : md.storage_meta->modules) cost += CostStr(m.size());
  }
  if (md.version) cost += CostStr(md.version->size());
  return cost;
}

std::string MetadataDifference(const Metadata& a, const Metadata& b) {
  if (a.state_dict_metadata.size() != b.state_dict_metadata.size()) {
    return "state_dict_metadata has " + std::to_string(a.state_dict_metadata.size()) + " vs " +
           std::to_string(b.state_dict_metadata.size()) + " entries";
  }
  auto ib = b.state_dict_metadata.begin();
  for (const auto& [fqn, m] : a.state_dict_metadata) {
    const auto& [fqn_b, m_b] = *ib++;
    if (fqn != fqn_b) return "entry \"" + fqn + "\" vs \"" + fqn_b + "\"";
    if (m.index() != m_b.index()) return "\"" + fqn + "\": tensor vs bytes";
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    const auto& u = std::get<TensorStorageMetadata>(m_b);
    if (!(t->properties == u.properties)) return "\"" + fqn + "\": properties differ";
    if (t->size != u.size) {
      return "\"" + fqn + "\": size " + ShapeToString(t->size) + " vs " + ShapeToString(u.size);
    }
    if (t->chunks != u.chunks) return "\"" + fqn + "\": chunks differ";
  }
  if (a.planner_data != b.planner_data) {
    if (a.planner_data.has_value() != b.planner_data.has_value()) {
      return std::string("planner_data ") + (a.planner_data ? "present" : "absent") + " vs " +
             (b.planner_data ? "present" : "absent");
    }
    return "planner_data differs";
  }
  if (a.storage_data.size() != b.storage_data.size()) {
    return "storage_data has " + std::to_string(a.storage_data.size()) + " vs " +
           std::to_string(b.storage_data.size()) + " entries";
  }
  auto jb = b.storage_data.begin();
  for (const auto& [k, v] : a.storage_data) {
    const auto& [kb, vb] = *jb++;
    if (!(k == kb) || k.index != kb.index) {
      return "storage key " + k.ToString() + " (index " +
             (k.index ? std::to_string(*k.index) : "None") + ") vs " + kb.ToString() + " (index " +
             (kb.index ? std::to_string(*kb.index) : "None") + ")";
    }
    if (!(v == vb)) return "storage of " + k.ToString() + " differs";
  }
  if (a.storage_meta.has_value() != b.storage_meta.has_value()) return "storage_meta presence";
  if (a.storage_meta) {
    const StorageMeta& x = *a.storage_meta;
    const StorageMeta& y = *b.storage_meta;
    if (x.checkpoint_id != y.checkpoint_id) {
      return "checkpoint_id " + OptText(x.checkpoint_id) + " vs " + OptText(y.checkpoint_id);
    }
    if (x.save_id != y.save_id || x.load_id != y.load_id) return "save_id or load_id differs";
    if (x.modules != y.modules) return "storage_meta.modules differs";
  }
  if (a.version != b.version) return "version " + OptText(a.version) + " vs " + OptText(b.version);
  return "";
}

}  // namespace dcpp::internal
