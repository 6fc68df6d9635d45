#include "dcpp/value.h"

#include <cstring>
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

const Value* Value::Find(std::string_view key) const {
  if (!is_dict()) return nullptr;
  for (const auto& [k, v] : dict()) {
    if (k.is_str() && k.as_str() == key) return &v;
  }
  return nullptr;
}

Value* Value::Find(std::string_view key) {
  return const_cast<Value*>(static_cast<const Value*>(this)->Find(key));
}

void Value::Set(std::string key, Value value) {
  if (Value* v = Find(key)) {
    *v = std::move(value);
    return;
  }
  dict().emplace_back(Value::Str(std::move(key)), std::move(value));
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
