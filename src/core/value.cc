#include "dcpp/value.h"

#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>

namespace dcpp {

std::string_view KindName(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kStr:
      return "str";
    case Value::Kind::kBytes:
      return "bytes";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kTuple:
      return "tuple";
    case Value::Kind::kDict:
      return "dict";
    case Value::Kind::kTensor:
      return "Tensor";
    case Value::Kind::kShardedTensor:
      return "ShardedTensor";
    case Value::Kind::kOpaque:
      return "object";
  }
  return "?";
}

// Open addressing over positions: slot = position + 1, 0 = empty; the table is at least twice
// the entries, a power of two.
struct Value::KeyIndex {
  std::vector<uint32_t> slots;
  size_t covered = 0;
};

void Value::KeyIndexDeleter::operator()(KeyIndex* index) const { delete index; }

namespace {

constexpr size_t kIndexFrom = 16;

size_t KeyHash(std::string_view key) { return std::hash<std::string_view>{}(key); }

// The first position holding `key`, or -1.
int64_t Lookup(const std::vector<uint32_t>& slots, const Value::Dict& d, std::string_view key) {
  const size_t mask = slots.size() - 1;
  for (size_t i = KeyHash(key) & mask;; i = (i + 1) & mask) {
    const uint32_t slot = slots[i];
    if (slot == 0) return -1;
    const Value& k = d[slot - 1].first;
    if (k.as_str() == key) return slot - 1;
  }
}

// Adds position `pos` unless its key (a str) is there already (the first entry wins).
void Insert(std::vector<uint32_t>& slots, const Value::Dict& d, size_t pos) {
  const Value& k = d[pos].first;
  if (!k.is_str()) return;
  const size_t mask = slots.size() - 1;
  for (size_t i = KeyHash(k.as_str()) & mask;; i = (i + 1) & mask) {
    if (slots[i] == 0) {
      slots[i] = static_cast<uint32_t>(pos + 1);
      return;
    }
    if (d[slots[i] - 1].first.as_str() == k.as_str()) return;
  }
}

}  // namespace

void Value::IndexKeys() {
  const Dict& d = std::get<Dict>(data_);
  if (d.size() < kIndexFrom || d.size() >= UINT32_MAX) return;
  if (index_ && index_->covered == d.size() && 2 * d.size() <= index_->slots.size()) return;
  if (!index_ || index_->covered > d.size()) index_.reset(new KeyIndex);
  KeyIndex& x = *index_;
  if (2 * d.size() > x.slots.size()) {
    // Grow (x4) and index everything again.
    x.slots.assign(std::bit_ceil(4 * d.size()), 0);
    x.covered = 0;
  }
  for (; x.covered < d.size(); ++x.covered) Insert(x.slots, d, x.covered);
}

const Value* Value::Find(std::string_view key) const {
  if (!is_dict()) return nullptr;
  const Dict& d = std::get<Dict>(data_);
  if (index_ && index_->covered == d.size()) {
    const int64_t pos = Lookup(index_->slots, d, key);
    return pos < 0 ? nullptr : &d[pos].second;
  }
  for (const auto& [k, v] : d) {
    if (k.is_str() && k.as_str() == key) return &v;
  }
  return nullptr;
}

Value* Value::Find(std::string_view key) {
  if (!is_dict()) return nullptr;
  IndexKeys();
  return const_cast<Value*>(static_cast<const Value*>(this)->Find(key));
}

void Value::Set(std::string key, Value value) {
  if (Value* v = Find(key)) {
    *v = std::move(value);
    return;
  }
  Dict& d = std::get<Dict>(data_);  // not dict(): the index stays
  d.emplace_back(Value::Str(std::move(key)), std::move(value));
  if (index_ && index_->covered + 1 == d.size() && 2 * d.size() <= index_->slots.size()) {
    Insert(index_->slots, d, d.size() - 1);
    ++index_->covered;
  }
}

namespace {

void QuoteString(std::ostream& os, const std::string& s, char prefix) {
  if (prefix) os << prefix;
  os << '\'';
  for (unsigned char c : s) {
    if (c == '\'' || c == '\\') {
      os << '\\' << c;
    } else if (c >= 0x20 && c < 0x7f) {
      os << c;
    } else if (prefix == 0 && c >= 0x80) {
      os << c;  // UTF-8 in str is shown as is
    } else {
      static const char* kHex = "0123456789abcdef";
      os << "\\x" << kHex[c >> 4] << kHex[c & 15];
    }
  }
  os << '\'';
}

void Print(std::ostream& os, const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNone:
      os << "None";
      return;
    case Value::Kind::kBool:
      os << (v.as_bool() ? "True" : "False");
      return;
    case Value::Kind::kInt:
      os << v.as_int();
      return;
    case Value::Kind::kFloat: {
      std::ostringstream f;
      f.precision(17);
      f << v.as_float();
      os << f.str();
      return;
    }
    case Value::Kind::kStr:
      QuoteString(os, v.as_str(), 0);
      return;
    case Value::Kind::kBytes:
      QuoteString(os, v.as_bytes(), 'b');
      return;
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const bool list = v.is_list();
      os << (list ? '[' : '(');
      for (size_t i = 0; i < v.items().size(); ++i) {
        if (i) os << ", ";
        Print(os, v.items()[i]);
      }
      if (!list && v.items().size() == 1) os << ',';
      os << (list ? ']' : ')');
      return;
    }
    case Value::Kind::kDict: {
      if (v.is_ordered_dict()) os << "OrderedDict(";
      os << '{';
      bool first = true;
      for (const auto& [k, x] : v.dict()) {
        if (!first) os << ", ";
        first = false;
        Print(os, k);
        os << ": ";
        Print(os, x);
      }
      os << '}';
      if (v.is_ordered_dict()) os << ')';
      return;
    }
    case Value::Kind::kTensor:
      os << "tensor(" << DTypeName(v.tensor().dtype()) << ShapeToString(v.tensor().shape()) << ')';
      return;
    case Value::Kind::kShardedTensor:
      os << "sharded(" << DTypeName(v.sharded().dtype) << ShapeToString(v.sharded().global_shape)
         << ", " << v.sharded().shards.size() << " local chunks)";
      return;
    case Value::Kind::kOpaque:
      os << "<object " << v.opaque().type_name << '>';
      return;
  }
}

}  // namespace

std::string Value::DebugString() const {
  std::ostringstream os;
  Print(os, *this);
  return os.str();
}

bool operator==(const Value& a, const Value& b) {
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kBool:
      return a.as_bool() == b.as_bool();
    case Value::Kind::kInt:
      return a.as_int() == b.as_int();
    case Value::Kind::kFloat: {
      double x = a.as_float(), y = b.as_float();
      return std::memcmp(&x, &y, sizeof x) == 0;
    }
    case Value::Kind::kStr:
    case Value::Kind::kBytes:
      return a.as_str() == b.as_str();
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      return a.items() == b.items();
    case Value::Kind::kDict:
      return a.is_ordered_dict() == b.is_ordered_dict() && a.dict() == b.dict();
    case Value::Kind::kTensor:
      return a.tensor().BitwiseEqual(b.tensor());
    case Value::Kind::kShardedTensor: {
      const auto& x = a.sharded();
      const auto& y = b.sharded();
      if (x.dtype != y.dtype || x.global_shape != y.global_shape ||
          x.shards.size() != y.shards.size()) {
        return false;
      }
      for (size_t i = 0; i < x.shards.size(); ++i) {
        if (x.shards[i].offsets != y.shards[i].offsets ||
            !x.shards[i].tensor.BitwiseEqual(y.shards[i].tensor)) {
          return false;
        }
      }
      return true;
    }
    case Value::Kind::kOpaque:
      return a.opaque().torch_save_bytes == b.opaque().torch_save_bytes;
  }
  return false;
}

}  // namespace dcpp
