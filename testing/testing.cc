#include "testing/testing.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

namespace dcpp::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/dcpp_test_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) std::abort();
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

Tensor PatternTensor(DType dtype, const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::Zeros(dtype, shape);
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(dtype));
  auto* p = reinterpret_cast<uint8_t*>(t.data());
  const size_t n = t.nbytes();
  for (size_t i = 0; i < n; ++i) {
    uint8_t b = static_cast<uint8_t>(rng());
    if (dtype == DType::kBool) b &= 1;
    p[i] = b;
  }
  // Keep floating values finite and canonical so PyTorch round trips compare exactly.
  if (dtype == DType::kFloat32 || dtype == DType::kComplex64) {
    float* f = reinterpret_cast<float*>(p);
    for (size_t i = 0; i < n / 4; ++i)
      f[i] = static_cast<float>(static_cast<int32_t>(rng() % 20001) - 10000) / 64.0f;
  } else if (dtype == DType::kFloat64 || dtype == DType::kComplex128) {
    double* f = reinterpret_cast<double*>(p);
    for (size_t i = 0; i < n / 8; ++i)
      f[i] = static_cast<double>(static_cast<int64_t>(rng() % 2000001) - 1000000) / 1024.0;
  } else if (dtype == DType::kFloat16 || dtype == DType::kBFloat16 || dtype == DType::kComplex32) {
    uint16_t* h = reinterpret_cast<uint16_t*>(p);
    for (size_t i = 0; i < n / 2; ++i) h[i] &= 0xBBFF;  // exponent never all-ones: no inf/NaN
  }
  return t;
}

Tensor IotaTensor(DType dtype, const Shape& shape) {
  Tensor t = Tensor::Zeros(dtype, shape);
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (dtype) {
      case DType::kFloat32:
        t.data_as<float>()[i] = static_cast<float>(i);
        break;
      case DType::kFloat64:
        t.data_as<double>()[i] = static_cast<double>(i);
        break;
      case DType::kInt32:
        t.data_as<int32_t>()[i] = static_cast<int32_t>(i);
        break;
      case DType::kInt64:
        t.data_as<int64_t>()[i] = i;
        break;
      default:
        std::abort();
    }
  }
  return t;
}

std::string SourceDir() {
  if (const char* d = std::getenv("DCPP_SOURCE_DIR")) return d;
#ifdef DCPP_SOURCE_DIR_DEFAULT
  return DCPP_SOURCE_DIR_DEFAULT;
#else
  return ".";
#endif
}

std::string CliPath() {
  if (const char* c = std::getenv("DCPP_CLI")) return c;
#ifdef DCPP_CLI_DEFAULT
  return DCPP_CLI_DEFAULT;
#else
  return "dcpp";
#endif
}

std::string PythonPath() {
  if (const char* p = std::getenv("DCPP_PYTHON")) return p;
  return "/usr/bin/python3";
}

std::string Torch2PythonPath() {
  if (const char* p = std::getenv("DCPP_TORCH2_PYTHON")) return p;
#ifdef DCPP_VENV_PYTHON_DEFAULT
  return DCPP_VENV_PYTHON_DEFAULT;
#else
  return "python3";
#endif
}

Result<std::unique_ptr<ReadableFile>> OpenFile(const std::string& path) {
  DCPP_ASSIGN_OR_RETURN(StoreFile f, OpenStoreFile(path));
  return f.store->OpenRead(f.key);
}

Result<std::string> ReadFileBytes(const std::string& path) {
  DCPP_ASSIGN_OR_RETURN(StoreFile f, OpenStoreFile(path));
  return f.store->ReadAll(f.key);
}

Status WriteFileBytes(const std::string& path, std::string_view bytes) {
  DCPP_ASSIGN_OR_RETURN(StoreFile f, OpenStoreFile(path, {.create = true}));
  return f.store->WriteAtomic(f.key, bytes);
}

std::vector<std::string> MetadataGoldenPaths() {
  const std::string root = SourceDir();
  std::vector<std::string> paths = {
      root + "/tests/data/dcp_113_2ranks_dim0/.metadata",
      root + "/tests/data/dcp_213_2ranks/sync/.metadata",
      root + "/tests/data/dcp_213_2ranks/nocoll/__0.metadata",
      root + "/tests/data/dcp_213_2ranks/nocoll/__1.metadata",
  };
  std::vector<std::string> seeds;
  for (const auto& e : std::filesystem::directory_iterator(root + "/tests/fuzz/metadata_fuzz")) {
    if (!e.path().filename().string().starts_with("hostile_")) seeds.push_back(e.path().string());
  }
  std::sort(seeds.begin(), seeds.end());
  paths.insert(paths.end(), seeds.begin(), seeds.end());
  return paths;
}

void FlipByte(const std::string& path, uint64_t offset, uint8_t mask) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ mask);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
  EXPECT_TRUE(f.good()) << "flipping byte " << offset << " of " << path;
}

}  // namespace dcpp::testing
