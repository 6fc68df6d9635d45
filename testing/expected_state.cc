#include "testing/expected_state.h"

#include <algorithm>

#include "dcpp/checkpoint.h"
#include "dcpp/chunk.h"
#include "dcpp/convert.h"

namespace dcpp::testing {

Result<ExpectedState> ReadExpectedState(const std::string& path) {
  DCPP_ASSIGN_OR_RETURN(auto source, OpenCheckpoint(path));
  ExpectedState out;
  for (const EntryInfo& e : source->entries()) {
    DCPP_ASSIGN_OR_RETURN(Value v, source->Read(e));
    out.push_back({e.fqn, e.path, std::move(v)});
  }
  return out;
}

std::pair<int64_t, int64_t> Slab(int64_t extent, int rank, int world) {
  const int64_t begin = extent * rank / world;
  return {begin, extent * (rank + 1) / world - begin};
}

std::vector<std::string> LoadAndCompare(const std::string& dir, const ExpectedState& expected,
                                        Communicator* comm, int split_dim) {
  const int rank = comm ? comm->rank() : 0;
  const int world = comm ? comm->size() : 1;
  const std::string who = "rank " + std::to_string(rank) + "/" + std::to_string(world) + ": ";
  std::vector<std::string> bad;
  Value sd = Value::MakeDict();
  for (const ExpectedEntry& e : expected) {
    if (!e.value.is_tensor() || e.value.tensor().shape().empty()) {
      // Plain values are replaced by what is stored; 0-d tensors are filled whole.
      sd.Set(e.fqn, e.value.is_tensor()
                        ? Value::FromTensor(Tensor::Zeros(e.value.tensor().dtype(), {}))
                        : Value::None());
      continue;
    }
    const Tensor& full = e.value.tensor();
    const size_t dim = std::min<size_t>(split_dim, full.shape().size() - 1);
    auto [begin, size] = Slab(full.shape()[dim], rank, world);
    ShardedTensor st{full.dtype(), full.shape(), {}};
    if (size > 0) {
      Shape off(full.shape().size(), 0), sizes = full.shape();
      off[dim] = begin;
      sizes[dim] = size;
      st.shards.push_back({off, Tensor::Zeros(full.dtype(), sizes)});
    }
    sd.Set(e.fqn, Value::FromSharded(std::move(st)));
  }
  LoadOptions lo;
  lo.comm = comm;
  Status s = Load(sd, dir, lo);
  if (!s.ok()) return {who + s.ToString()};
  for (const ExpectedEntry& e : expected) {
    const Value* got = sd.Find(e.fqn);
    if (!got) {
      bad.push_back(who + e.fqn + ": missing after load");
    } else if (got->is_sharded()) {
      const Tensor& full = e.value.tensor();
      for (const Shard& piece : got->sharded().shards) {
        Tensor want = Tensor::Zeros(full.dtype(), piece.tensor.shape());
        Status c = CopyRegion(want.view(), Shape(want.shape().size(), 0), full.view(),
                              piece.offsets, piece.tensor.shape());
        if (!c.ok() || !want.BitwiseEqual(piece.tensor)) {
          bad.push_back(who + e.fqn + " chunk " + piece.box().ToString() + " differs (" +
                        std::string(DTypeName(full.dtype())) + ")");
        }
      }
    } else if (!(*got == e.value)) {
      bad.push_back(who + e.fqn + ": " + got->DebugString() + " != " + e.value.DebugString());
    }
  }
  return bad;
}

}  // namespace dcpp::testing
