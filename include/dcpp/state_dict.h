// State dicts: nested trees of named values, and their flattening to fully-qualified names.
//
// A state dict is a dcpp::Value dict whose leaves are tensors, sharded tensors, bytes or plain
// values. DCP stores it flat: each leaf gets an fqn made of its path joined by "." ("model.
// layers.0.weight") and the path itself is recorded (Metadata::planner_data) so a loader rebuilds
// the nesting. Flattening follows PyTorch's rules exactly (torch >= 2.4 traversal):
//   * dicts are always descended (an empty dict yields nothing and is lost, as in PyTorch);
//   * a list is descended iff it holds a tensor, or a dict, or a list that is descended;
//     otherwise the whole list is one leaf;
//   * tuples and everything else are leaves (a tuple of tensors is one bytes item);
//   * dict keys become str(key) path parts, list positions int parts.
//
// Stateful is the interface for user objects that produce and consume a state dict.
// Thread-safety: functions are pure over their arguments.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "dcpp/status.h"
#include "dcpp/value.h"

namespace dcpp {

using StateDict = Value;

// One element of a leaf's path: a dict key or a list index.
using PathPart = std::variant<std::string, int64_t>;
using ObjectPath = std::vector<PathPart>;

std::string PathToFqn(const ObjectPath& path);     // "model.layers.0.weight"
std::string PathToString(const ObjectPath& path);  // ('model', 'layers', 0, 'weight')

struct FlatEntry {
  std::string fqn;
  ObjectPath path;
  const Value* value;  // points into the flattened tree
};

// Leaves in traversal order. InvalidArgument if the root is not a dict or two leaves share an
// fqn (e.g. keys "a.b" and {"a": {"b": ...}}).
Result<std::vector<FlatEntry>> FlattenStateDict(const StateDict& state_dict);

// The leaf at `path`, or nullptr.
const Value* GetElement(const Value& root, const ObjectPath& path);
Value* GetElement(Value& root, const ObjectPath& path);

// Stores `value` at `path`, creating dicts for str parts and lists (padded with None) for int
// parts, like PyTorch's set_element. InvalidArgument when an existing node has the wrong kind.
Status SetElement(Value& root, const ObjectPath& path, Value value);

// A user object that checkpoints itself (PyTorch's Stateful protocol).
class Stateful {
 public:
  virtual ~Stateful() = default;
  virtual StateDict GetStateDict() = 0;
  virtual Status LoadStateDict(const StateDict& state_dict) = 0;
};

}  // namespace dcpp
