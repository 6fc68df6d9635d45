// The pickle subset PyTorch checkpoints use: a reader that never executes anything and a writer
// that mirrors CPython's C pickler. Byte layouts and the reasons behind each rule are in
// docs/format.md ("Pickle").
//
// Reading, step by step:
//   1. Each opcode is decoded at its offset; every length is compared with the bytes left
//      before anything is allocated.
//   2. Values go on a stack; MARK remembers a stack height, and opcodes that take "everything
//      since the last MARK" (TUPLE, APPENDS, SETITEMS, ...) only ever look above it.
//   3. Every new container records its depth (1 + deepest child) and whether it has been placed
//      inside another value. Modifying a value after that point is refused, which keeps the
//      result acyclic, so destruction, DebugString and WritePickle terminate.
//   4. Globals pass the allow-list when they are pushed; calls that merely rebuild plain data
//      (protocol-2 bytes and sets, copyreg.__newobj__) are resolved at REDUCE.
//   5. STOP must leave exactly one value, no open MARK and no trailing bytes.
#include "codec/pickle.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <unordered_map>

#include "codec/decode_budget.h"
#include "codec/pickle_opcodes.h"
#include "dcpp/dtype.h"

namespace dcpp {
namespace {

using Kind = PickleValue::Kind;
using Items = PickleValue::Items;
using DictItems = PickleValue::DictItems;

namespace op = internal::pickle_op;

// A copied PickleRef (one item of a set or an argument tuple), in budget units.
constexpr uint64_t kCostItems = 16;

struct OpInfo {
  uint8_t code;
  std::string_view name;
};
constexpr OpInfo kOpNames[] = {
    {op::kMark, "MARK"},
    {op::kStop, "STOP"},
    {op::kPop, "POP"},
    {op::kPopMark, "POP_MARK"},
    {op::kDup, "DUP"},
    {op::kFloat, "FLOAT"},
    {op::kInt, "INT"},
    {op::kBinInt, "BININT"},
    {op::kBinInt1, "BININT1"},
    {op::kLong, "LONG"},
    {op::kBinInt2, "BININT2"},
    {op::kNone, "NONE"},
    {op::kPersId, "PERSID"},
    {op::kBinPersId, "BINPERSID"},
    {op::kReduce, "REDUCE"},
    {op::kString, "STRING"},
    {op::kBinString, "BINSTRING"},
    {op::kShortBinString, "SHORT_BINSTRING"},
    {op::kUnicode, "UNICODE"},
    {op::kBinUnicode, "BINUNICODE"},
    {op::kAppend, "APPEND"},
    {op::kBuild, "BUILD"},
    {op::kGlobal, "GLOBAL"},
    {op::kDict, "DICT"},
    {op::kEmptyDict, "EMPTY_DICT"},
    {op::kAppends, "APPENDS"},
    {op::kGet, "GET"},
    {op::kBinGet, "BINGET"},
    {op::kInst, "INST"},
    {op::kLongBinGet, "LONG_BINGET"},
    {op::kList, "LIST"},
    {op::kEmptyList, "EMPTY_LIST"},
    {op::kObj, "OBJ"},
    {op::kPut, "PUT"},
    {op::kBinPut, "BINPUT"},
    {op::kLongBinPut, "LONG_BINPUT"},
    {op::kSetItem, "SETITEM"},
    {op::kTuple, "TUPLE"},
    {op::kEmptyTuple, "EMPTY_TUPLE"},
    {op::kSetItems, "SETITEMS"},
    {op::kBinFloat, "BINFLOAT"},
    {op::kProto, "PROTO"},
    {op::kNewObj, "NEWOBJ"},
    {op::kExt1, "EXT1"},
    {op::kExt2, "EXT2"},
    {op::kExt4, "EXT4"},
    {op::kTuple1, "TUPLE1"},
    {op::kTuple2, "TUPLE2"},
    {op::kTuple3, "TUPLE3"},
    {op::kNewTrue, "NEWTRUE"},
    {op::kNewFalse, "NEWFALSE"},
    {op::kLong1, "LONG1"},
    {op::kLong4, "LONG4"},
    {op::kBinBytes, "BINBYTES"},
    {op::kShortBinBytes, "SHORT_BINBYTES"},
    {op::kShortBinUnicode, "SHORT_BINUNICODE"},
    {op::kBinUnicode8, "BINUNICODE8"},
    {op::kBinBytes8, "BINBYTES8"},
    {op::kEmptySet, "EMPTY_SET"},
    {op::kAddItems, "ADDITEMS"},
    {op::kFrozenSet, "FROZENSET"},
    {op::kNewObjEx, "NEWOBJ_EX"},
    {op::kStackGlobal, "STACK_GLOBAL"},
    {op::kMemoize, "MEMOIZE"},
    {op::kFrame, "FRAME"},
    {op::kByteArray8, "BYTEARRAY8"},
    {op::kNextBuffer, "NEXT_BUFFER"},
    {op::kReadonlyBuffer, "READONLY_BUFFER"},
};

std::string_view OpName(uint8_t code) {
  for (const OpInfo& o : kOpNames) {
    if (o.code == code) return o.name;
  }
  return "";
}

constexpr int kHighestProtocol = 5;
constexpr size_t kBatchSize = 1000;  // CPython's APPENDS/SETITEMS/ADDITEMS batch

bool IsContainer(Kind k) {
  switch (k) {
    case Kind::kTuple:
    case Kind::kList:
    case Kind::kDict:
    case Kind::kSet:
    case Kind::kObject:
    case Kind::kPersistentId:
      return true;
    default:
      return false;
  }
}

using internal::pickle_op::Hex;
using internal::pickle_op::Py3Module;

// The inverse of Py3Module, for protocol-2 output.
std::string_view Py2Module(std::string_view module) {
  if (module == "builtins") return "__builtin__";
  if (module == "copyreg") return "copy_reg";
  return module;
}

// Latin-1 text (one code point per byte) <-> its UTF-8 encoding, for protocol-2 bytes.
std::string Latin1ToUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (unsigned char b : bytes) {
    if (b < 0x80) {
      out.push_back(static_cast<char>(b));
    } else {
      out.push_back(static_cast<char>(0xc0 | (b >> 6)));
      out.push_back(static_cast<char>(0x80 | (b & 0x3f)));
    }
  }
  return out;
}
bool Utf8ToLatin1(std::string_view text, std::string* out) {
  out->clear();
  out->reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    auto b = static_cast<unsigned char>(text[i]);
    if (b < 0x80) {
      out->push_back(static_cast<char>(b));
    } else if ((b == 0xc2 || b == 0xc3) && i + 1 < text.size() &&
               (static_cast<unsigned char>(text[i + 1]) & 0xc0) == 0x80) {
      out->push_back(
          static_cast<char>(((b & 0x03) << 6) | (static_cast<unsigned char>(text[i + 1]) & 0x3f)));
      ++i;
    } else {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------- reader

class Reader {
 public:
  Reader(std::string_view data, const PickleReadOptions& options, const PickleAllowList& allow)
      : data_(data), options_(options), allow_(allow), copies_(data.size()) {
    // One opcode byte at least per memo entry and per value: the input's size bounds both.
    const size_t scaled = data.size() + 16;
    if (options_.max_memo == 0) options_.max_memo = scaled;
    if (options_.max_nodes == 0) options_.max_nodes = scaled;
  }

  Result<PickleRef> Run();

 private:
  // Bookkeeping of a container the reader created.
  struct Info {
    size_t depth = 1;
    bool adopted = false;  // placed inside another value: no longer modifiable
  };
  // A value on the stack or in the memo, with its Info (null for scalars). Items inside a
  // container never need their Info again, so the tree itself stays plain PickleRefs.
  struct Slot {
    PickleRef value;
    Info* info = nullptr;
  };
  using Slots = std::vector<Slot>;

  // The calls resolved at REDUCE copy bytes or items out of values that may be memo-shared, so
  // what they copy is charged to a budget tied to the input's size first.
  Status Copy(uint64_t units, std::string_view what) {
    if (copies_.Take(units)) return Status::Ok();
    return Fail(std::string(what) + ": " + std::string(copies_.Exceeded().message()));
  }

  Status Fail(std::string_view message) const {
    std::string m = "pickle offset " + std::to_string(op_pos_);
    std::string_view name = OpName(op_);
    if (!name.empty()) m += " (" + std::string(name) + ")";
    return DataLossError(m + ": " + std::string(message));
  }
  Status Unsupported(std::string_view what) const {
    return UnimplementedError("pickle offset " + std::to_string(op_pos_) + ": " +
                              std::string(what) + " is not supported");
  }

  size_t Remaining() const { return data_.size() - pos_; }
  Result<std::string_view> ReadBytes(uint64_t n, std::string_view what) {
    if (n > Remaining()) {
      return Fail("truncated: " + std::string(what) + " needs " + std::to_string(n) + " bytes, " +
                  std::to_string(Remaining()) + " left");
    }
    std::string_view s = data_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  // Unsigned little-endian integer of `width` bytes.
  Result<uint64_t> ReadLE(size_t width, std::string_view what) {
    DCPP_ASSIGN_OR_RETURN(std::string_view s, ReadBytes(width, what));
    uint64_t v = 0;
    for (size_t i = 0; i < width; ++i) v |= uint64_t{static_cast<unsigned char>(s[i])} << (8 * i);
    return v;
  }
  Result<std::string_view> ReadLine() {
    size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) return Fail("truncated: unterminated text argument");
    std::string_view line = data_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return line;
  }
  // A byte string whose length prefix is `width` bytes (signed when `is_signed`).
  Result<std::string_view> ReadCounted(size_t width, bool is_signed) {
    DCPP_ASSIGN_OR_RETURN(uint64_t n, ReadLE(width, "length"));
    if (is_signed && width == 4 && (n & 0x80000000u)) {
      return Fail("negative length " + std::to_string(static_cast<int32_t>(n)));
    }
    return ReadBytes(n, "payload");
  }

  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  Result<Slot> Pop() {
    if (stack_.size() <= Floor()) return Fail("stack underflow");
    Slot v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  // The top slot; valid until the stack changes.
  Result<Slot*> Top() {
    if (stack_.size() <= Floor()) return Fail("stack underflow");
    return &stack_.back();
  }
  Result<Slots> PopN(size_t n) {
    if (stack_.size() - Floor() < n) return Fail("stack underflow");
    Slots items(std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)),
                std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    return items;
  }
  Result<Slots> PopMark() {
    if (marks_.empty()) return Fail("no MARK on the stack");
    size_t n = stack_.size() - marks_.back();
    marks_.pop_back();
    Slots items(std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)),
                std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    return items;
  }
  static Items Values(Slots&& slots) {
    Items items;
    items.reserve(slots.size());
    for (Slot& s : slots) items.push_back(std::move(s.value));
    return items;
  }

  Status Count() {
    if (++nodes_ > options_.max_nodes) {
      return Fail("more than " + std::to_string(options_.max_nodes) + " values (max_nodes)");
    }
    return Status::Ok();
  }
  Status PushNew(PickleRef v) {
    DCPP_RETURN_IF_ERROR(Count());
    stack_.push_back(Slot{std::move(v), nullptr});
    return Status::Ok();
  }
  Status CheckDepth(const Info& info) const {
    if (info.depth > static_cast<size_t>(std::max(options_.max_depth, 1))) {
      return Fail("values nested deeper than " + std::to_string(options_.max_depth) +
                  " (max_depth)");
    }
    return Status::Ok();
  }
  Status AddChild(Info& parent, const Slot& child) {
    size_t d = 1;
    if (child.info) {
      child.info->adopted = true;
      d = child.info->depth;
    }
    parent.depth = std::max(parent.depth, d + 1);
    return CheckDepth(parent);
  }
  // `target` is about to receive children: it must not be inside another value yet (which also
  // rules out cycles), and must not receive itself.
  Result<Info*> Modifiable(const Slot& target) {
    if (!target.info) return InternalError("pickle reader: container without bookkeeping");
    if (target.info->adopted) {
      return Fail("cannot modify a " + std::string(PickleKindName(target.value->kind())) +
                  " that is already part of another value (self-referencing pickles are not "
                  "supported)");
    }
    return target.info;
  }
  Status AddChildTo(const Slot& target, Info& info, const Slot& child) {
    if (child.value.get() == target.value.get()) return Fail("a value cannot contain itself");
    return AddChild(info, child);
  }

  // Pushes a new container whose children are `children` (already inside `node`), or whose
  // depth is known to be `depth` when the children's bookkeeping is gone.
  Status PushContainer(PickleRef node, const Slots& children, size_t depth = 1) {
    DCPP_RETURN_IF_ERROR(Count());
    Info& info = infos_.emplace_back();
    info.depth = depth;
    DCPP_RETURN_IF_ERROR(CheckDepth(info));
    for (const Slot& c : children) DCPP_RETURN_IF_ERROR(AddChild(info, c));
    stack_.push_back(Slot{std::move(node), &info});
    return Status::Ok();
  }
  Status PushSequence(Kind kind, Slots items) {
    DCPP_RETURN_IF_ERROR(Count());
    Info& info = infos_.emplace_back();
    for (const Slot& c : items) DCPP_RETURN_IF_ERROR(AddChild(info, c));
    Items values = Values(std::move(items));
    PickleRef v = kind == Kind::kTuple  ? PickleValue::Tuple(std::move(values))
                  : kind == Kind::kList ? PickleValue::List(std::move(values))
                                        : PickleValue::Set(std::move(values));
    stack_.push_back(Slot{std::move(v), &info});
    return Status::Ok();
  }

  Result<int64_t> DecodeLong(std::string_view bytes);
  Result<int64_t> ParseDecimal(std::string_view text);
  Status DoGlobal(std::string_view module, std::string_view name);
  Status DoAppends(Slots items);
  Status DoSetItems(Slots items);
  Status DoAddItems(Slots items);
  Status DoReduce(Slot callable, Slot args);
  Status DoNewObj(Slot cls, Slot args, const Slot* kwargs);
  Status DoBuild();
  Status MemoPut(uint64_t index);
  Status MemoGet(uint64_t index);
  Result<PickleRef> Finish();
  Status Step(uint8_t code);

  std::string_view data_;
  PickleReadOptions options_;  // a copy: the scaled limits are filled in
  const PickleAllowList& allow_;
  internal::DecodeBudget copies_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  uint8_t op_ = 0;
  int proto_ = 0;
  bool stopped_ = false;
  PickleRef result_;
  size_t nodes_ = 0;
  Slots stack_;
  std::vector<size_t> marks_;  // stack heights at each open MARK
  std::deque<Info> infos_;     // one per container; stable addresses
  // Memo: indices written in order (MEMOIZE, CPython's BINPUTs) live in memo_dense_; any others
  // in memo_sparse_, so a hostile LONG_BINPUT index costs one entry, not a huge vector.
  Slots memo_dense_;
  std::unordered_map<uint64_t, Slot> memo_sparse_;
  size_t memo_count_ = 0;
};

Result<int64_t> Reader::DecodeLong(std::string_view bytes) {
  size_t n = bytes.size();
  if (n == 0) return int64_t{0};
  auto byte = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  bool negative = (byte(n - 1) & 0x80) != 0;
  if (n > 8) {
    // Wider than int64 is fine only as sign extension of the low 8 bytes.
    unsigned char fill = negative ? 0xff : 0x00;
    for (size_t i = 8; i < n; ++i) {
      if (byte(i) != fill) return Fail("integer too large (" + std::to_string(n) + " bytes)");
    }
    if (((byte(7) & 0x80) != 0) != negative) {
      return Fail("integer too large (" + std::to_string(n) + " bytes)");
    }
    n = 8;
  }
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t{byte(i)} << (8 * i);
  if (negative && n < 8) v |= ~uint64_t{0} << (8 * n);
  return static_cast<int64_t>(v);
}

Result<int64_t> Reader::ParseDecimal(std::string_view text) {
  std::string_view t = text;
  if (!t.empty() && t.front() == '+') t.remove_prefix(1);
  int64_t v = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (ec == std::errc::result_out_of_range) return Fail("integer too large");
  if (ec != std::errc() || end != t.data() + t.size() || t.empty()) {
    return Fail("bad decimal integer \"" + std::string(text.substr(0, 32)) + "\"");
  }
  return v;
}

Status Reader::DoGlobal(std::string_view module, std::string_view name) {
  if (proto_ < 3) module = Py3Module(module);
  if (!allow_.Allows(module, name)) {
    return InvalidArgumentError("pickle global \"" + std::string(module) + "." + std::string(name) +
                                "\" is not allowed (at offset " + std::to_string(op_pos_) + ")");
  }
  return PushNew(PickleValue::MakeGlobal(std::string(module), std::string(name)));
}

Status Reader::DoAppends(Slots items) {
  DCPP_ASSIGN_OR_RETURN(Slot * target, Top());
  PickleValue& t = *target->value;
  Items* dest = nullptr;
  if (t.is(Kind::kList)) {
    dest = &t.items();
  } else if (t.is(Kind::kObject)) {
    dest = &t.object().list_items;
  } else {
    return Fail("cannot append to a " + std::string(PickleKindName(t.kind())));
  }
  DCPP_ASSIGN_OR_RETURN(Info * info, Modifiable(*target));
  for (const Slot& c : items) DCPP_RETURN_IF_ERROR(AddChildTo(*target, *info, c));
  for (Slot& c : items) dest->push_back(std::move(c.value));
  return Status::Ok();
}

Status Reader::DoSetItems(Slots items) {
  if (items.size() % 2 != 0) return Fail("odd number of items for a dict");
  DCPP_ASSIGN_OR_RETURN(Slot * target, Top());
  PickleValue& t = *target->value;
  DictItems* dest = nullptr;
  if (t.is(Kind::kDict)) {
    dest = &t.dict_items();
  } else if (t.is(Kind::kObject)) {
    dest = &t.object().dict_items;
  } else {
    return Fail("cannot set items on a " + std::string(PickleKindName(t.kind())));
  }
  DCPP_ASSIGN_OR_RETURN(Info * info, Modifiable(*target));
  for (const Slot& c : items) DCPP_RETURN_IF_ERROR(AddChildTo(*target, *info, c));
  for (size_t i = 0; i < items.size(); i += 2) {
    dest->emplace_back(std::move(items[i].value), std::move(items[i + 1].value));
  }
  return Status::Ok();
}

Status Reader::DoAddItems(Slots items) {
  DCPP_ASSIGN_OR_RETURN(Slot * target, Top());
  if (!target->value->is(Kind::kSet)) {
    return Fail("cannot add items to a " + std::string(PickleKindName(target->value->kind())));
  }
  DCPP_ASSIGN_OR_RETURN(Info * info, Modifiable(*target));
  for (const Slot& c : items) DCPP_RETURN_IF_ERROR(AddChildTo(*target, *info, c));
  Items& dest = target->value->items();
  for (Slot& c : items) dest.push_back(std::move(c.value));
  return Status::Ok();
}

bool IsGlobal(const PickleValue& v, std::string_view module, std::string_view name) {
  return v.is(Kind::kGlobal) && v.global().module == module && v.global().name == name;
}

Status Reader::DoReduce(Slot callable, Slot args) {
  const PickleValue& f = *callable.value;
  if (!f.is(Kind::kGlobal) && !f.is(Kind::kObject)) {
    return Fail("callable is a " + std::string(PickleKindName(f.kind())));
  }
  if (!args.value->is(Kind::kTuple)) {
    return Fail("arguments are a " + std::string(PickleKindName(args.value->kind())) +
                ", not a tuple");
  }
  const Items& a = args.value->items();
  // Calls that only rebuild plain data are resolved here (see the header). Their results hold
  // only values already inside `args`, so args' depth bounds theirs.
  if (IsGlobal(f, "_codecs", "encode")) {
    if (a.size() != 2 || !a[0]->is(Kind::kStr) || !a[1]->is(Kind::kStr) ||
        (a[1]->as_str() != "latin1" && a[1]->as_str() != "latin-1")) {
      return Fail("unsupported _codecs.encode call (expected (str, 'latin1'))");
    }
    DCPP_RETURN_IF_ERROR(Copy(internal::CostStr(a[0]->as_str().size()), "_codecs.encode"));
    std::string bytes;
    if (!Utf8ToLatin1(a[0]->as_str(), &bytes)) {
      return Fail("_codecs.encode: text is not latin-1");
    }
    return PushNew(PickleValue::Bytes(std::move(bytes)));
  }
  if ((IsGlobal(f, "builtins", "bytes") || IsGlobal(f, "builtins", "bytearray")) &&
      (a.empty() || (a.size() == 1 && a[0]->is(Kind::kBytes)))) {
    DCPP_RETURN_IF_ERROR(
        Copy(internal::CostStr(a.empty() ? 0 : a[0]->as_str().size()), "bytes or bytearray"));
    return PushNew(PickleValue::Bytes(a.empty() ? std::string() : a[0]->as_str()));
  }
  if ((IsGlobal(f, "builtins", "set") || IsGlobal(f, "builtins", "frozenset")) &&
      (a.empty() || (a.size() == 1 && a[0]->is(Kind::kList)))) {
    // The set holds the list's items: one level less than args = (list,).
    size_t depth = a.empty() ? 1 : args.info->depth - 1;
    DCPP_RETURN_IF_ERROR(Copy(kCostItems * (1 + (a.empty() ? 0 : a[0]->items().size())), "set"));
    return PushContainer(PickleValue::Set(a.empty() ? Items() : a[0]->items()), {}, depth);
  }
  if (IsGlobal(f, "copyreg", "__newobj__") && !a.empty()) {
    // cls and the remaining arguments come out of args, whose depth bounds theirs.
    Info& cls_info = infos_.emplace_back(Info{args.info->depth - 1, true});
    Info& rest_info = infos_.emplace_back(Info{args.info->depth, false});
    Slot cls{a[0], IsContainer(a[0]->kind()) ? &cls_info : nullptr};
    DCPP_RETURN_IF_ERROR(Count());
    DCPP_RETURN_IF_ERROR(Copy(kCostItems * a.size(), "copyreg.__newobj__"));
    Slot rest{PickleValue::Tuple(Items(a.begin() + 1, a.end())), &rest_info};
    return DoNewObj(std::move(cls), std::move(rest), nullptr);
  }
  return PushContainer(PickleValue::Call(callable.value, args.value), {callable, args});
}

Status Reader::DoNewObj(Slot cls, Slot args, const Slot* kwargs) {
  if (!cls.value->is(Kind::kGlobal) && !cls.value->is(Kind::kObject)) {
    return Fail("class is a " + std::string(PickleKindName(cls.value->kind())));
  }
  if (!args.value->is(Kind::kTuple)) {
    return Fail("arguments are a " + std::string(PickleKindName(args.value->kind())) +
                ", not a tuple");
  }
  if (kwargs && !kwargs->value->is(Kind::kDict)) {
    return Fail("keyword arguments are a " + std::string(PickleKindName(kwargs->value->kind())) +
                ", not a dict");
  }
  PickleRef obj = PickleValue::New(cls.value, args.value);
  Slots children = {cls, args};
  if (kwargs) {
    obj->object().kwargs = kwargs->value;
    children.push_back(*kwargs);
  }
  return PushContainer(std::move(obj), children);
}

Status Reader::DoBuild() {
  DCPP_ASSIGN_OR_RETURN(Slot state, Pop());
  DCPP_ASSIGN_OR_RETURN(Slot * target, Top());
  PickleValue& t = *target->value;
  if (!t.is(Kind::kObject)) {
    return Fail("cannot set state on a " + std::string(PickleKindName(t.kind())));
  }
  if (t.object().state) return Fail("object state is already set");
  DCPP_ASSIGN_OR_RETURN(Info * info, Modifiable(*target));
  DCPP_RETURN_IF_ERROR(AddChildTo(*target, *info, state));
  t.object().state = std::move(state.value);
  return Status::Ok();
}

Status Reader::MemoPut(uint64_t index) {
  DCPP_ASSIGN_OR_RETURN(Slot * top, Top());
  if (index < memo_dense_.size()) {
    memo_dense_[index] = *top;
    return Status::Ok();
  }
  if (auto it = memo_sparse_.find(index); it != memo_sparse_.end()) {
    it->second = *top;
    return Status::Ok();
  }
  if (memo_count_ >= options_.max_memo) {
    return Fail("more than " + std::to_string(options_.max_memo) + " memo entries (max_memo)");
  }
  ++memo_count_;
  if (index == memo_dense_.size()) {
    memo_dense_.push_back(*top);
  } else {
    memo_sparse_.emplace(index, *top);
  }
  return Status::Ok();
}

Status Reader::MemoGet(uint64_t index) {
  if (index < memo_dense_.size()) {
    stack_.push_back(memo_dense_[index]);
    return Status::Ok();
  }
  auto it = memo_sparse_.find(index);
  if (it == memo_sparse_.end()) return Fail("memo index " + std::to_string(index) + " is not set");
  stack_.push_back(it->second);
  return Status::Ok();
}

Result<PickleRef> Reader::Finish() {
  if (!marks_.empty()) return Fail("STOP with an open MARK");
  if (stack_.size() != 1) {
    return Fail("STOP with " + std::to_string(stack_.size()) + " values on the stack, expected 1");
  }
  if (pos_ != data_.size()) {
    return Fail(std::to_string(data_.size() - pos_) + " trailing bytes after STOP");
  }
  return std::move(stack_.back().value);
}

Status Reader::Step(uint8_t code) {
  switch (code) {
    case op::kProto: {
      DCPP_ASSIGN_OR_RETURN(uint64_t v, ReadLE(1, "protocol"));
      if (v > kHighestProtocol) return Fail("unsupported protocol " + std::to_string(v));
      proto_ = static_cast<int>(v);
      return Status::Ok();
    }
    case op::kFrame: {
      // Framing only groups opcodes for buffered reads; the length must still fit the input.
      DCPP_ASSIGN_OR_RETURN(uint64_t n, ReadLE(8, "frame length"));
      if (n > Remaining()) {
        return Fail("frame of " + std::to_string(n) + " bytes but only " +
                    std::to_string(Remaining()) + " left");
      }
      return Status::Ok();
    }
    case op::kStop: {
      DCPP_ASSIGN_OR_RETURN(result_, Finish());
      stopped_ = true;
      return Status::Ok();
    }
    case op::kNone:
      return PushNew(PickleValue::None());
    case op::kNewTrue:
      return PushNew(PickleValue::Bool(true));
    case op::kNewFalse:
      return PushNew(PickleValue::Bool(false));
    case op::kBinInt: {
      DCPP_ASSIGN_OR_RETURN(uint64_t v, ReadLE(4, "BININT"));
      return PushNew(PickleValue::Int(static_cast<int32_t>(static_cast<uint32_t>(v))));
    }
    case op::kBinInt1: {
      DCPP_ASSIGN_OR_RETURN(uint64_t v, ReadLE(1, "BININT1"));
      return PushNew(PickleValue::Int(static_cast<int64_t>(v)));
    }
    case op::kBinInt2: {
      DCPP_ASSIGN_OR_RETURN(uint64_t v, ReadLE(2, "BININT2"));
      return PushNew(PickleValue::Int(static_cast<int64_t>(v)));
    }
    case op::kLong1: {
      DCPP_ASSIGN_OR_RETURN(std::string_view b, ReadCounted(1, false));
      DCPP_ASSIGN_OR_RETURN(int64_t v, DecodeLong(b));
      return PushNew(PickleValue::Int(v));
    }
    case op::kLong4: {
      DCPP_ASSIGN_OR_RETURN(std::string_view b, ReadCounted(4, true));
      DCPP_ASSIGN_OR_RETURN(int64_t v, DecodeLong(b));
      return PushNew(PickleValue::Int(v));
    }
    case op::kInt: {
      DCPP_ASSIGN_OR_RETURN(std::string_view line, ReadLine());
      // Protocol 0 spells booleans as INT 01 / INT 00.
      if (line == "01") return PushNew(PickleValue::Bool(true));
      if (line == "00") return PushNew(PickleValue::Bool(false));
      DCPP_ASSIGN_OR_RETURN(int64_t v, ParseDecimal(line));
      return PushNew(PickleValue::Int(v));
    }
    case op::kLong: {
      DCPP_ASSIGN_OR_RETURN(std::string_view line, ReadLine());
      if (!line.empty() && line.back() == 'L') line.remove_suffix(1);
      DCPP_ASSIGN_OR_RETURN(int64_t v, ParseDecimal(line));
      return PushNew(PickleValue::Int(v));
    }
    case op::kFloat: {
      DCPP_ASSIGN_OR_RETURN(std::string_view line, ReadLine());
      double d = 0;
      auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), d);
      if (ec != std::errc() || end != line.data() + line.size() || line.empty()) {
        return Fail("bad float \"" + std::string(line.substr(0, 32)) + "\"");
      }
      return PushNew(PickleValue::Float(d));
    }
    case op::kBinFloat: {
      DCPP_ASSIGN_OR_RETURN(std::string_view b, ReadBytes(8, "BINFLOAT"));
      uint64_t bits = 0;
      for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<unsigned char>(b[i]);
      return PushNew(PickleValue::Float(std::bit_cast<double>(bits)));
    }
    case op::kShortBinUnicode:
    case op::kBinUnicode:
    case op::kBinUnicode8:
    case op::kShortBinString:
    case op::kBinString: {
      size_t width = (code == op::kShortBinUnicode || code == op::kShortBinString) ? 1
                     : code == op::kBinUnicode8                                    ? 8
                                                                                   : 4;
      DCPP_ASSIGN_OR_RETURN(std::string_view s, ReadCounted(width, code == op::kBinString));
      return PushNew(PickleValue::Str(std::string(s)));
    }
    case op::kShortBinBytes:
    case op::kBinBytes:
    case op::kBinBytes8:
    case op::kByteArray8: {
      size_t width = code == op::kShortBinBytes ? 1 : code == op::kBinBytes ? 4 : 8;
      DCPP_ASSIGN_OR_RETURN(std::string_view s, ReadCounted(width, false));
      return PushNew(PickleValue::Bytes(std::string(s)));
    }
    case op::kEmptyTuple:
      return PushSequence(Kind::kTuple, {});
    case op::kTuple1:
    case op::kTuple2:
    case op::kTuple3: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopN(code - op::kTuple1 + 1));
      return PushSequence(Kind::kTuple, std::move(items));
    }
    case op::kTuple: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      return PushSequence(Kind::kTuple, std::move(items));
    }
    case op::kEmptyList:
      return PushContainer(PickleValue::List(), {});
    case op::kList: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      return PushSequence(Kind::kList, std::move(items));
    }
    case op::kAppend: {
      DCPP_ASSIGN_OR_RETURN(Slot v, Pop());
      return DoAppends({std::move(v)});
    }
    case op::kAppends: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      return DoAppends(std::move(items));
    }
    case op::kEmptyDict:
      return PushContainer(PickleValue::Dict(), {});
    case op::kDict: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      if (items.size() % 2 != 0) return Fail("odd number of items for a dict");
      DCPP_RETURN_IF_ERROR(PushContainer(PickleValue::Dict(), {}));
      return DoSetItems(std::move(items));
    }
    case op::kSetItem: {
      DCPP_ASSIGN_OR_RETURN(Slots kv, PopN(2));
      return DoSetItems(std::move(kv));
    }
    case op::kSetItems: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      return DoSetItems(std::move(items));
    }
    case op::kEmptySet:
      return PushContainer(PickleValue::Set(), {});
    case op::kAddItems: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      return DoAddItems(std::move(items));
    }
    case op::kFrozenSet: {
      DCPP_ASSIGN_OR_RETURN(Slots items, PopMark());
      return PushSequence(Kind::kSet, std::move(items));
    }
    case op::kMark:
      if (marks_.size() >= static_cast<size_t>(std::max(options_.max_depth, 1))) {
        return Fail("more than " + std::to_string(options_.max_depth) + " open MARKs (max_depth)");
      }
      marks_.push_back(stack_.size());
      return Status::Ok();
    case op::kPop:
      // Like CPython: with nothing above the last MARK, POP discards the MARK itself.
      if (stack_.size() > Floor()) {
        stack_.pop_back();
      } else if (!marks_.empty()) {
        marks_.pop_back();
      } else {
        return Fail("stack underflow");
      }
      return Status::Ok();
    case op::kPopMark: {
      DCPP_ASSIGN_OR_RETURN(Slots discarded, PopMark());
      return Status::Ok();
    }
    case op::kDup: {
      DCPP_ASSIGN_OR_RETURN(Slot * top, Top());
      Slot copy = *top;
      stack_.push_back(std::move(copy));
      return Status::Ok();
    }
    case op::kGlobal: {
      DCPP_ASSIGN_OR_RETURN(std::string_view module, ReadLine());
      DCPP_ASSIGN_OR_RETURN(std::string_view name, ReadLine());
      return DoGlobal(module, name);
    }
    case op::kStackGlobal: {
      DCPP_ASSIGN_OR_RETURN(Slot name, Pop());
      DCPP_ASSIGN_OR_RETURN(Slot module, Pop());
      if (!module.value->is(Kind::kStr) || !name.value->is(Kind::kStr)) {
        return Fail("module and name must be str, got " +
                    std::string(PickleKindName(module.value->kind())) + " and " +
                    std::string(PickleKindName(name.value->kind())));
      }
      return DoGlobal(module.value->as_str(), name.value->as_str());
    }
    case op::kReduce: {
      DCPP_ASSIGN_OR_RETURN(Slot args, Pop());
      DCPP_ASSIGN_OR_RETURN(Slot callable, Pop());
      return DoReduce(std::move(callable), std::move(args));
    }
    case op::kNewObj: {
      DCPP_ASSIGN_OR_RETURN(Slot args, Pop());
      DCPP_ASSIGN_OR_RETURN(Slot cls, Pop());
      return DoNewObj(std::move(cls), std::move(args), nullptr);
    }
    case op::kNewObjEx: {
      DCPP_ASSIGN_OR_RETURN(Slot kwargs, Pop());
      DCPP_ASSIGN_OR_RETURN(Slot args, Pop());
      DCPP_ASSIGN_OR_RETURN(Slot cls, Pop());
      return DoNewObj(std::move(cls), std::move(args), &kwargs);
    }
    case op::kBuild:
      return DoBuild();
    case op::kBinPersId: {
      DCPP_ASSIGN_OR_RETURN(Slot id, Pop());
      PickleRef p = PickleValue::PersistentId(id.value);
      return PushContainer(std::move(p), {id});
    }
    case op::kPersId: {
      DCPP_ASSIGN_OR_RETURN(std::string_view line, ReadLine());
      DCPP_RETURN_IF_ERROR(Count());
      Slot id{PickleValue::Str(std::string(line)), nullptr};
      PickleRef p = PickleValue::PersistentId(id.value);
      return PushContainer(std::move(p), {id});
    }
    case op::kBinPut: {
      DCPP_ASSIGN_OR_RETURN(uint64_t i, ReadLE(1, "memo index"));
      return MemoPut(i);
    }
    case op::kLongBinPut: {
      DCPP_ASSIGN_OR_RETURN(uint64_t i, ReadLE(4, "memo index"));
      return MemoPut(i);
    }
    case op::kPut: {
      DCPP_ASSIGN_OR_RETURN(std::string_view line, ReadLine());
      DCPP_ASSIGN_OR_RETURN(int64_t i, ParseDecimal(line));
      if (i < 0) return Fail("negative memo index");
      return MemoPut(static_cast<uint64_t>(i));
    }
    case op::kMemoize:
      return MemoPut(memo_count_);  // Python: memo[len(memo)]
    case op::kBinGet: {
      DCPP_ASSIGN_OR_RETURN(uint64_t i, ReadLE(1, "memo index"));
      return MemoGet(i);
    }
    case op::kLongBinGet: {
      DCPP_ASSIGN_OR_RETURN(uint64_t i, ReadLE(4, "memo index"));
      return MemoGet(i);
    }
    case op::kGet: {
      DCPP_ASSIGN_OR_RETURN(std::string_view line, ReadLine());
      DCPP_ASSIGN_OR_RETURN(int64_t i, ParseDecimal(line));
      if (i < 0) return Fail("negative memo index");
      return MemoGet(static_cast<uint64_t>(i));
    }
    case op::kNextBuffer:
    case op::kReadonlyBuffer:
      return Unsupported("out-of-band buffer opcode " + std::string(OpName(code)));
    case op::kExt1:
    case op::kExt2:
    case op::kExt4:
    case op::kInst:
    case op::kObj:
    case op::kString:
    case op::kUnicode:
      return Unsupported("opcode " + std::string(OpName(code)));
    default:
      return Fail("unknown opcode 0x" + Hex(code));
  }
}

Result<PickleRef> Reader::Run() {
  while (!stopped_) {
    op_pos_ = pos_;
    if (pos_ >= data_.size()) {
      op_ = 0;
      return Fail("truncated: input ends before STOP");
    }
    op_ = static_cast<uint8_t>(data_[pos_++]);
    DCPP_RETURN_IF_ERROR(Step(op_));
  }
  return std::move(result_);
}

// ---------------------------------------------------------------- emitter

}  // namespace

PickleEmitter::PickleEmitter(int protocol) : protocol_(protocol) {
  const char header[2] = {static_cast<char>(op::kProto), static_cast<char>(protocol)};
  Write(std::string_view(header, 2));
  framing_ = protocol >= 4;
}

void PickleEmitter::OpLE(uint8_t code, uint64_t v, size_t width) {
  char buf[9];
  buf[0] = static_cast<char>(code);
  for (size_t i = 0; i < width; ++i) buf[1 + i] = static_cast<char>((v >> (8 * i)) & 0xff);
  Write(std::string_view(buf, 1 + width));
}

void PickleEmitter::Grow(size_t n) {
  out_.resize(std::max({len_ + n, out_.size() + out_.size() / 2, size_t{256}}));
}

void PickleEmitter::CommitFrame() {
  if (!framing_ || frame_start_ == std::string::npos) return;
  size_t len = len_ - frame_start_ - kFrameHeaderSize;
  if (len >= kFrameSizeMin) {
    out_[frame_start_] = static_cast<char>(op::kFrame);
    for (size_t i = 0; i < 8; ++i) {
      out_[frame_start_ + 1 + i] = static_cast<char>((uint64_t{len} >> (8 * i)) & 0xff);
    }
  } else {
    char* start = out_.data() + frame_start_;
    std::memmove(start, start + kFrameHeaderSize, len);
    len_ -= kFrameHeaderSize;
  }
  frame_start_ = std::string::npos;
}

void PickleEmitter::Payload(uint8_t code, size_t width, std::string_view payload) {
  bool bypass = framing_ && payload.size() >= kFrameSizeTarget;
  if (bypass) {
    CommitFrame();
    framing_ = false;
  }
  OpLE(code, payload.size(), width);
  Write(payload);
  if (bypass) framing_ = true;
}

uint64_t PickleEmitter::Memoize() {
  uint64_t index = memo_size_++;
  if (proto4()) {
    Op(op::kMemoize);
  } else if (index < 256) {
    OpLE(op::kBinPut, index, 1);
  } else {
    OpLE(op::kLongBinPut, index, 4);
  }
  return index;
}

void PickleEmitter::MemoGet(uint64_t index) {
  if (index < 256) {
    OpLE(op::kBinGet, index, 1);
  } else {
    OpLE(op::kLongBinGet, index, 4);
  }
}

void PickleEmitter::None() { Op(op::kNone); }
void PickleEmitter::Bool(bool b) { Op(b ? op::kNewTrue : op::kNewFalse); }

void PickleEmitter::Int(int64_t v) {
  if (v >= 0 && v <= 0xff) {
    OpLE(op::kBinInt1, static_cast<uint64_t>(v), 1);
  } else if (v >= 0 && v <= 0xffff) {
    OpLE(op::kBinInt2, static_cast<uint64_t>(v), 2);
  } else if (v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max()) {
    OpLE(op::kBinInt, static_cast<uint32_t>(static_cast<int32_t>(v)), 4);
  } else {
    // Shortest two's complement, little-endian.
    size_t n = 1;
    while (n < 8) {
      int64_t lo = -(int64_t{1} << (8 * n - 1));
      int64_t hi = (int64_t{1} << (8 * n - 1)) - 1;
      if (v >= lo && v <= hi) break;
      ++n;
    }
    char buf[10];
    buf[0] = static_cast<char>(op::kLong1);
    buf[1] = static_cast<char>(n);
    auto u = static_cast<uint64_t>(v);
    for (size_t i = 0; i < n; ++i) buf[2 + i] = static_cast<char>((u >> (8 * i)) & 0xff);
    Write(std::string_view(buf, 2 + n));
  }
}

void PickleEmitter::Float(double d) {
  auto bits = std::bit_cast<uint64_t>(d);
  char buf[9];
  buf[0] = static_cast<char>(op::kBinFloat);
  for (int i = 0; i < 8; ++i) buf[1 + i] = static_cast<char>((bits >> (56 - 8 * i)) & 0xff);
  Write(std::string_view(buf, 9));
}

void PickleEmitter::StrBody(std::string_view s) {
  if (proto4() && s.size() < 256) {
    Payload(op::kShortBinUnicode, 1, s);
  } else if (s.size() > 0xffffffffu) {
    if (!proto4()) return Fail(InvalidArgumentError("str too long for protocol 2"));
    Payload(op::kBinUnicode8, 8, s);
  } else {
    Payload(op::kBinUnicode, 4, s);
  }
}

void PickleEmitter::SharedStr(std::string_view s) {
  auto it = str_memo_.find(s);
  if (it != str_memo_.end()) return MemoGet(it->second);
  StrBody(s);
  str_memo_.emplace(std::string(s), memo_size_);
  Memoize();
}

void PickleEmitter::Global(std::string_view module, std::string_view name) {
  std::string key;
  key.reserve(module.size() + name.size() + 1);
  key.append(module).push_back('\0');
  key.append(name);
  auto it = global_memo_.find(key);
  if (it != global_memo_.end()) {
    last_global_ = it->second;
    return MemoGet(it->second);
  }
  GlobalOnce(module, name);
  if (status_.ok()) global_memo_.emplace(std::move(key), last_global_);
}

void PickleEmitter::GlobalOnce(std::string_view module, std::string_view name) {
  if (proto4()) {
    // CPython saves both names as values, so each one is an opcode boundary.
    Boundary();
    SharedStr(module);
    Boundary();
    SharedStr(name);
    Op(op::kStackGlobal);
  } else {
    std::string_view m = Py2Module(module);
    if (m.find('\n') != std::string_view::npos || name.find('\n') != std::string_view::npos) {
      return Fail(InvalidArgumentError("pickle global \"" + std::string(module) + "." +
                                       std::string(name) + "\" contains a newline"));
    }
    char* p = Room(m.size() + name.size() + 3);
    *p++ = static_cast<char>(op::kGlobal);
    p = std::copy(m.begin(), m.end(), p);
    *p++ = '\n';
    p = std::copy(name.begin(), name.end(), p);
    *p = '\n';
  }
  last_global_ = memo_size_;
  Memoize();
}

void PickleEmitter::EmptyTuple() { Op(op::kEmptyTuple); }
void PickleEmitter::Mark() { Op(op::kMark); }
void PickleEmitter::TupleEnd(size_t n) {
  Op(n > 3 ? op::kTuple : static_cast<uint8_t>(op::kTuple1 + n - 1));
  Memoize();
}
void PickleEmitter::EmptyList() {
  Op(op::kEmptyList);
  Memoize();
}
void PickleEmitter::EmptyDict() {
  Op(op::kEmptyDict);
  Memoize();
}
void PickleEmitter::Append() { Op(op::kAppend); }
void PickleEmitter::Appends() { Op(op::kAppends); }
void PickleEmitter::SetItem() { Op(op::kSetItem); }
void PickleEmitter::SetItems() { Op(op::kSetItems); }
void PickleEmitter::NewObj() { Op(op::kNewObj); }
void PickleEmitter::Reduce() { Op(op::kReduce); }
void PickleEmitter::Build() { Op(op::kBuild); }

Result<std::string> PickleEmitter::Finish() {
  if (!status_.ok()) return status_;
  Op(op::kStop);
  CommitFrame();
  out_.resize(len_);
  return std::move(out_);
}

namespace {

// ---------------------------------------------------------------- writer

// A PickleValue tree through the emitter. Nodes held by more than one reference are memoized by
// identity, so a shared node is written once.
class Writer {
 public:
  explicit Writer(const PickleWriteOptions& options) : options_(options), e_(options.protocol) {}

  Result<std::string> Run(const PickleValue& root) {
    DCPP_RETURN_IF_ERROR(Save(root, 1, /*shared=*/false));
    return e_.Finish();
  }

 private:
  bool Proto4() const { return e_.proto4(); }

  // `shared`: the node may be reached again (more than one reference), so remember its index.
  void MemoizeNode(const PickleValue& v, bool shared) {
    const uint64_t index = e_.Memoize();
    if (shared) node_memo_.emplace(&v, index);
  }

  // CPython's batch_list / batch_dict (items from an iterator, as for reduce's listitems and
  // dictitems): a batch holding a single item uses APPEND/SETITEM.
  Status WriteListItemsIter(const Items& items, int depth) {
    for (size_t i = 0; i < items.size(); i += kBatchSize) {
      size_t end = std::min(items.size(), i + kBatchSize);
      if (end - i == 1) {
        DCPP_RETURN_IF_ERROR(SaveRef(items[i], depth, "list item"));
        e_.Append();
        continue;
      }
      e_.Mark();
      for (size_t j = i; j < end; ++j) DCPP_RETURN_IF_ERROR(SaveRef(items[j], depth, "list item"));
      e_.Appends();
    }
    return Status::Ok();
  }
  Status WriteDictItemsIter(const DictItems& items, int depth) {
    for (size_t i = 0; i < items.size(); i += kBatchSize) {
      size_t end = std::min(items.size(), i + kBatchSize);
      if (end - i == 1) {
        DCPP_RETURN_IF_ERROR(SavePair(items[i], depth));
        e_.SetItem();
        continue;
      }
      e_.Mark();
      for (size_t j = i; j < end; ++j) DCPP_RETURN_IF_ERROR(SavePair(items[j], depth));
      e_.SetItems();
    }
    return Status::Ok();
  }
  Status WriteListItemsExact(const Items& items, int depth) {
    return e_.ListItems(items.size(),
                        [&](size_t i) { return SaveRef(items[i], depth, "list item"); });
  }
  Status SavePair(const std::pair<PickleRef, PickleRef>& kv, int depth) {
    DCPP_RETURN_IF_ERROR(SaveRef(kv.first, depth, "dict key"));
    return SaveRef(kv.second, depth, "dict value");
  }
  Status SaveRef(const PickleRef& v, int depth, std::string_view what) {
    if (!v) return InvalidArgumentError("null " + std::string(what) + " in pickle tree");
    // A node held by a single reference appears once in the tree: no memo lookup needed.
    return Save(*v, depth, v.use_count() > 1);
  }
  Status Global(const std::string& module, const std::string& name) {
    e_.Global(module, name);
    return e_.status();
  }

  Status SaveBytes(const PickleValue& v, bool shared) {
    const std::string& b = v.as_str();
    if (Proto4()) {
      if (b.size() < 256) {
        e_.Payload(op::kShortBinBytes, 1, b);
      } else if (b.size() > 0xffffffffu) {
        e_.Payload(op::kBinBytes8, 8, b);
      } else {
        e_.Payload(op::kBinBytes, 4, b);
      }
      MemoizeNode(v, shared);
      return Status::Ok();
    }
    // Protocol 2 has no bytes opcode: CPython writes bytes() or _codecs.encode(text, 'latin1').
    if (b.empty()) {
      DCPP_RETURN_IF_ERROR(Global("builtins", "bytes"));
      e_.EmptyTuple();
    } else {
      DCPP_RETURN_IF_ERROR(Global("_codecs", "encode"));
      std::string text = Latin1ToUtf8(b);
      if (text.size() > 0xffffffffu) {
        return InvalidArgumentError("bytes of " + std::to_string(b.size()) +
                                    " too long for protocol 2");
      }
      e_.StrBody(text);
      e_.Memoize();
      e_.SharedStr("latin1");
      e_.TupleEnd(2);
    }
    e_.Reduce();
    MemoizeNode(v, shared);
    return Status::Ok();
  }

  Status SaveSet(const PickleValue& v, int depth, bool shared) {
    const Items& items = v.items();
    if (Proto4()) {
      e_.Op(op::kEmptySet);
      MemoizeNode(v, shared);
      if (items.empty()) return Status::Ok();
      // CPython's save_set: batches of 1000 while the last batch was full (so a multiple of
      // 1000 ends with an empty MARK ADDITEMS).
      size_t i = 0;
      size_t n = 0;
      do {
        e_.Mark();
        for (n = 0; n < kBatchSize && i < items.size(); ++n, ++i) {
          DCPP_RETURN_IF_ERROR(SaveRef(items[i], depth, "set item"));
        }
        e_.Op(op::kAddItems);
      } while (n == kBatchSize);
      return Status::Ok();
    }
    // Protocol 2: builtins.set(list(items)).
    DCPP_RETURN_IF_ERROR(Global("builtins", "set"));
    e_.EmptyList();
    DCPP_RETURN_IF_ERROR(WriteListItemsExact(items, depth));
    e_.TupleEnd(1);
    e_.Reduce();
    MemoizeNode(v, shared);
    return Status::Ok();
  }

  Status SaveObject(const PickleValue& v, int depth, bool shared) {
    const PickleValue::Object& o = v.object();
    if (!o.callable) return InvalidArgumentError("pickle object without a callable");
    if (!o.args) return InvalidArgumentError("pickle object without arguments");
    if (!o.args->is(Kind::kTuple)) {
      return InvalidArgumentError("pickle object arguments are a " +
                                  std::string(PickleKindName(o.args->kind())) + ", not a tuple");
    }
    DCPP_RETURN_IF_ERROR(SaveRef(o.callable, depth, "callable"));
    DCPP_RETURN_IF_ERROR(SaveRef(o.args, depth, "arguments"));
    if (!o.kwargs) {
      if (o.newobj) {
        e_.NewObj();
      } else {
        e_.Reduce();
      }
    } else if (!o.newobj) {
      return InvalidArgumentError("keyword arguments need a NEWOBJ object");
    } else if (Proto4()) {
      DCPP_RETURN_IF_ERROR(SaveRef(o.kwargs, depth, "keyword arguments"));
      e_.Op(op::kNewObjEx);
    } else if (o.kwargs->is(Kind::kDict) && o.kwargs->dict_items().empty()) {
      e_.NewObj();  // cls.__new__(cls, *args, **{}) is plain NEWOBJ
    } else {
      return InvalidArgumentError("NEWOBJ_EX keyword arguments need pickle protocol 4");
    }
    MemoizeNode(v, shared);
    DCPP_RETURN_IF_ERROR(WriteListItemsIter(o.list_items, depth));
    DCPP_RETURN_IF_ERROR(WriteDictItemsIter(o.dict_items, depth));
    if (o.state) {
      DCPP_RETURN_IF_ERROR(SaveRef(o.state, depth, "state"));
      e_.Build();
    }
    return Status::Ok();
  }

  Status Save(const PickleValue& v, int depth, bool shared) {
    if (depth > options_.max_depth) {
      return InvalidArgumentError("pickle tree nested deeper than " +
                                  std::to_string(options_.max_depth) + " (max_depth)");
    }
    e_.Boundary();  // CPython's save() checks before each value, atoms included
    return SaveValue(v, depth, shared);
  }

  Status SaveValue(const PickleValue& v, int depth, bool shared) {
    if (shared) {
      if (auto it = node_memo_.find(&v); it != node_memo_.end()) {
        e_.MemoGet(it->second);
        return Status::Ok();
      }
    }
    switch (v.kind()) {
      case Kind::kNone:
        e_.None();
        return Status::Ok();
      case Kind::kBool:
        e_.Bool(v.as_bool());
        return Status::Ok();
      case Kind::kInt:
        e_.Int(v.as_int());
        return Status::Ok();
      case Kind::kFloat:
        e_.Float(v.as_float());
        return Status::Ok();
      case Kind::kStr:
        if (!Proto4() && v.as_str().size() > 0xffffffffu) {
          return InvalidArgumentError("str too long for protocol 2");
        }
        e_.StrBody(v.as_str());
        MemoizeNode(v, shared);
        return Status::Ok();
      case Kind::kBytes:
        return SaveBytes(v, shared);
      case Kind::kTuple: {
        const Items& items = v.items();
        if (items.empty()) {
          e_.EmptyTuple();  // CPython does not memoize ()
          return Status::Ok();
        }
        if (items.size() > 3) e_.Mark();
        for (const PickleRef& c : items) DCPP_RETURN_IF_ERROR(SaveRef(c, depth + 1, "tuple item"));
        e_.Op(items.size() > 3 ? op::kTuple : static_cast<uint8_t>(op::kTuple1 + items.size() - 1));
        MemoizeNode(v, shared);
        return Status::Ok();
      }
      case Kind::kList:
        e_.Op(op::kEmptyList);
        MemoizeNode(v, shared);
        return WriteListItemsExact(v.items(), depth + 1);
      case Kind::kDict: {
        e_.Op(op::kEmptyDict);
        MemoizeNode(v, shared);
        const DictItems& items = v.dict_items();
        return e_.DictItems(items.size(), [&](size_t i) { return SavePair(items[i], depth + 1); });
      }
      case Kind::kSet:
        return SaveSet(v, depth + 1, shared);
      case Kind::kGlobal:
        return Global(v.global().module, v.global().name);
      case Kind::kObject:
        return SaveObject(v, depth + 1, shared);
      case Kind::kPersistentId:
        DCPP_RETURN_IF_ERROR(SaveRef(v.persistent_id(), depth + 1, "persistent id"));
        e_.Op(op::kBinPersId);
        return Status::Ok();
    }
    return InternalError("unknown pickle value kind");
  }

  const PickleWriteOptions& options_;
  PickleEmitter e_;
  std::unordered_map<const PickleValue*, uint64_t> node_memo_;
};

// ---------------------------------------------------------------- repr

class Printer {
 public:
  explicit Printer(int max_depth) : max_depth_(max_depth) {}

  std::string Take() && { return std::move(out_); }

  void Print(const PickleValue& v, int depth) {
    if (Exhausted()) return;
    --budget_;
    switch (v.kind()) {
      case Kind::kNone:
        out_ += "None";
        return;
      case Kind::kBool:
        out_ += v.as_bool() ? "True" : "False";
        return;
      case Kind::kInt:
        out_ += std::to_string(v.as_int());
        return;
      case Kind::kFloat:
        PrintFloat(v.as_float());
        return;
      case Kind::kStr:
        PrintQuoted(v.as_str(), "", kMaxStr, " chars");
        return;
      case Kind::kBytes:
        PrintQuoted(v.as_str(), "b", kMaxBytes, " bytes");
        return;
      case Kind::kTuple: {
        const Items& items = v.items();
        PrintItems(items, "(", items.size() == 1 ? ",)" : ")", depth);
        return;
      }
      case Kind::kList:
        PrintItems(v.items(), "[", "]", depth);
        return;
      case Kind::kSet:
        if (v.items().empty()) {
          out_ += "set()";
        } else {
          PrintItems(v.items(), "{", "}", depth);
        }
        return;
      case Kind::kDict:
        PrintDict(v.dict_items(), depth);
        return;
      case Kind::kGlobal:
        out_ += v.global().FullName();
        return;
      case Kind::kPersistentId:
        out_ += "persid(";
        PrintRef(v.persistent_id(), depth + 1);
        out_ += ")";
        return;
      case Kind::kObject:
        PrintObject(v.object(), depth);
        return;
    }
  }

 private:
  static constexpr size_t kMaxStr = 200;
  static constexpr size_t kMaxBytes = 32;
  static constexpr size_t kMaxItems = 50;
  static constexpr size_t kMaxOutput = 64 * 1024;

  bool Exhausted() {
    if (budget_ > 0 && out_.size() < kMaxOutput) return false;
    if (!truncated_) out_ += "...";
    truncated_ = true;
    return true;
  }
  void PrintRef(const PickleRef& v, int depth) {
    if (!v) {
      out_ += "<null>";
    } else if (depth > max_depth_ && IsContainer(v->kind())) {
      out_ += "...";
    } else {
      Print(*v, depth);
    }
  }
  void PrintFloat(double d) {
    if (std::isnan(d)) {
      out_ += "nan";
    } else if (std::isinf(d)) {
      out_ += d > 0 ? "inf" : "-inf";
    } else {
      char buf[64];
      auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), d);
      std::string s(buf, ec == std::errc() ? end : buf);
      if (s.find_first_of(".e") == std::string::npos) s += ".0";
      out_ += s;
    }
  }
  void PrintQuoted(const std::string& s, std::string_view prefix, size_t max, const char* unit) {
    out_ += prefix;
    out_ += '\'';
    size_t n = std::min(s.size(), max);
    bool is_bytes = !prefix.empty();
    for (size_t i = 0; i < n; ++i) {
      auto c = static_cast<unsigned char>(s[i]);
      switch (c) {
        case '\\':
          out_ += "\\\\";
          break;
        case '\'':
          out_ += "\\'";
          break;
        case '\n':
          out_ += "\\n";
          break;
        case '\r':
          out_ += "\\r";
          break;
        case '\t':
          out_ += "\\t";
          break;
        default:
          if (c < 0x20 || c == 0x7f || (is_bytes && c >= 0x80)) {
            out_ += "\\x" + Hex(c);
          } else {
            out_ += static_cast<char>(c);
          }
      }
    }
    if (n < s.size()) out_ += "...";
    out_ += '\'';
    if (n < s.size()) out_ += " (" + std::to_string(s.size()) + unit + ")";
  }
  void PrintItems(const Items& items, const char* open, const char* close, int depth) {
    out_ += open;
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out_ += ", ";
      if (i == kMaxItems || Exhausted()) {
        out_ += "... (" + std::to_string(items.size()) + " items)";
        break;
      }
      PrintRef(items[i], depth + 1);
    }
    out_ += close;
  }
  void PrintDict(const DictItems& items, int depth) {
    out_ += "{";
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out_ += ", ";
      if (i == kMaxItems || Exhausted()) {
        out_ += "... (" + std::to_string(items.size()) + " items)";
        break;
      }
      PrintRef(items[i].first, depth + 1);
      out_ += ": ";
      PrintRef(items[i].second, depth + 1);
    }
    out_ += "}";
  }
  void PrintObject(const PickleValue::Object& o, int depth) {
    PrintRef(o.callable, depth + 1);
    out_ += "(";
    bool first = true;
    if (o.args && o.args->is(Kind::kTuple)) {
      const Items& a = o.args->items();
      for (size_t i = 0; i < a.size(); ++i) {
        if (!first) out_ += ", ";
        first = false;
        if (i == kMaxItems || Exhausted()) {
          out_ += "...";
          break;
        }
        PrintRef(a[i], depth + 1);
      }
    } else if (o.args) {
      out_ += "*";
      PrintRef(o.args, depth + 1);
      first = false;
    }
    if (o.kwargs) {
      if (!first) out_ += ", ";
      out_ += "**";
      PrintRef(o.kwargs, depth + 1);
    }
    out_ += ")";
    if (!o.list_items.empty()) {
      out_ += " items=";
      PrintItems(o.list_items, "[", "]", depth);
    }
    if (!o.dict_items.empty()) {
      out_ += " items=";
      PrintDict(o.dict_items, depth);
    }
    if (o.state) {
      out_ += " state=";
      PrintRef(o.state, depth + 1);
    }
  }

  int max_depth_;
  std::string out_;
  size_t budget_ = 20000;  // values printed; bounds time on heavily shared trees
  bool truncated_ = false;
};

std::string ShortRepr(const PickleValue& v) {
  std::string s = v.DebugString(2);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

Status WrongKind(const PickleValue& v, std::string_view expected) {
  return DataLossError("expected " + std::string(expected) + ", got " +
                       std::string(PickleKindName(v.kind())) + " " + ShortRepr(v));
}

void AddAll(PickleAllowList& list, std::string_view module,
            std::initializer_list<std::string_view> names) {
  for (std::string_view n : names) list.Add(module, n);
}

}  // namespace

// ---------------------------------------------------------------- PickleValue

PickleRef PickleValue::None() { return std::make_shared<PickleValue>(Kind::kNone); }
PickleRef PickleValue::Bool(bool b) { return std::make_shared<PickleValue>(Kind::kBool, b); }
PickleRef PickleValue::Int(int64_t i) { return std::make_shared<PickleValue>(Kind::kInt, i); }
PickleRef PickleValue::Float(double d) { return std::make_shared<PickleValue>(Kind::kFloat, d); }
PickleRef PickleValue::Str(std::string s) {
  return std::make_shared<PickleValue>(Kind::kStr, std::move(s));
}
PickleRef PickleValue::Bytes(std::string b) {
  return std::make_shared<PickleValue>(Kind::kBytes, std::move(b));
}
PickleRef PickleValue::Tuple(Items items) {
  return std::make_shared<PickleValue>(Kind::kTuple, std::move(items));
}
PickleRef PickleValue::List(Items items) {
  return std::make_shared<PickleValue>(Kind::kList, std::move(items));
}
PickleRef PickleValue::Dict(DictItems items) {
  return std::make_shared<PickleValue>(Kind::kDict, std::move(items));
}
PickleRef PickleValue::Set(Items items) {
  return std::make_shared<PickleValue>(Kind::kSet, std::move(items));
}
PickleRef PickleValue::MakeGlobal(std::string module, std::string name) {
  return std::make_shared<PickleValue>(Kind::kGlobal, Global{std::move(module), std::move(name)});
}
PickleRef PickleValue::Call(PickleRef callable, PickleRef args, PickleRef state) {
  Object o;
  o.callable = std::move(callable);
  o.args = args ? std::move(args) : Tuple();
  o.state = std::move(state);
  return std::make_shared<PickleValue>(Kind::kObject, std::move(o));
}
PickleRef PickleValue::New(PickleRef cls, PickleRef args, PickleRef state) {
  PickleRef v = Call(std::move(cls), std::move(args), std::move(state));
  v->object().newobj = true;
  return v;
}
PickleRef PickleValue::PersistentId(PickleRef id) {
  return std::make_shared<PickleValue>(Kind::kPersistentId, std::move(id));
}

Result<int64_t> PickleValue::GetInt() const {
  if (!is(Kind::kInt)) return WrongKind(*this, "int");
  return as_int();
}
Result<bool> PickleValue::GetBool() const {
  if (!is(Kind::kBool)) return WrongKind(*this, "bool");
  return as_bool();
}
Result<double> PickleValue::GetFloat() const {
  if (is(Kind::kInt)) return static_cast<double>(as_int());
  if (!is(Kind::kFloat)) return WrongKind(*this, "float");
  return as_float();
}
Result<std::string_view> PickleValue::GetStr() const {
  if (!is(Kind::kStr)) return WrongKind(*this, "str");
  return std::string_view(as_str());
}
Result<std::string_view> PickleValue::GetBytes() const {
  if (!is(Kind::kBytes)) return WrongKind(*this, "bytes");
  return std::string_view(as_str());
}
Result<const PickleValue::Items*> PickleValue::GetTuple() const {
  if (!is(Kind::kTuple)) return WrongKind(*this, "tuple");
  return &items();
}
Result<const PickleValue::Items*> PickleValue::GetList() const {
  if (!is(Kind::kList)) return WrongKind(*this, "list");
  return &items();
}
Result<const PickleValue::DictItems*> PickleValue::GetDict() const {
  if (is(Kind::kDict)) return &dict_items();
  if (IsCallOf("collections", "OrderedDict")) return &object().dict_items;
  return WrongKind(*this, "dict");
}

bool PickleValue::IsCallOf(std::string_view module, std::string_view name) const {
  if (!is(Kind::kObject)) return false;
  const PickleRef& c = object().callable;
  return c && IsGlobal(*c, module, name);
}

const PickleValue* PickleValue::FindStrKey(std::string_view key) const {
  const DictItems* d = nullptr;
  if (is(Kind::kDict)) {
    d = &dict_items();
  } else if (is(Kind::kObject)) {
    d = &object().dict_items;
  } else {
    return nullptr;
  }
  for (auto it = d->rbegin(); it != d->rend(); ++it) {
    if (it->first && it->first->is(Kind::kStr) && it->first->as_str() == key) {
      return it->second.get();
    }
  }
  return nullptr;
}

std::string PickleValue::DebugString(int max_depth) const {
  Printer p(max_depth);
  p.Print(*this, 1);
  return std::move(p).Take();
}

std::string_view PickleKindName(PickleValue::Kind kind) {
  switch (kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kStr:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kTuple:
      return "tuple";
    case Kind::kList:
      return "list";
    case Kind::kDict:
      return "dict";
    case Kind::kSet:
      return "set";
    case Kind::kGlobal:
      return "global";
    case Kind::kObject:
      return "object";
    case Kind::kPersistentId:
      return "persistent id";
  }
  return "unknown";
}

// ---------------------------------------------------------------- PickleAllowList

PickleAllowList::PickleAllowList(std::initializer_list<std::string_view> full_names) {
  for (std::string_view full : full_names) {
    size_t dot = full.rfind('.');
    if (dot == std::string_view::npos) {
      Add("", full);
    } else {
      Add(full.substr(0, dot), full.substr(dot + 1));
    }
  }
}

void PickleAllowList::Add(std::string_view module, std::string_view name) {
  std::string key;
  key.reserve(module.size() + name.size() + 1);
  key.append(module).append("\n").append(name);
  names_.insert(std::move(key));
}

bool PickleAllowList::Allows(std::string_view module, std::string_view name) const {
  std::string key;
  key.reserve(module.size() + name.size() + 1);
  key.append(module).append("\n").append(name);
  return names_.find(key) != names_.end();
}

PickleAllowList PickleAllowList::TorchSave() {
  PickleAllowList list;
  AddAll(list, "torch._utils",
         {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
          "_rebuild_parameter_with_state"});
  list.Add("torch.storage", "UntypedStorage");  // as PyTorch pickles it
  AddAll(list, "torch", {"UntypedStorage",
                         "DoubleStorage",
                         "FloatStorage",
                         "HalfStorage",
                         "LongStorage",
                         "IntStorage",
                         "ShortStorage",
                         "CharStorage",
                         "ByteStorage",
                         "BoolStorage",
                         "BFloat16Storage",
                         "ComplexDoubleStorage",
                         "ComplexFloatStorage",
                         "QInt8Storage",
                         "QInt32Storage",
                         "QUInt8Storage",
                         "QUInt4x2Storage",
                         "QUInt2x4Storage",
                         "Size",
                         "device"});
  for (int i = 0; i < kNumDTypes; ++i) list.Add("torch", DTypeName(static_cast<DType>(i)));
  // Dtypes dcpp does not model still appear as torch.<name> globals inside checkpoints.
  AddAll(list, "torch",
         {"qint8", "quint8", "qint32", "quint4x2", "quint2x4", "bits1x8", "bits2x4", "bits4x2",
          "bits8", "bits16", "uint1",  "uint2",    "uint3",    "uint4",   "uint5",   "uint6",
          "uint7", "int1",   "int2",   "int3",     "int4",     "int5",    "int6",    "int7"});
  list.Add("torch.serialization", "_get_layout");
  list.Add("collections", "OrderedDict");
  AddAll(list, "builtins", {"set", "frozenset", "bytearray", "bytes", "slice", "complex"});
  list.Add("_codecs", "encode");
  list.Add("copyreg", "_reconstructor");
  return list;
}

PickleAllowList PickleAllowList::DcpMetadata() {
  PickleAllowList list = TorchSave();
  for (std::string_view module :
       {"torch.distributed.checkpoint.metadata", "torch.distributed._shard.checkpoint.metadata"}) {
    AddAll(list, module,
           {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "StorageMeta", "MetadataIndex", "TensorProperties", "_MEM_FORMAT_ENCODING"});
  }
  list.Add("torch.distributed.checkpoint.filesystem", "_StorageInfo");
  list.Add("torch.distributed._shard.checkpoint.filesystem", "_StorageInfo");
  AddAll(list, "torch.distributed._shard.sharded_tensor.metadata",
         {"TensorProperties", "MEM_FORMAT_ENCODING"});
  AddAll(list, "builtins", {"getattr", "object"});
  AddAll(list, "pathlib", {"PosixPath", "PurePosixPath"});
  list.Add("pathlib._local", "PosixPath");
  AddAll(list, "copyreg", {"__newobj__", "_reconstructor"});
  return list;
}

// ---------------------------------------------------------------- entry points

Result<PickleRef> ReadPickle(std::string_view data, const PickleReadOptions& options) {
  if (options.allow) return Reader(data, options, *options.allow).Run();
  static const PickleAllowList* const kDefault = new PickleAllowList(PickleAllowList::TorchSave());
  return Reader(data, options, *kDefault).Run();
}

Result<std::string> WritePickle(const PickleValue& value, const PickleWriteOptions& options) {
  if (options.protocol != 2 && options.protocol != 4) {
    return InvalidArgumentError("pickle protocol " + std::to_string(options.protocol) +
                                " cannot be written (2 or 4)");
  }
  return Writer(options).Run(value);
}

}  // namespace dcpp
