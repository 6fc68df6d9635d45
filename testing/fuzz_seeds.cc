#include "testing/fuzz_seeds.h"

#include <cstdlib>
#include <filesystem>
#include <string_view>

#include "testing/testing.h"

namespace dcpp::testing {

void ExpectFuzzSeeds(const std::string& target, const std::map<std::string, std::string>& seeds) {
  const std::filesystem::path dir = std::filesystem::path(SourceDir()) / "tests/fuzz" / target;
  const char* write = std::getenv("DCPP_WRITE_FUZZ_SEEDS");
  if (write != nullptr && std::string_view(write) == "1") {
    std::filesystem::create_directories(dir);
    for (const auto& [name, bytes] : seeds) {
      ASSERT_TRUE(WriteFileBytes((dir / name).string(), bytes).ok()) << dir / name;
    }
    return;
  }
  for (const auto& [name, bytes] : seeds) {
    auto committed = ReadFileBytes((dir / name).string());
    ASSERT_TRUE(committed.ok()) << committed.status().ToString()
                                << " (DCPP_WRITE_FUZZ_SEEDS=1 writes the seeds)";
    EXPECT_TRUE(*committed == bytes)
        << dir / name << " is not what the code encodes now; DCPP_WRITE_FUZZ_SEEDS=1 rewrites it";
  }
}

}  // namespace dcpp::testing
