// A safe pickle reader and a small pickle writer, for the pickles PyTorch checkpoints contain
// (torch.save's `data.pkl`, DCP's `.metadata`).
//
// The reader never runs anything. It turns the opcode stream (protocols 2-5, plus the binary and
// MARK-based opcodes of protocols 0-1) into a tree of PickleValue nodes. Python constructs that
// would execute code are kept symbolically:
//   GLOBAL / STACK_GLOBAL       -> kGlobal{module, name}, only if the allow-list accepts it;
//   REDUCE f(args) / NEWOBJ     -> kObject{callable, args, newobj}; a later BUILD stores `state`,
//                                  APPEND(S)/SETITEM(S) on it fill `list_items` / `dict_items`
//                                  (e.g. OrderedDict's items);
//   BINPERSID / PERSID          -> kPersistentId{id}.
// A few calls that only rebuild plain data are resolved while reading: `_codecs.encode(s,
// 'latin1')`, `builtins.bytes()` and `builtins.bytearray(b)` become kBytes (protocol-2 bytes),
// `builtins.set(list)` / `builtins.frozenset(list)` become kSet, and `copyreg.__newobj__(cls,
// *args)` becomes the NEWOBJ form. Higher layers (torch_save, metadata) interpret the rest.
// Memo entries share nodes, so a BUILD on a memoized object is seen through every reference, as
// in Python. The result is a DAG, never a cycle: a value may only be modified (APPEND, SETITEM,
// BUILD, ...) before it becomes part of another value, which is how every acyclic Python object
// is pickled; self-referencing pickles are refused. Dict items keep duplicate keys in order (the
// last one wins, as in Python; see FindStrKey).
//
// Bounds: every length is checked against the remaining input before allocation; depth, memo
// size and node count are limited (PickleReadOptions). Malformed input gives DataLoss with the byte
// offset of the failing opcode; a global that the allow-list refuses gives InvalidArgument naming
// "module.name"; opcodes outside the supported subset (out-of-band buffers, extension registry,
// protocol-0 INST/OBJ and text strings) give Unimplemented.
//
// The writer emits a PickleValue tree with protocol 2 (what torch.save uses for data.pkl) or
// protocol 4 (framed, as Python's default pickler for `.metadata`); both load in any Python 3.
// Opcode choices follow CPython's C pickler (integer widths, batches of 1000, memo of every
// str/bytes/container/object, frames of at least 64 KiB except the last), so plain trees
// usually come out byte-identical to `pickle.dumps`. Nodes shared within the tree are written
// once and referenced through the memo, so output size is linear in the number of distinct nodes.
// See docs/format.md ("Pickle").
//
// Thread-safety: functions are reentrant; PickleValue trees are not synchronized.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "dcpp/status.h"

namespace dcpp {

class PickleValue;
using PickleRef = std::shared_ptr<PickleValue>;

class PickleValue {
 public:
  enum class Kind : uint8_t {
    kNone,
    kBool,
    kInt,
    kFloat,
    kStr,
    kBytes,
    kTuple,
    kList,
    kDict,
    kSet,  // set and frozenset
    kGlobal,
    kObject,
    kPersistentId,
  };
  struct Global {
    std::string module;
    std::string name;
    std::string FullName() const { return module + "." + name; }
  };
  struct Object {
    PickleRef callable;   // usually a kGlobal
    PickleRef args;       // a kTuple
    bool newobj = false;  // made by NEWOBJ/NEWOBJ_EX (cls.__new__) rather than REDUCE
    PickleRef state;      // from BUILD, or null
    std::vector<PickleRef> list_items;
    std::vector<std::pair<PickleRef, PickleRef>> dict_items;
    PickleRef kwargs;  // NEWOBJ_EX keyword arguments (a kDict), or null
  };
  using Items = std::vector<PickleRef>;
  using DictItems = std::vector<std::pair<PickleRef, PickleRef>>;

  static PickleRef None();
  static PickleRef Bool(bool b);
  static PickleRef Int(int64_t i);
  static PickleRef Float(double d);
  static PickleRef Str(std::string s);
  static PickleRef Bytes(std::string b);
  static PickleRef Tuple(Items items = {});
  static PickleRef List(Items items = {});
  static PickleRef Dict(DictItems items = {});
  static PickleRef Set(Items items = {});
  static PickleRef MakeGlobal(std::string module, std::string name);
  // REDUCE form: callable(*args).
  static PickleRef Call(PickleRef callable, PickleRef args, PickleRef state = nullptr);
  // NEWOBJ form: cls.__new__(cls, *args), then BUILD(state) if state is set.
  static PickleRef New(PickleRef cls, PickleRef args, PickleRef state = nullptr);
  static PickleRef PersistentId(PickleRef id);

  Kind kind() const { return kind_; }
  bool is(Kind k) const { return kind_ == k; }

  // Unchecked accessors (std::get throws on misuse).
  bool as_bool() const { return std::get<bool>(data_); }
  int64_t as_int() const { return std::get<int64_t>(data_); }
  double as_float() const { return std::get<double>(data_); }
  const std::string& as_str() const { return std::get<std::string>(data_); }  // str or bytes
  const Items& items() const { return std::get<Items>(data_); }               // tuple, list, set
  Items& items() { return std::get<Items>(data_); }
  const DictItems& dict_items() const { return std::get<DictItems>(data_); }
  DictItems& dict_items() { return std::get<DictItems>(data_); }
  const Global& global() const { return std::get<Global>(data_); }
  const Object& object() const { return std::get<Object>(data_); }
  Object& object() { return std::get<Object>(data_); }
  const PickleRef& persistent_id() const { return std::get<PickleRef>(data_); }

  // Checked accessors for untrusted trees: DataLoss naming the expected and actual kind.
  Result<int64_t> GetInt() const;
  Result<bool> GetBool() const;
  Result<double> GetFloat() const;            // accepts int too
  Result<std::string_view> GetStr() const;    // kStr only
  Result<std::string_view> GetBytes() const;  // kBytes only
  Result<const Items*> GetTuple() const;
  Result<const Items*> GetList() const;
  // kDict, or an OrderedDict object (`collections.OrderedDict()` with SETITEMS): its items.
  Result<const DictItems*> GetDict() const;
  // The object's callable is the global module.name (e.g. IsCallOf("torch", "Size")).
  bool IsCallOf(std::string_view module, std::string_view name) const;
  // For kDict, or a kObject with dict_items (OrderedDict): value of a str key, or nullptr. With
  // duplicate keys the last one wins, as in Python.
  const PickleValue* FindStrKey(std::string_view key) const;

  // Python-like repr for messages and `dcpp inspect`; nested depth, items per container, string
  // and bytes lengths and total size are capped (long bytes print as `b'...' (123456 bytes)`).
  // Objects print as `callable(args)`, followed by ` items=[...]`, ` items={...}` and
  // ` state=...` when present; persistent ids as `persid(id)`.
  std::string DebugString(int max_depth = 8) const;

  template <typename T>
  PickleValue(Kind k, T&& v) : kind_(k), data_(std::forward<T>(v)) {}
  explicit PickleValue(Kind k) : kind_(k) {}

 private:
  Kind kind_;
  std::variant<std::monostate, bool, int64_t, double, std::string, Items, DictItems, Global, Object,
               PickleRef>
      data_;
};

std::string_view PickleKindName(PickleValue::Kind kind);

// The set of globals a reader may resolve. Entries are "module.name" (the split is at the last
// dot of module, e.g. "torch._utils._rebuild_tensor_v2" = module "torch._utils", name
// "_rebuild_tensor_v2").
class PickleAllowList {
 public:
  PickleAllowList() = default;
  PickleAllowList(std::initializer_list<std::string_view> full_names);

  // What torch.save tensor payloads need (weights_only-like): _rebuild_tensor_v2/v3,
  // _rebuild_parameter, every <T>Storage and UntypedStorage, torch.<dtype>, torch.Size,
  // collections.OrderedDict, torch.serialization._get_layout, builtins set/frozenset/
  // bytearray/slice/complex, _codecs.encode (protocol 2 bytes), copyreg._reconstructor.
  static PickleAllowList TorchSave();
  // TorchSave() plus the DCP metadata classes of every known path (torch.distributed.checkpoint.
  // metadata.*, the 1.13 torch.distributed._shard.checkpoint.* and sharded_tensor paths,
  // filesystem._StorageInfo, enum forms, builtins.getattr, pathlib paths, copyreg.__newobj__).
  static PickleAllowList DcpMetadata();

  void Add(std::string_view module, std::string_view name);
  bool Allows(std::string_view module, std::string_view name) const;

 private:
  std::set<std::string, std::less<>> names_;  // "module\nname"
};

struct PickleReadOptions {
  const PickleAllowList* allow = nullptr;  // null: PickleAllowList::TorchSave()
  // Nesting: a scalar counts 1, a container or object 1 + its deepest child. Also bounds the
  // number of open MARKs.
  int max_depth = 1000;
  // Memo entries and values created in total; 0 scales the limit with the input. Each entry
  // and each value costs at least one opcode byte, so a limit of the input's size never refuses
  // a valid pickle (a checkpoint of 60 000 tensors memoizes far more than a fixed 2^20 allows)
  // while memory stays linear in the input.
  size_t max_memo = 0;
  size_t max_nodes = 0;
};

// Parses one pickle (up to and including STOP). Trailing bytes after STOP are an error.
Result<PickleRef> ReadPickle(std::string_view data, const PickleReadOptions& options = {});

struct PickleWriteOptions {
  int protocol = 2;      // 2 or 4
  int max_depth = 1000;  // nesting limit (same measure as PickleReadOptions::max_depth)
};

// Emits pickle opcodes straight into a byte string, making the choices WritePickle makes
// (CPython's C pickler: integer widths, a memo entry for every str, container and object,
// globals and their names memoized by value, frames of at least 64 KiB), for encoders that know
// their structure and need no PickleValue tree (the `.metadata` encoder). Output equals
// WritePickle's for the equivalent tree when the caller follows its order: Boundary() before
// every value (CPython commits a full frame there), Memoize() after every value CPython
// memoizes (Str, TupleEnd, EmptyList and EmptyDict do it themselves), ListItems/DictItems for
// the items of a real list or dict. Errors (a protocol-2 global with a newline, a str too long
// for protocol 2) are kept and returned by Finish(). Thread-safety: one emitter per thread.
class PickleEmitter {
 public:
  // `protocol` must be 2 or 4 (WritePickle checks it before constructing one).
  explicit PickleEmitter(int protocol);

  int protocol() const { return protocol_; }
  bool proto4() const { return protocol_ >= 4; }
  void Reserve(size_t bytes) {
    if (bytes > out_.size()) out_.resize(bytes);
  }
  size_t size() const { return len_; }

  // CPython's save() checks before each value, atoms included, whether the frame is full.
  void Boundary() {
    if (framing_ && frame_start_ != std::string::npos &&
        len_ - frame_start_ - kFrameHeaderSize >= kFrameSizeTarget) {
      CommitFrame();
    }
  }

  void None();
  void Bool(bool b);
  void Int(int64_t v);
  void Float(double d);
  // A str object: its bytes and its memo entry.
  void Str(std::string_view s) {
    StrBody(s);
    Memoize();
  }
  void StrBody(std::string_view s);
  // A str CPython shares by identity (global names, 'latin1'): memoized by value.
  void SharedStr(std::string_view s);
  // The global module.name (STACK_GLOBAL in protocol 4, GLOBAL in 2), memoized by value. With
  // `slot`, the call site caches the memo index (-1 until the first write), skipping the lookup.
  void Global(std::string_view module, std::string_view name);
  // A global the caller writes once in this pickle: memoized as Global does, but kept out of the
  // lookup table (the same bytes; a later Global of it would write it again instead of a GET).
  void GlobalOnce(std::string_view module, std::string_view name);
  void Global(std::string_view module, std::string_view name, int64_t* slot) {
    if (*slot >= 0) return MemoGet(static_cast<uint64_t>(*slot));
    Global(module, name);
    *slot = static_cast<int64_t>(last_global_);
  }

  void EmptyTuple();  // not memoized, as in CPython
  void Mark();
  // Closes a tuple of n >= 1 items (TUPLE1-3; TUPLE after a Mark() the caller wrote for n > 3)
  // and memoizes it.
  void TupleEnd(size_t n);
  void EmptyList();  // and its memo entry
  void EmptyDict();  // and its memo entry
  void Append();
  void Appends();
  void SetItem();
  void SetItems();
  void NewObj();
  void Reduce();
  void Build();

  // CPython's batch_list_exact / batch_dict_exact for n items; `item(i)` (`pair(i)`) writes
  // item i (key i and value i) and returns a Status that stops the loop when not OK.
  template <typename F>
  Status ListItems(size_t n, F&& item) {
    if (n == 1) {
      DCPP_RETURN_IF_ERROR(item(size_t{0}));
      Append();
      return Status::Ok();
    }
    for (size_t i = 0; i < n; i += kBatchSize) {
      Mark();
      for (size_t j = i; j < std::min(n, i + kBatchSize); ++j) DCPP_RETURN_IF_ERROR(item(j));
      Appends();
    }
    return Status::Ok();
  }
  template <typename F>
  Status DictItems(size_t n, F&& pair) {
    if (n == 1) {
      DCPP_RETURN_IF_ERROR(pair(size_t{0}));
      SetItem();
      return Status::Ok();
    }
    if (n == 0) return Status::Ok();
    // Unlike lists, CPython loops while the last batch was full, so a multiple of 1000 ends
    // with an empty MARK SETITEMS.
    size_t i = 0;
    size_t k = 0;
    do {
      Mark();
      for (k = 0; k < kBatchSize && i < n; ++k, ++i) DCPP_RETURN_IF_ERROR(pair(i));
      SetItems();
    } while (k == kBatchSize);
    return Status::Ok();
  }

  // Lower level, for writers of other value kinds.
  void Op(uint8_t code) { *Room(1) = static_cast<char>(code); }
  void OpLE(uint8_t code, uint64_t v, size_t width);
  // A length-prefixed payload; large ones go outside frames, as CPython writes them.
  void Payload(uint8_t code, size_t width, std::string_view payload);
  // Adds the value just written to the memo; returns its index.
  uint64_t Memoize();
  void MemoGet(uint64_t index);
  void Fail(Status s) {
    if (status_.ok()) status_ = std::move(s);
  }
  const Status& status() const { return status_; }

  // STOP, the last frame closed; the bytes, or the first error.
  Result<std::string> Finish();

  static constexpr size_t kBatchSize = 1000;             // CPython's APPENDS/SETITEMS batch
  static constexpr size_t kFrameSizeTarget = 64 * 1024;  // CPython's _FRAME_SIZE_TARGET

 private:
  static constexpr size_t kFrameSizeMin = 4;     // smaller frames get no FRAME header
  static constexpr size_t kFrameHeaderSize = 9;  // FRAME + u64 length

  // Room for n more bytes at the end of the output; returns where they go. A frame is opened
  // lazily by the first write after a commit. The output grows in steps and is written through
  // a pointer: metadata of 20 000 items is ~2 million writes of 1-9 bytes, which cost a call to
  // std::string::append and memcpy each.
  char* Room(size_t n) {
    if (framing_ && frame_start_ == std::string::npos) {
      frame_start_ = len_;
      std::memset(Room(kFrameHeaderSize), 0, kFrameHeaderSize);
    }
    if (out_.size() - len_ < n) Grow(n);
    char* p = out_.data() + len_;
    len_ += n;
    return p;
  }
  void Grow(size_t n);
  void Write(std::string_view bytes) {
    if (!bytes.empty()) std::memcpy(Room(bytes.size()), bytes.data(), bytes.size());
  }
  void CommitFrame();

  int protocol_;
  std::string out_;  // [0, len_) written; the rest is room
  size_t len_ = 0;
  bool framing_ = false;
  size_t frame_start_ = std::string::npos;
  uint64_t memo_size_ = 0;
  uint64_t last_global_ = 0;
  std::map<std::string, uint64_t, std::less<>> str_memo_;
  std::map<std::string, uint64_t, std::less<>> global_memo_;  // "module\0name"
  Status status_;
};

// Serializes a tree. kObject nodes with newobj=false become `callable args REDUCE`, with
// newobj=true `cls args NEWOBJ`; then `state BUILD` if set, APPENDS/SETITEMS for items.
// Globals are memoized so repeated class references cost a BINGET. Protocol 2 writes bytes and
// sets as CPython does (`_codecs.encode` / `builtins.set` REDUCE); NEWOBJ_EX keyword arguments
// need protocol 4. InvalidArgument for trees that cannot be written (missing callable or args,
// non-tuple args, nesting beyond max_depth, newlines in a protocol-2 global name).
Result<std::string> WritePickle(const PickleValue& value, const PickleWriteOptions& options = {});

}  // namespace dcpp
