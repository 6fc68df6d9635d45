#include "dcpp/state_dict.h"

#include <string_view>
#include <unordered_set>

namespace dcpp {

std::string PathToFqn(const ObjectPath& path) {
  std::string out;
  for (size_t i = 0; i < path.size(); ++i) {
    if (i) out += '.';
    if (const auto* s = std::get_if<std::string>(&path[i])) {
      out += *s;
    } else {
      out += std::to_string(std::get<int64_t>(path[i]));
    }
  }
  return out;
}

std::string PathToString(const ObjectPath& path) {
  std::string out = "(";
  for (size_t i = 0; i < path.size(); ++i) {
    if (i) out += ", ";
    if (const auto* s = std::get_if<std::string>(&path[i])) {
      out += "'" + *s + "'";
    } else {
      out += std::to_string(std::get<int64_t>(path[i]));
    }
  }
  if (path.size() == 1) out += ",";
  return out + ")";
}

namespace {

// Python's str() of a dict key.
std::string KeyString(const Value& k) {
  switch (k.kind()) {
    case Value::Kind::kStr:
      return k.as_str();
    case Value::Kind::kInt:
      return std::to_string(k.as_int());
    case Value::Kind::kBool:
      return k.as_bool() ? "True" : "False";
    case Value::Kind::kNone:
      return "None";
    default:
      return k.DebugString();
  }
}

bool IsTensorLike(const Value& v) { return v.is_tensor() || v.is_sharded(); }

// PyTorch's _is_terminal: dicts are never terminal; lists are terminal unless they contain a
// tensor or a non-terminal container; everything else is terminal.
bool IsTerminal(const Value& v) {
  if (v.is_dict()) return false;
  if (!v.is_list()) return true;
  for (const Value& e : v.items()) {
    if ((e.is_dict() || e.is_list()) && !IsTerminal(e)) return false;
    if (IsTensorLike(e)) return false;
  }
  return true;
}

void Traverse(const Value& v, ObjectPath& path, std::vector<FlatEntry>& out) {
  if (v.is_dict()) {
    for (const auto& [k, x] : v.dict()) {
      path.emplace_back(KeyString(k));
      Traverse(x, path, out);
      path.pop_back();
    }
  } else if (IsTerminal(v)) {
    out.push_back({PathToFqn(path), path, &v});
  } else {  // a non-terminal list
    for (size_t i = 0; i < v.items().size(); ++i) {
      path.emplace_back(static_cast<int64_t>(i));
      Traverse(v.items()[i], path, out);
      path.pop_back();
    }
  }
}

}  // namespace

Result<std::vector<FlatEntry>> FlattenStateDict(const StateDict& state_dict) {
  if (!state_dict.is_dict()) {
    return InvalidArgumentError("a state dict must be a dict, not " +
                                std::string(KindName(state_dict.kind())));
  }
  std::vector<FlatEntry> out;
  ObjectPath path;
  Traverse(state_dict, path, out);
  // Views of the names in `out`, which no longer changes.
  std::unordered_set<std::string_view> seen;
  seen.reserve(out.size());
  for (const auto& e : out) {
    if (!seen.insert(e.fqn).second) {
      return InvalidArgumentError("two state dict entries flatten to the same key \"" + e.fqn +
                                  "\"");
    }
  }
  return out;
}

const Value* GetElement(const Value& root, const ObjectPath& path) {
  const Value* cur = &root;
  for (const auto& part : path) {
    if (const auto* key = std::get_if<std::string>(&part)) {
      if (!cur->is_dict()) return nullptr;
      const Value* next = nullptr;
      for (const auto& [k, x] : cur->dict()) {
        if (KeyString(k) == *key) {
          next = &x;
          break;
        }
      }
      if (!next) return nullptr;
      cur = next;
    } else {
      int64_t i = std::get<int64_t>(part);
      if (!(cur->is_list() || cur->is_tuple()) || i < 0 ||
          i >= static_cast<int64_t>(cur->items().size())) {
        return nullptr;
      }
      cur = &cur->items()[i];
    }
  }
  return cur;
}

Value* GetElement(Value& root, const ObjectPath& path) {
  return const_cast<Value*>(GetElement(static_cast<const Value&>(root), path));
}

Status SetElement(Value& root, const ObjectPath& path, Value value) {
  if (path.empty()) return InvalidArgumentError("empty path");
  Value* cur = &root;
  for (size_t i = 0; i < path.size(); ++i) {
    const bool last = i + 1 == path.size();
    // What the next container must be if we have to create it.
    auto fresh = [&]() -> Value {
      if (last) return std::move(value);
      return std::holds_alternative<std::string>(path[i + 1]) ? Value::MakeDict()
                                                              : Value::MakeList();
    };
    if (const auto* key = std::get_if<std::string>(&path[i])) {
      if (!cur->is_dict()) {
        return InvalidArgumentError("cannot set " + PathToString(path) + ": " +
                                    PathToString(ObjectPath(path.begin(), path.begin() + i)) +
                                    " is a " + std::string(KindName(cur->kind())) + ", not a dict");
      }
      Value* next = nullptr;
      for (auto& [k, x] : cur->dict()) {
        if (KeyString(k) == *key) {
          next = &x;
          break;
        }
      }
      if (!next || last) {
        if (next) {
          *next = fresh();
        } else {
          cur->dict().emplace_back(Value::Str(*key), fresh());
          next = &cur->dict().back().second;
        }
      }
      cur = next;
    } else {
      int64_t idx = std::get<int64_t>(path[i]);
      if (!cur->is_list() || idx < 0) {
        return InvalidArgumentError("cannot set " + PathToString(path) + ": " +
                                    PathToString(ObjectPath(path.begin(), path.begin() + i)) +
                                    " is a " + std::string(KindName(cur->kind())) + ", not a list");
      }
      auto& items = cur->items();
      bool created = false;
      while (static_cast<int64_t>(items.size()) <= idx) {
        items.emplace_back();
        created = true;
      }
      if (created || last || items[idx].is_none()) items[idx] = fresh();
      cur = &items[idx];
    }
  }
  return Status::Ok();
}

}  // namespace dcpp
