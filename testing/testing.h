// Shared test helpers: status matchers, temporary directories, deterministic tensors.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "dcpp/status.h"
#include "dcpp/storage.h"
#include "dcpp/tensor.h"

namespace dcpp::testing {

// EXPECT_THAT(status_or_result, StatusIs(StatusCode::kDataLoss, HasSubstr("crc")))
MATCHER_P2(StatusIs, code, message_matcher, "") {
  ::dcpp::Status s = ::dcpp::internal::AsStatus(arg);
  if (s.code() != code) {
    *result_listener << "status is " << s.ToString();
    return false;
  }
  return ::testing::ExplainMatchResult(message_matcher, std::string(s.message()), result_listener);
}

MATCHER(IsOk, "") {
  ::dcpp::Status s = ::dcpp::internal::AsStatus(arg);
  if (!s.ok()) *result_listener << "status is " << s.ToString();
  return s.ok();
}

#define DCPP_ASSERT_OK(expr) ASSERT_THAT((expr), ::dcpp::testing::IsOk())
#define DCPP_EXPECT_OK(expr) EXPECT_THAT((expr), ::dcpp::testing::IsOk())
// `DCPP_ASSERT_OK_AND_ASSIGN(auto x, F());`
#define DCPP_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  DCPP_ASSERT_OK_AND_ASSIGN_IMPL_(DCPP_CONCAT_(dcpp_test_result_, __LINE__), lhs, expr)
#define DCPP_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                    \
  ASSERT_THAT(tmp.status(), ::dcpp::testing::IsOk());   \
  lhs = std::move(*tmp)

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string Join(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// A contiguous tensor whose bytes are a deterministic function of (seed, byte index); valid for
// every dtype (bool bytes are 0/1, floats avoid NaN payload differences by construction).
Tensor PatternTensor(DType dtype, const Shape& shape, uint64_t seed = 1);

// Element i of a contiguous float32/int64 tensor holds i (for readable geometry tests).
Tensor IotaTensor(DType dtype, const Shape& shape);

// Local files through the storage layer (OpenStoreFile), for tests that make or read files.
Result<std::unique_ptr<ReadableFile>> OpenFile(const std::string& path);
Result<std::string> ReadFileBytes(const std::string& path);
Status WriteFileBytes(const std::string& path, std::string_view bytes);
// Every legitimate `.metadata` kept in the tree: the PyTorch 1.13 and 2.13 goldens under
// tests/data and the metadata fuzz seeds (those named hostile_* are refused by design and left
// out).
std::vector<std::string> MetadataGoldenPaths();
// XORs the byte at `offset` of the file in place with `mask` (twice restores it): damage that
// checksums must catch.
void FlipByte(const std::string& path, uint64_t offset, uint8_t mask = 0x01);

// Directory of the source tree (for tests/data); from the DCPP_SOURCE_DIR environment variable
// or the compile-time default.
std::string SourceDir();

// The dcpp CLI built with the tests (env DCPP_CLI overrides) and the Python that has torch
// (env DCPP_PYTHON overrides; default /usr/bin/python3).
std::string CliPath();
std::string PythonPath();
// The Python of scripts/setup's venv: PyTorch 2.x, safetensors, numpy (env DCPP_TORCH2_PYTHON
// overrides).
std::string Torch2PythonPath();

}  // namespace dcpp::testing
