// `dcpp bench`: benchmark cases, each measured in its own process (so peak RSS is its own), and
// the orchestrator that runs them beside the machine's limits and the PyTorch peers.
//
// A case prints JSON objects on stdout, one per line ({"case", "figures", ...}); the orchestrator
// collects them, computes medians and ratios and prints one table or one JSON array of rows
// {"case", "figures", "target", "pass"}. Thread-safety: single-threaded CLI code.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dcpp::cli {

// Peak resident set size of this process (VmHWM), in bytes.
int64_t PeakRssBytes();
// Current resident set size (VmRSS), in bytes.
int64_t CurrentRssBytes();
// Monotonic seconds.
double NowSeconds();
// CPU seconds (user + system) this process used so far.
double CpuSeconds();
// The median of `v` (the mean of the middle two for an even count); 0 when empty.
double Median(std::vector<double> v);

// Planning at scale with simulated ranks; prints rows for `ranks` ranks of `items` items.
int RunPlanningCase(int ranks, int items, int load_ranks);

// I/O cases (bench_io.cc): save/load of one kind of state dict in this process.
struct IoCaseArgs {
  std::string kind;  // "large", "small", "reshard"
  std::string dir;
  std::string op;  // "save" or "load"
  int threads = 4;
  int saves = 2;  // saves in this process (the first is reported apart)
  int64_t bytes = 1 << 30;
  bool cold = false;          // load: the checkpoint's files are dropped from the page cache first
  int write_parallelism = 0;  // save: FileSystemWriterOptions::write_parallelism
};
int RunIoCase(const IoCaseArgs& args);

void RegisterBench(CLI::App& app);

}  // namespace dcpp::cli
