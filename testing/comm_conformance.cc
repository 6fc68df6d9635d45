#include "testing/comm_conformance.h"

#include <cstring>
#include <memory>
#include <vector>

#include "testing/testing.h"

namespace dcpp::testing {
namespace {

using ::testing::HasSubstr;

// Compares without printing megabytes on failure.
::testing::AssertionResult SameBytes(const std::string& got, const std::string& want) {
  if (got == want) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  return ::testing::AssertionFailure() << "got " << got.size() << " bytes, want " << want.size()
                                       << "; first difference at byte " << i;
}

}  // namespace

std::string CommPayload(int rank, int tag, size_t n) {
  std::string out(n, '\0');
  uint64_t x = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(rank + 1) +
               0xD1B54A32D192ED03ull * static_cast<uint64_t>(tag + 7);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    std::memcpy(out.data() + i, &x, 8);
  }
  for (; i < n; ++i) out[i] = static_cast<char>((x >> (8 * (i % 8))) ^ i);
  return out;
}

void ExpectCollectivesWork(Communicator& comm) {
  const int n = comm.size();
  const int me = comm.rank();
  SCOPED_TRACE("rank " + std::to_string(me) + " of " + std::to_string(n));
  ASSERT_GE(me, 0);
  ASSERT_LT(me, n);
  EXPECT_THAT(comm.Barrier(), IsOk());

  int tag = 0;
  for (size_t base : {size_t{0}, size_t{1}, size_t{1000}, size_t{70001}}) {
    // Sizes differ by rank, and with base 1 the odd ranks send nothing.
    auto len = [&](int r) -> size_t {
      if (base == 0 || (base == 1 && r % 2 == 1)) return 0;
      return base + static_cast<size_t>(r) * 3;
    };
    for (int root = 0; root < n; ++root) {
      ++tag;
      std::string buf = me == root ? CommPayload(root, tag, len(root)) : "stale contents";
      EXPECT_THAT(comm.Broadcast(buf, root), IsOk());
      EXPECT_TRUE(SameBytes(buf, CommPayload(root, tag, len(root)))) << "Broadcast root " << root;

      auto gathered = comm.Gather(CommPayload(me, tag, len(me)), root);
      EXPECT_THAT(gathered.status(), IsOk());
      if (gathered.ok()) {
        if (me == root) {
          EXPECT_EQ(gathered->size(), static_cast<size_t>(n));
          for (int r = 0; r < n && r < static_cast<int>(gathered->size()); ++r) {
            EXPECT_TRUE(SameBytes((*gathered)[r], CommPayload(r, tag, len(r))))
                << "Gather root " << root << " part " << r;
          }
        } else {
          EXPECT_TRUE(gathered->empty()) << "Gather gave a non-root rank data";
        }
      }

      // Non-root ranks pass a vector of the wrong size, which must be ignored.
      std::vector<std::string> parts;
      if (me == root) {
        for (int r = 0; r < n; ++r) parts.push_back(CommPayload(r, tag + 1000, len(r)));
      } else {
        parts.assign(static_cast<size_t>(n) + 2, "ignored");
      }
      auto scattered = comm.Scatter(parts, root);
      EXPECT_THAT(scattered.status(), IsOk());
      if (scattered.ok()) {
        EXPECT_TRUE(SameBytes(*scattered, CommPayload(me, tag + 1000, len(me))))
            << "Scatter root " << root;
      }
    }
    ++tag;
    auto all = comm.AllGather(CommPayload(me, tag, len(me)));
    EXPECT_THAT(all.status(), IsOk());
    if (all.ok()) {
      EXPECT_EQ(all->size(), static_cast<size_t>(n));
      for (int r = 0; r < n && r < static_cast<int>(all->size()); ++r) {
        EXPECT_TRUE(SameBytes((*all)[r], CommPayload(r, tag, len(r)))) << "AllGather part " << r;
      }
    }
  }

  // Errors every rank must report alike, after which the group still works.
  std::string buf = "x";
  EXPECT_THAT(comm.Broadcast(buf, n), StatusIs(StatusCode::kInvalidArgument, HasSubstr("root")));
  EXPECT_THAT(comm.Gather("x", -1).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("root")));
  std::vector<std::string> too_many(static_cast<size_t>(n) + 1, "p");
  EXPECT_THAT(comm.Scatter(too_many, n + 3).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("root")));
  // Only the root sees that its parts are wrong; every rank must still hear of it.
  std::vector<std::string> wrong = me == 0 ? too_many : std::vector<std::string>(n, "fine");
  EXPECT_THAT(comm.Scatter(wrong, 0).status(),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("passed " + std::to_string(n + 1) + " parts")));
  auto after = comm.AllGather(std::to_string(me));
  EXPECT_THAT(after.status(), IsOk());
  if (after.ok()) {
    for (int r = 0; r < n && r < static_cast<int>(after->size()); ++r) {
      EXPECT_EQ((*after)[r], std::to_string(r));
    }
  }
  EXPECT_THAT(comm.Barrier(), IsOk());
}

namespace {

// Collectives inside a subgroup whose members are parent ranks `members` (in order).
void ExpectSubGroupWorks(Communicator& sub, const std::vector<int>& members, int parent_rank,
                         int tag) {
  SCOPED_TRACE("subgroup of " + std::to_string(members.size()) + ", parent rank " +
               std::to_string(parent_rank));
  EXPECT_EQ(sub.size(), static_cast<int>(members.size()));
  ASSERT_GE(sub.rank(), 0);
  ASSERT_LT(sub.rank(), sub.size());
  EXPECT_EQ(members[sub.rank()], parent_rank);
  auto all = sub.AllGather(CommPayload(parent_rank, tag, 100 + parent_rank));
  EXPECT_THAT(all.status(), IsOk());
  if (all.ok() && all->size() == members.size()) {
    for (size_t i = 0; i < members.size(); ++i) {
      EXPECT_TRUE(SameBytes((*all)[i], CommPayload(members[i], tag, 100 + members[i])));
    }
  }
  const int root = sub.size() - 1;
  std::string buf = sub.rank() == root ? CommPayload(root, tag, 33) : "";
  EXPECT_THAT(sub.Broadcast(buf, root), IsOk());
  EXPECT_TRUE(SameBytes(buf, CommPayload(root, tag, 33)));
  std::vector<std::string> parts;
  if (sub.rank() == 0) {
    for (int r = 0; r < sub.size(); ++r) parts.push_back(std::to_string(r * 7));
  }
  auto mine = sub.Scatter(parts, 0);
  EXPECT_THAT(mine.status(), IsOk());
  if (mine.ok()) {
    EXPECT_EQ(*mine, std::to_string(sub.rank() * 7));
  }
  EXPECT_THAT(sub.Barrier(), IsOk());
}

}  // namespace

void ExpectSubGroupsWork(Communicator& comm) {
  const int n = comm.size();
  const int me = comm.rank();
  SCOPED_TRACE("rank " + std::to_string(me) + " of " + std::to_string(n));

  std::vector<int> reversed;
  for (int r = n - 1; r >= 0; --r) reversed.push_back(r);
  auto sub = comm.SubGroup(reversed);
  EXPECT_THAT(sub.status(), IsOk());
  if (sub.ok()) {
    EXPECT_NE(*sub, nullptr);
    if (*sub) {
      EXPECT_EQ((*sub)->rank(), n - 1 - me);
      ExpectSubGroupWorks(**sub, reversed, me, 1);
    }
  }

  std::vector<int> evens;
  for (int r = 0; r < n; r += 2) evens.push_back(r);
  auto even_group = comm.SubGroup(evens);
  EXPECT_THAT(even_group.status(), IsOk());
  if (even_group.ok()) {
    EXPECT_EQ(*even_group == nullptr, me % 2 == 1);
    if (*even_group) {
      ExpectSubGroupWorks(**even_group, evens, me, 2);
      // A subgroup of a subgroup: its last member alone.
      std::vector<int> last = {(*even_group)->size() - 1};
      auto nested = (*even_group)->SubGroup(last);
      EXPECT_THAT(nested.status(), IsOk());
      if (nested.ok()) {
        const bool member = (*even_group)->rank() == last[0];
        EXPECT_EQ(*nested != nullptr, member);
        if (*nested) ExpectSubGroupWorks(**nested, last, (*even_group)->rank(), 3);
      }
    }
  }
  // The parent keeps working while subgroups exist.
  EXPECT_THAT(comm.Barrier(), IsOk());

  EXPECT_THAT(comm.SubGroup({}).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(comm.SubGroup({0, 0}).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("twice")));
  EXPECT_THAT(comm.SubGroup({n}).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not in a group")));
  if (n >= 2) {
    std::vector<int> differs = me == n - 1 ? std::vector<int>{0} : std::vector<int>{0, 1};
    EXPECT_THAT(comm.SubGroup(differs).status(),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("disagree")));
  }
  EXPECT_THAT(comm.Barrier(), IsOk());
}

void ExpectLargeCollectivesWork(Communicator& comm, size_t bytes) {
  const int n = comm.size();
  const int me = comm.rank();
  SCOPED_TRACE("rank " + std::to_string(me) + " of " + std::to_string(n) + ", " +
               std::to_string(bytes) + " bytes");
  const std::string big = CommPayload(0, 77, bytes);

  std::string buf = me == 0 ? big : std::string();
  EXPECT_THAT(comm.Broadcast(buf, 0), IsOk());
  EXPECT_TRUE(SameBytes(buf, big));
  buf.clear();
  buf.shrink_to_fit();

  // Rank 0 (the root) and the last rank contribute the large buffer, the others a little.
  auto part = [&](int r) {
    return r == 0 || r == n - 1 ? CommPayload(r, 78, bytes) : CommPayload(r, 78, 1000);
  };
  {
    auto gathered = comm.Gather(part(me), 0);
    EXPECT_THAT(gathered.status(), IsOk());
    if (gathered.ok() && me == 0) {
      EXPECT_EQ(gathered->size(), static_cast<size_t>(n));
      for (int r = 0; r < n && r < static_cast<int>(gathered->size()); ++r) {
        EXPECT_TRUE(SameBytes((*gathered)[r], part(r))) << "Gather part " << r;
      }
    }
  }
  {
    auto all = comm.AllGather(me == n - 1 ? part(me) : CommPayload(me, 78, 1000));
    EXPECT_THAT(all.status(), IsOk());
    if (all.ok() && all->size() == static_cast<size_t>(n)) {
      EXPECT_TRUE(SameBytes((*all)[n - 1], part(n - 1)));
      if (n > 1) {
        EXPECT_TRUE(SameBytes((*all)[0], CommPayload(0, 78, 1000)));
      }
    }
  }
  {
    std::vector<std::string> parts;
    if (me == 0) {
      for (int r = 0; r < n; ++r) parts.push_back(part(r));
    }
    auto mine = comm.Scatter(parts, 0);
    EXPECT_THAT(mine.status(), IsOk());
    if (mine.ok()) {
      EXPECT_TRUE(SameBytes(*mine, part(me)));
    }
  }
  EXPECT_THAT(comm.Barrier(), IsOk());
}

}  // namespace dcpp::testing
