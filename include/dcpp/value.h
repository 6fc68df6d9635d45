// Value: the tree of a state dict or a torch.save payload, with tensors at the leaves.
//
// A Value is one of: None, bool, int (64-bit), float (double), str (UTF-8), bytes, list, tuple,
// dict (ordered; `is_ordered_dict` marks collections.OrderedDict), Tensor, ShardedTensor (this
// process's chunks of a global tensor), or Opaque (a Python object dcpp does not interpret, kept
// as the exact torch.save bytes that hold it so it can be written back unchanged).
//
// Values have value semantics (copying a Value copies the tree; tensors inside share storage).
// Dict keys are Values too (Python allows int keys); state dicts use str keys.
//
// Thread-safety: a value; concurrent const access is safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "dcpp/chunk.h"
#include "dcpp/tensor.h"

namespace dcpp {

// One local chunk of a sharded tensor: its place in the global tensor and its data.
struct Shard {
  Shape offsets;  // global offsets of the chunk
  Tensor tensor;  // the chunk's data; its shape is the chunk's sizes
  ChunkBox box() const { return {offsets, tensor.shape()}; }
};

// This process's part of a global tensor (like DTensor / ShardedTensor). `shards` may be empty
// (a rank that holds nothing of it).
struct ShardedTensor {
  DType dtype = DType::kFloat32;
  Shape global_shape;
  std::vector<Shard> shards;
};

// An object dcpp does not interpret: the torch.save archive bytes that hold it.
struct Opaque {
  std::string torch_save_bytes;
  std::string type_name;  // e.g. "builtins.set", for display only
};

class Value {
 public:
  enum class Kind : uint8_t {
    kNone,
    kBool,
    kInt,
    kFloat,
    kStr,
    kBytes,
    kList,
    kTuple,
    kDict,
    kTensor,
    kShardedTensor,
    kOpaque,
  };
  using List = std::vector<Value>;
  using Dict = std::vector<std::pair<Value, Value>>;

  Value() = default;  // None
  // Copies drop the key index (below); the copy builds its own when it needs one.
  Value(const Value& other)
      : kind_(other.kind_), ordered_dict_(other.ordered_dict_), data_(other.data_) {}
  Value& operator=(const Value& other) {
    if (this != &other) {
      auto data = other.data_;  // `other` may live inside this value
      kind_ = other.kind_;
      ordered_dict_ = other.ordered_dict_;
      data_ = std::move(data);
      index_.reset();
    }
    return *this;
  }
  Value(Value&&) noexcept = default;
  Value& operator=(Value&&) noexcept = default;
  ~Value() = default;
  static Value None() { return Value(); }
  static Value Bool(bool b) { return Value(Kind::kBool, b); }
  static Value Int(int64_t i) { return Value(Kind::kInt, i); }
  static Value Float(double d) { return Value(Kind::kFloat, d); }
  static Value Str(std::string s) { return Value(Kind::kStr, std::move(s)); }
  static Value Bytes(std::string b) { return Value(Kind::kBytes, std::move(b)); }
  static Value MakeList(List items = {}) { return Value(Kind::kList, std::move(items)); }
  static Value MakeTuple(List items = {}) { return Value(Kind::kTuple, std::move(items)); }
  static Value MakeDict(Dict items = {}, bool ordered_dict = false) {
    Value v(Kind::kDict, std::move(items));
    v.ordered_dict_ = ordered_dict;
    return v;
  }
  static Value FromTensor(Tensor t) { return Value(Kind::kTensor, std::move(t)); }
  static Value FromSharded(ShardedTensor t) { return Value(Kind::kShardedTensor, std::move(t)); }
  static Value FromOpaque(Opaque o) { return Value(Kind::kOpaque, std::move(o)); }

  Kind kind() const { return kind_; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_float() const { return kind_ == Kind::kFloat; }
  bool is_str() const { return kind_ == Kind::kStr; }
  bool is_bytes() const { return kind_ == Kind::kBytes; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_tuple() const { return kind_ == Kind::kTuple; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_tensor() const { return kind_ == Kind::kTensor; }
  bool is_sharded() const { return kind_ == Kind::kShardedTensor; }
  bool is_opaque() const { return kind_ == Kind::kOpaque; }
  bool is_ordered_dict() const { return kind_ == Kind::kDict && ordered_dict_; }

  // Unchecked accessors: the caller has checked kind(). (std::get throws on misuse.)
  bool as_bool() const { return std::get<bool>(data_); }
  int64_t as_int() const { return std::get<int64_t>(data_); }
  double as_float() const { return std::get<double>(data_); }
  const std::string& as_str() const { return std::get<std::string>(data_); }
  const std::string& as_bytes() const { return std::get<std::string>(data_); }
  const List& items() const { return std::get<List>(data_); }  // list or tuple
  List& items() { return std::get<List>(data_); }
  const Dict& dict() const { return std::get<Dict>(data_); }
  // Drops the key index: the caller may change keys through the reference.
  Dict& dict() {
    index_.reset();
    return std::get<Dict>(data_);
  }
  const Tensor& tensor() const { return std::get<Tensor>(data_); }
  Tensor& tensor() { return std::get<Tensor>(data_); }
  const ShardedTensor& sharded() const { return std::get<ShardedTensor>(data_); }
  ShardedTensor& sharded() { return std::get<ShardedTensor>(data_); }
  const Opaque& opaque() const { return std::get<Opaque>(data_); }

  // Dict helpers for str keys: nullptr when absent (the first entry when a key repeats). Set
  // replaces or appends. A dict of 16 or more entries keeps an index of its str keys, built by
  // Set or the non-const Find, so building a dict of n keys with Set costs O(n), not O(n^2);
  // the non-const dict() drops it. A reference that dict() returned must therefore not be used
  // to change keys after a later Set or non-const Find.
  const Value* Find(std::string_view key) const;
  Value* Find(std::string_view key);
  void Set(std::string key, Value value);

  // Python-like text: {'a': tensor(float32[2, 3]), 'b': [1, 2.5, 'x', None]}.
  std::string DebugString() const;

  // Structural equality; tensors by Tensor::BitwiseEqual, floats by bits.
  friend bool operator==(const Value& a, const Value& b);

 private:
  template <typename T>
  Value(Kind k, T&& v) : kind_(k), data_(std::forward<T>(v)) {}

  // Positions of a dict's str keys by hash (value.cc): positions, not views, since a key's
  // bytes move when the dict grows. It covers entries [0, covered) and is used only when that
  // is the whole dict.
  struct KeyIndex;
  struct KeyIndexDeleter {
    void operator()(KeyIndex* index) const;
  };
  void IndexKeys();

  Kind kind_ = Kind::kNone;
  bool ordered_dict_ = false;
  std::variant<std::monostate, bool, int64_t, double, std::string, List, Dict, Tensor,
               ShardedTensor, Opaque>
      data_;
  std::unique_ptr<KeyIndex, KeyIndexDeleter> index_;
};

std::string_view KindName(Value::Kind kind);  // "None", "bool", "int", ..., "Tensor"

}  // namespace dcpp
