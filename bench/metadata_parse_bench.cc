// CPU time and peak RSS of decoding one `.metadata` file, by hand:
//   dcpp_metadata_bench FILE [direct|tree|validate|parse|encode|compare] [ROUNDS]
// Each process runs one way (peak RSS is per process): the direct decoder, the tree path
// (ReadPickle + its interpretation), ValidateMetadata alone on a decoded result, the whole
// ParseMetadata, or EncodeMetadata of the decoded result (a commit's encoding, which must give
// the file's bytes back for files dcpp wrote); `compare` decodes both ways and prints their
// first difference ("" if none).
// Prints one JSON line: the median CPU seconds over the rounds, the peak RSS
// above what the process held after reading the file, and the RSS the result itself keeps.
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "codec/metadata_reader.h"
#include "dcpp/metadata.h"

namespace {

double CpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

long StatusKiB(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key(field);
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0) return std::stol(line.substr(key.size()));
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE [direct|tree|validate|parse|encode|compare] [ROUNDS]\n",
                 argv[0]);
    return 2;
  }
  const std::string way = argc > 2 ? argv[2] : "direct";
  const int rounds = argc > 3 ? std::max(1, std::atoi(argv[3])) : 5;
  // Read straight into the string, so the input costs its size once.
  std::ifstream in(argv[1], std::ios::binary | std::ios::ate);
  std::string bytes(in ? static_cast<size_t>(in.tellg()) : 0, '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (bytes.empty() || !in) {
    std::fprintf(stderr, "cannot read %s\n", argv[1]);
    return 2;
  }
  const long base_rss = StatusKiB("VmRSS:");
  const long base_hwm = StatusKiB("VmHWM:");

  if (way == "compare") {
    auto tree = dcpp::internal::DecodeMetadataTree(bytes);
    auto direct = dcpp::internal::DecodeMetadataDirect(bytes);
    if (!tree.ok() || !direct.ok()) {
      std::printf("{\"way\":\"compare\",\"tree\":\"%s\",\"direct\":\"%s\"}\n",
                  tree.status().ToString().c_str(), direct.status().ToString().c_str());
      return 1;
    }
    const std::string diff = dcpp::internal::MetadataDifference(*tree, *direct);
    std::printf("{\"way\":\"compare\",\"entries\":%zu,\"difference\":\"%s\"}\n",
                tree->state_dict_metadata.size(), diff.c_str());
    return diff.empty() ? 0 : 1;
  }
  auto decode = [&](const std::string& w) -> dcpp::Result<dcpp::Metadata> {
    if (w == "tree") return dcpp::internal::DecodeMetadataTree(bytes);
    if (w == "parse") return dcpp::ParseMetadata(bytes);
    return dcpp::internal::DecodeMetadataDirect(bytes);
  };
  std::vector<double> times;
  long kept_kib = 0;
  size_t entries = 0;
  for (int r = 0; r < rounds; ++r) {
    if (way == "encode") {
      auto md = decode("direct");
      if (!md.ok()) return std::fprintf(stderr, "%s\n", md.status().ToString().c_str()), 1;
      const double t0 = CpuSeconds();
      auto encoded = dcpp::EncodeMetadata(*md);
      times.push_back(CpuSeconds() - t0);
      if (!encoded.ok())
        return std::fprintf(stderr, "%s\n", encoded.status().ToString().c_str()), 1;
      if (r == 0 && *encoded != bytes)
        std::fprintf(stderr, "note: the encoding differs from the file\n");
      entries = md->state_dict_metadata.size();
      continue;
    }
    if (way == "validate") {
      auto md = decode("direct");
      if (!md.ok()) return std::fprintf(stderr, "%s\n", md.status().ToString().c_str()), 1;
      const double t0 = CpuSeconds();
      const dcpp::Status s = dcpp::ValidateMetadata(*md, "metadata");
      times.push_back(CpuSeconds() - t0);
      if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
      entries = md->state_dict_metadata.size();
      continue;
    }
    const double t0 = CpuSeconds();
    auto md = decode(way);
    times.push_back(CpuSeconds() - t0);
    if (!md.ok()) return std::fprintf(stderr, "%s\n", md.status().ToString().c_str()), 1;
    if (r == 0) kept_kib = StatusKiB("VmRSS:") - base_rss;  // later rounds reuse freed pages
    entries = md->state_dict_metadata.size();
  }
  std::sort(times.begin(), times.end());
  std::printf(
      "{\"way\":\"%s\",\"file_bytes\":%zu,\"entries\":%zu,\"rounds\":%d,\"cpu_s_median\":%.4f,"
      "\"cpu_s_min\":%.4f,\"peak_rss_above_input_MiB\":%.1f,\"result_rss_MiB\":%.1f}\n",
      way.c_str(), bytes.size(), entries, rounds, times[times.size() / 2], times.front(),
      static_cast<double>(StatusKiB("VmHWM:") - base_hwm) / 1024.0,
      static_cast<double>(kept_kib) / 1024.0);
  return 0;
}
