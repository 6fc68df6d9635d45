// The behaviour every Store backend must show, as a list of named checks.
//
// A backend's test instantiates them all against a factory of fresh, empty stores:
//
//   INSTANTIATE_TEST_SUITE_P(Memory, StoreConformanceTest,
//       ::testing::Combine(::testing::Values(StoreBackend{"Memory", [] { ... }}),
//                          ::testing::ValuesIn(StoreConformanceChecks())),
//       StoreConformanceTestName);
//
// with `TEST_P(StoreConformanceTest, Check) { RunStoreConformance(GetParam()); }` in the test
// file (gtest registers TEST_P only from a linked object, so it lives beside the backend tests).
#pragma once

#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "dcpp/storage.h"

namespace dcpp::testing {

struct StoreBackend {
  std::string name;
  // A fresh, empty store; the shared_ptr owns whatever else it needs (a TempDir, a base store).
  std::function<std::shared_ptr<Store>()> make;
};

struct StoreCheck {
  std::string name;
  std::function<void(Store&)> run;
};

// Write/read, positions, buffered and pass-through appends, ranged reads past the end, empty
// files, truncation on reopen, atomic replace, key validation, concurrent reads and writes,
// List/Remove/Rename, nested keys, SyncDir.
const std::vector<StoreCheck>& StoreConformanceChecks();

// Names for gtest's failure messages.
inline void PrintTo(const StoreBackend& b, std::ostream* os) { *os << b.name; }
inline void PrintTo(const StoreCheck& c, std::ostream* os) { *os << c.name; }

using StoreConformanceParam = std::tuple<StoreBackend, StoreCheck>;
class StoreConformanceTest : public ::testing::TestWithParam<StoreConformanceParam> {};

void RunStoreConformance(const StoreConformanceParam& param);
std::string StoreConformanceTestName(const ::testing::TestParamInfo<StoreConformanceParam>& info);

}  // namespace dcpp::testing
