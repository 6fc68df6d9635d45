// dcpp bench [--json] [--quick]: see bench.h. This file holds the command line, the helpers the
// cases share, and the orchestrator.
#include "tools/dcpp/bench.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>
#include <vector>

#include "tools/dcpp/commands.h"

namespace dcpp::cli {

namespace {

int64_t StatusField(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, n, key) == 0) return std::atoll(line.c_str() + n) * 1024;
  }
  return 0;
}

}  // namespace

int64_t PeakRssBytes() { return StatusField("VmHWM:"); }
int64_t CurrentRssBytes() { return StatusField("VmRSS:"); }
double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct BenchArgs {
  bool json = false;
  bool quick = false;
  std::string dir;
  std::string case_name;
  int ranks = 256;
  int items = 1000;
  int load_ranks = 0;
  int rounds = 5;
  int peer_rounds = 3;
  int peer_small_rounds = 1;
  int fio_rounds = 3;
  std::string only;  // comma-separated parts to run; empty: all
  IoCaseArgs io;
};

int RunOrchestrator(const BenchArgs& args);

void RegisterBench(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Measure save/load/planning against peers and limits");
  auto args = std::make_shared<BenchArgs>();
  cmd->add_flag("--json", args->json, "print one JSON array of rows");
  cmd->add_flag("--quick", args->quick, "tiny sizes, one round (a smoke test)");
  cmd->add_option("--rounds", args->rounds, "alternating rounds; medians are reported (5)");
  cmd->add_option("--peer-rounds", args->peer_rounds,
                  "rounds that run the PyTorch peers on the large tensors and torch.save (3)");
  cmd->add_option("--peer-small-rounds", args->peer_small_rounds,
                  "rounds that run PyTorch DCP on the small tensors (1: ~12 s per operation)");
  cmd->add_option("--fio-rounds", args->fio_rounds,
                  "rounds that measure fio's write and read (3; a limit, not a contender)");
  cmd->add_option("--only", args->only,
                  "run only these parts, comma-separated: large, small, reshard, planning, rows");
  cmd->add_option("--dir", args->dir, "scratch directory (default: bench-scratch in the cwd)");
  // Internal: run one case in this process (the orchestrator spawns these).
  cmd->add_option("--case", args->case_name, "run one case in this process")->group("");
  cmd->add_option("--ranks", args->ranks)->group("");
  cmd->add_option("--items", args->items)->group("");
  cmd->add_option("--load-ranks", args->load_ranks)->group("");
  cmd->add_option("--kind", args->io.kind)->group("");
  cmd->add_option("--op", args->io.op)->group("");
  cmd->add_option("--threads", args->io.threads)->group("");
  cmd->add_option("--saves", args->io.saves)->group("");
  cmd->add_option("--bytes", args->io.bytes)->group("");
  cmd->add_flag("--cold", args->io.cold)->group("");
  cmd->add_option("--write-parallelism", args->io.write_parallelism)->group("");
  cmd->callback([args] {
    if (args->case_name == "planning") {
      SetExitCode(RunPlanningCase(args->ranks, args->items, args->load_ranks));
    } else if (args->case_name == "io") {
      args->io.dir = args->dir;
      SetExitCode(RunIoCase(args->io));
    } else if (!args->case_name.empty()) {
      std::cerr << "dcpp bench: unknown case \"" << args->case_name << "\"\n";
      SetExitCode(2);
    } else {
      SetExitCode(RunOrchestrator(*args));
    }
  });
}

namespace {

using nlohmann::json;

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Runs `cmd` under a time limit; returns the JSON values it printed (one per line, or one
// array), or an empty list (with a note on stderr) when it failed.
std::vector<json> RunJson(const std::string& cmd, int timeout_s) {
  const std::string full = "timeout -k 5 " + std::to_string(timeout_s) + " " + cmd;
  std::vector<json> out;
  FILE* p = popen(full.c_str(), "r");
  if (!p) return out;
  std::string text;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) text.append(buf, n);
  const int rc = pclose(p);
  if (rc != 0) {
    std::cerr << "dcpp bench: `" << cmd << "` failed (status " << rc << ")\n";
    return out;
  }
  auto all = json::parse(text, nullptr, false);
  if (!all.is_discarded() && all.is_array()) return all.get<std::vector<json>>();
  if (!all.is_discarded() && all.is_object()) return {all};
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    auto v = json::parse(text.substr(start, end - start), nullptr, false);
    if (!v.is_discarded() && v.is_object()) out.push_back(std::move(v));
    start = end + 1;
  }
  return out;
}

std::string SelfExe() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "dcpp" : p.string();
}

std::string SourceDir() {
#ifdef DCPP_SOURCE_DIR
  return DCPP_SOURCE_DIR;
#else
  return ".";
#endif
}

std::string DefaultPython() {
  if (const char* p = std::getenv("DCPP_BENCH_PYTHON")) return p;
  const std::string script = SourceDir() + "/scripts/venv-path";
  if (std::filesystem::exists(script)) {
    if (FILE* p = popen(("timeout 20 " + Quote(script) + " 2>/dev/null").c_str(), "r")) {
      char buf[1024] = {0};
      std::string dir = fgets(buf, sizeof buf, p) ? buf : "";
      pclose(p);
      while (!dir.empty() && (dir.back() == '\n' || dir.back() == ' ')) dir.pop_back();
      if (!dir.empty() && std::filesystem::exists(dir + "/bin/python")) return dir + "/bin/python";
    }
  }
  return "python3";
}

// Samples of one figure, by name ("dcpp/save/large/t4/first"), over the rounds.
struct Samples {
  std::map<std::string, std::vector<double>> v;
  void Add(const std::string& k, double x) { v[k].push_back(x); }
  double Med(const std::string& k) const {
    auto it = v.find(k);
    return it == v.end() ? 0 : Median(it->second);
  }
  bool Has(const std::string& k) const { return v.count(k) > 0; }
  // Every round's figure, rounded, for the rows (the spread beside the median).
  json Rounds(const std::string& k) const {
    json out = json::array();
    auto it = v.find(k);
    if (it == v.end()) return out;
    for (double x : it->second) out.push_back(std::round(x * 1000) / 1000);
    return out;
  }
};

// GB/s of a fio job over `bytes` split over `jobs` files; write jobs fsync at the end. First
// fio's own figure, then the bytes over the fio process's wall time (start-up and the final
// fsync certainly included).
std::pair<double, double> Fio(const std::string& dir, const std::string& rw, int jobs,
                              int64_t bytes, bool direct = false) {
  const int64_t per = std::max<int64_t>(bytes / jobs, 1 << 20);
  std::string cmd = "fio --name=dcppbench --directory=" + Quote(dir) + " --rw=" + rw +
                    " --bs=" + std::to_string(std::min<int64_t>(per, 8 << 20)) +
                    " --ioengine=psync --numjobs=" + std::to_string(jobs) +
                    " --size=" + std::to_string(per) + " --group_reporting --output-format=json";
  if (rw == "write") cmd += " --end_fsync=1";
  if (direct) cmd += " --direct=1";
  const double t0 = NowSeconds();
  auto out = RunJson(cmd + " 2>/dev/null", 300);
  const double wall = NowSeconds() - t0;
  if (out.empty() || !out[0].contains("jobs")) return {0, 0};
  const auto& job = out[0]["jobs"][0][rw == "write" ? "write" : "read"];
  return {job.value("bw_bytes", 0.0) / 1e9, static_cast<double>(per * jobs) / wall / 1e9};
}

double MemcpyGbps(int64_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  std::vector<double> t;
  for (int i = 0; i < 3; ++i) {
    const double t0 = NowSeconds();
    std::memcpy(b.data(), a.data(), a.size());
    t.push_back(NowSeconds() - t0);
  }
  return static_cast<double>(bytes) / Median(t) / 1e9;
}

json Row(const std::string& name, json figures, const std::string& target, bool pass) {
  return {{"case", name}, {"figures", std::move(figures)}, {"target", target}, {"pass", pass}};
}

std::string Fmt(double x) {
  char b[32];
  std::snprintf(b, sizeof b, x >= 100 ? "%.0f" : x >= 10 ? "%.1f" : "%.2f", x);
  return b;
}

void PrintTable(const std::vector<json>& rows) {
  for (const auto& r : rows) {
    std::string figs;
    const json figures = r.value("figures", json::object());
    for (const auto& [k, v] : figures.items()) {
      if (!figs.empty()) figs += " ";
      figs += k + "=" + (v.is_number_float() ? Fmt(v.get<double>()) : v.dump());
    }
    std::printf("%-4s %-28s %s\n     target: %s\n", r.value("pass", false) ? "ok" : "FAIL",
                r.value("case", std::string("?")).c_str(), figs.c_str(),
                r.value("target", std::string("")).c_str());
  }
}

}  // namespace

int RunOrchestrator(const BenchArgs& args) {
  namespace fs = std::filesystem;
  const std::string dir = fs::absolute(args.dir.empty() ? "dcpp-bench-scratch" : args.dir).string();
  fs::create_directories(dir);
  const std::string self = Quote(SelfExe());
  const std::string python = DefaultPython();
  const std::string peer = SourceDir() + "/bench/torch_peer.py";
  const bool have_peer = fs::exists(peer) && !args.quick;
  const int rounds = args.quick ? 1 : std::max(1, args.rounds);
  // --only: the parts to run (a partial run's rows are marked so in bench/total).
  auto runs = [&](const std::string& part) {
    if (args.only.empty()) return true;
    const std::string list = "," + args.only + ",";
    return list.find("," + part + ",") != std::string::npos;
  };
  const int64_t large = args.quick ? (32 << 20) : (int64_t{1} << 30);
  const int64_t small = args.quick ? (4 << 20) : int64_t{496} << 20;
  const int64_t reshard = args.quick ? (32 << 20) : (int64_t{512} << 20);
  const std::vector<int> thread_counts = {1, 4};
  Samples s;
  // Wall seconds per phase, reported with the total in the last row.
  const double bench_t0 = NowSeconds();
  std::map<std::string, double> phase_s;
  auto timed = [&](const std::string& phase, auto&& fn) {
    const double t0 = NowSeconds();
    fn();
    phase_s[phase] += NowSeconds() - t0;
  };
  auto note = [&](const std::string& what) {
    if (!args.json) std::cerr << "dcpp bench: " << what << "\n";
  };
  auto io = [&](const std::string& kind, const std::string& op, int threads, int64_t bytes,
                bool cold = false) {
    auto out = RunJson(self + " bench --case io --kind " + kind + " --op " + op + " --threads " +
                           std::to_string(threads) + " --saves 2 --bytes " + std::to_string(bytes) +
                           " --dir " + Quote(dir) + (cold ? " --cold" : ""),
                       300);
    return out.empty() ? json::object() : out[0].value("figures", json::object());
  };
  auto torch = [&](const std::string& kind, const std::string& ops, int64_t bytes) {
    return RunJson(Quote(python) + " " + Quote(peer) + " --kind " + kind + " --ops " + ops +
                       " --bytes " + std::to_string(bytes) + " --dir " + Quote(dir),
                   500);
  };

  for (int round = 0; round < rounds; ++round) {
    for (const auto& shape :
         std::vector<std::pair<std::string, int64_t>>{{"large", large}, {"small", small}}) {
      const std::string& kind = shape.first;  // plain names: lambdas below capture them
      const int64_t bytes = shape.second;
      if (!runs(kind)) continue;
      for (int t : thread_counts) {
        const std::string k = kind + "/t" + std::to_string(t);
        note("round " + std::to_string(round + 1) + ": " + k);
        json sv, ld, cold;
        timed("dcpp_io_s", [&] {
          sv = io(kind, "save", t, bytes);
          ld = io(kind, "load", t, bytes);
          // A new job's load: nothing of the checkpoint in the page cache (large state only).
          if (kind == "large") cold = io(kind, "load", t, bytes, /*cold=*/true);
        });
        if (cold.contains("gbps")) s.Add("dcpp/load_cold/" + k, cold["gbps"]);
        if (sv.contains("first_gbps")) {
          s.Add("dcpp/save/" + k + "/first", sv["first_gbps"]);
          s.Add("dcpp/save/" + k + "/later", sv.value("later_gbps", 0.0));
          s.Add("dcpp/save/" + k + "/rss", sv["peak_rss_bytes"].get<double>());
          s.Add("dcpp/save/" + k + "/cpu", sv.value("first_cpu_s", 0.0));
          s.Add("state/" + kind, sv["state_bytes"].get<double>());
        }
        if (ld.contains("gbps")) {
          s.Add("dcpp/load/" + k, ld["gbps"]);
          s.Add("dcpp/load/" + k + "/rss", ld["peak_rss_bytes"].get<double>());
          s.Add("dcpp/load/" + k + "/before_rss", ld["state_rss_bytes"].get<double>());
          s.Add("dcpp/load/" + k + "/cpu", ld.value("cpu_s", 0.0));
        }
        fs::remove_all(dir + "/dcpp_" + kind + "_t" + std::to_string(t) + "_0");
        if (round >= std::max(1, args.fio_rounds)) continue;
        timed("fio_s", [&] {
          // The same memory for every writer: a write that starts right after a checkpoint was
          // deleted gets page-cache pages that are still backed by the host, while a save
          // (which first builds its state) gets pages the guest had handed back. On the
          // development machine's VM that alone made fio 1.4-2.8x faster in three trials; a pause
          // longer than the guest's free-page reporting delay (2 s) removes the difference.
          if (!args.quick) std::this_thread::sleep_for(std::chrono::seconds(3));
          const auto fw = Fio(dir, "write", t, bytes);
          s.Add("fio/write/" + k, fw.first);
          s.Add("fio/write_wall/" + k, fw.second);
          s.Add("fio/read/" + k, Fio(dir, "read", t, bytes).first);
          // Past the page cache, as dcpp's saves and cold loads go: the device's own rate.
          s.Add("fio/direct_write/" + k, Fio(dir, "write", t, bytes, true).first);
          s.Add("fio/direct_read/" + k, Fio(dir, "read", t, bytes, true).first);
        });
        for (const auto& e : fs::directory_iterator(dir)) {
          if (e.path().filename().string().rfind("dcppbench", 0) == 0) fs::remove(e.path());
        }
      }
      // PyTorch DCP takes ~12 s per 20 000-tensor save or load here, so its small-tensor
      // operations run in the first --peer-small-rounds rounds only; torch.save/load and the
      // large-tensor operations in the first --peer-rounds. dcpp and fio, whose figures move
      // most with this VM's memory and disk, run every round.
      const bool peer_dcp = kind != "small" || round < args.peer_small_rounds;
      if (have_peer && round < std::max(1, args.peer_rounds)) {
        // One peer process per kind and round runs every operation in turn (PyTorch's import
        // is paid once; its later saves are warm, which favours the peer).
        note("round " + std::to_string(round + 1) + ": PyTorch peers, " + kind);
        // PyTorch's FileSystemReader has no thread count (it reads its files in turn), so one
        // load per round, of the last save's checkpoint (4 threads, 4 files), serves the load
        // rows of both thread counts.
        std::string ops;
        for (int t : thread_counts) {
          if (peer_dcp) ops += "dcp_save:" + std::to_string(t) + ",";
        }
        if (peer_dcp) ops += kind == "large" ? "dcp_load,dcp_load_cold," : "dcp_load,";
        ops += "torch_save,torch_load";
        std::vector<json> peer_rows;
        timed("peers_s", [&] { peer_rows = torch(kind, ops, bytes); });
        for (const json& r : peer_rows) {
          if (!r.contains("seconds") || r["seconds"].get<double>() <= 0) continue;
          const double gbps = r["bytes"].get<double>() / r["seconds"].get<double>() / 1e9;
          const std::string op = r["op"];
          const std::string t = "/t" + std::to_string(r.value("threads", 1));
          if (op == "dcp_save") s.Add("dcp/save/" + kind + t, gbps);
          if (op == "dcp_load") s.Add("dcp/load/" + kind, gbps);
          if (op == "dcp_load_cold") s.Add("dcp/load_cold/" + kind, gbps);
          if (op == "torch_save") s.Add("torch/save/" + kind, gbps);
          if (op == "torch_load") s.Add("torch/load/" + kind, gbps);
        }
      }
    }
    for (int t : thread_counts) {
      if (!runs("reshard")) break;
      const std::string k = "reshard/t" + std::to_string(t);
      note("round " + std::to_string(round + 1) + ": " + k);
      json sv, ld;
      timed("dcpp_io_s", [&] {
        sv = io("reshard", "save", t, reshard);
        ld = io("reshard", "load", t, reshard);
      });
      if (sv.contains("first_gbps")) {
        s.Add("dcpp/save/" + k + "/first", sv["first_gbps"]);
        s.Add("dcpp/save/" + k + "/later", sv.value("later_gbps", 0.0));
      }
      if (ld.contains("gbps")) {
        s.Add("dcpp/load/" + k, ld["gbps"]);
        s.Add("dcpp/load/" + k + "/rss", ld["peak_rss_bytes"].get<double>());
        s.Add("dcpp/load/" + k + "/before_rss", ld["state_rss_bytes"].get<double>());
        s.Add("dcpp/load/" + k + "/read_ratio",
              ld["bytes_read"].get<double>() / ld["state_bytes"].get<double>());
        s.Add("state/reshard", ld["state_bytes"].get<double>());
      }
      fs::remove_all(dir + "/dcpp_reshard_t" + std::to_string(t) + "_0");
    }
    s.Add("memcpy", MemcpyGbps(large));
  }

  std::vector<json> rows;
  const double mib = 1 << 20;
  for (const std::string kind : {"large", "small"}) {
    if (!runs(kind)) continue;
    const double state = s.Med("state/" + kind);
    for (int t : thread_counts) {
      const std::string k = kind + "/t" + std::to_string(t);
      const double first = s.Med("dcpp/save/" + k + "/first"),
                   later = s.Med("dcpp/save/" + k + "/later");
      const double fio_w = s.Med("fio/write/" + k), dcp = s.Med("dcp/save/" + k);
      const double ts = s.Med("torch/save/" + kind);
      json f = {{"dcpp_first_GBps", first},
                {"dcpp_later_GBps", later},
                {"dcpp_first_cpu_s", s.Med("dcpp/save/" + k + "/cpu")},
                {"dcpp_first_rounds_GBps", s.Rounds("dcpp/save/" + k + "/first")},
                {"dcpp_first_cpu_rounds_s", s.Rounds("dcpp/save/" + k + "/cpu")},
                {"fio_write_rounds_GBps", s.Rounds("fio/write/" + k)},
                {"fio_write_GBps", fio_w},
                {"fio_write_wall_GBps", s.Med("fio/write_wall/" + k)},
                {"fio_direct_write_GBps", s.Med("fio/direct_write/" + k)},
                {"peak_rss_MiB", s.Med("dcpp/save/" + k + "/rss") / mib},
                {"state_MiB", state / mib}};
      bool pass = first > 0 && fio_w > 0 && first >= 0.9 * fio_w;
      std::string target = "first save >= 0.9x fio write (" + std::to_string(t) + " jobs)";
      if (have_peer) {
        f["dcp_GBps"] = dcp;
        f["torch_save_GBps"] = ts;
        pass = pass && dcp > 0 && ts > 0 && first >= 1.2 * dcp && first >= 3 * ts;
        target += ", >= 1.2x DCP (" + std::to_string(t) + " threads), >= 3x torch.save";
      }
      rows.push_back(Row("save/" + k, f, target, pass));
    }
    for (int t : thread_counts) {
      const std::string k = kind + "/t" + std::to_string(t);
      const double g = s.Med("dcpp/load/" + k), raw = s.Med("fio/read/" + k);
      // The load's memory: the peak RSS above the process's RSS once its state was allocated
      // (the program's own code and libraries are not the load's), against 10% of the state.
      const double rss = s.Med("dcpp/load/" + k + "/rss");
      const double before = s.Med("dcpp/load/" + k + "/before_rss");
      json f = {{"dcpp_GBps", g},
                {"dcpp_cpu_s", s.Med("dcpp/load/" + k + "/cpu")},
                {"fio_read_GBps", raw},
                {"peak_rss_MiB", rss / mib},
                {"rss_before_load_MiB", before / mib},
                {"state_MiB", state / mib}};
      bool pass = g > 0 && raw > 0 && g >= 0.9 * raw && rss - before <= 0.1 * state;
      std::string target = ">= 0.9x fio read (" + std::to_string(t) +
                           " jobs), peak RSS <= RSS before the load + 10% of the state";
      if (have_peer) {
        const double dcp = s.Med("dcp/load/" + kind), tl = s.Med("torch/load/" + kind);
        f["dcp_GBps"] = dcp;
        f["torch_load_GBps"] = tl;
        pass = pass && dcp > 0 && tl > 0 && g >= 5 * dcp && g >= 3 * tl;
        target += ", >= 5x DCP, >= 3x torch.load";
      }
      rows.push_back(Row("load/" + k, f, target, pass));
    }
    // Cold loads, as a new job finds a checkpoint: dcpp and DCP with the checkpoint's files
    // dropped from the page cache, against fio's read (fio drops its file's pages too).
    for (int t : thread_counts) {
      if (kind != "large") break;
      const std::string k = kind + "/t" + std::to_string(t);
      const double g = s.Med("dcpp/load_cold/" + k), raw = s.Med("fio/read/" + k);
      json f = {{"dcpp_GBps", g},
                {"fio_read_GBps", raw},
                {"fio_direct_read_GBps", s.Med("fio/direct_read/" + k)}};
      bool pass = g > 0 && raw > 0 && g >= 0.9 * raw;
      std::string target = ">= 0.9x fio read (" + std::to_string(t) + " jobs)";
      if (have_peer) {
        const double dcp = s.Med("dcp/load_cold/" + kind);
        f["dcp_GBps"] = dcp;
        pass = pass && dcp > 0 && g >= dcp;
        target += ", >= DCP's cold load";
      }
      rows.push_back(Row("load-cold/" + k, f, target, pass));
    }
  }
  const double rstate = s.Med("state/reshard");
  for (int t : thread_counts) {
    if (!runs("reshard")) break;
    const std::string k = "reshard/t" + std::to_string(t);
    rows.push_back(Row("save/" + k + " (4 ranks)",
                       {{"dcpp_first_GBps", s.Med("dcpp/save/" + k + "/first")},
                        {"dcpp_later_GBps", s.Med("dcpp/save/" + k + "/later")},
                        {"fio_write_GBps", s.Med("fio/write/large/t4")}},
                       "first save >= 0.9x fio write (4 jobs)",
                       s.Med("fio/write/large/t4") > 0 && s.Med("dcpp/save/" + k + "/first") >=
                                                              0.9 * s.Med("fio/write/large/t4")));
    const double ratio = s.Med("dcpp/load/" + k + "/read_ratio");
    const double rss = s.Med("dcpp/load/" + k + "/rss");
    const double before = s.Med("dcpp/load/" + k + "/before_rss");
    rows.push_back(Row("load/" + k + " (4 -> 3 ranks)",
                       {{"dcpp_GBps", s.Med("dcpp/load/" + k)},
                        {"bytes_read_per_needed", ratio},
                        {"peak_rss_MiB", rss / mib},
                        {"rss_before_load_MiB", before / mib},
                        {"state_MiB", rstate / mib}},
                       "bytes read <= 1.05x bytes needed, peak RSS <= RSS before the load + 10% "
                       "of the state",
                       ratio > 0 && ratio <= 1.05 && rss - before <= 0.1 * rstate));
  }
  rows.push_back(Row("limits/memcpy", {{"GBps", s.Med("memcpy")}}, "measured limit", true));

  // Planning at scale, each size in its own process. The 256- and 1024-rank processes also
  // run the commit (storage data merged, `.metadata` encoded) after the planning figures are
  // taken; its rows follow the planning rows.
  std::vector<std::pair<int, int>> scales =
      args.quick ? std::vector<std::pair<int, int>>{{16, 100}}
                 : std::vector<std::pair<int, int>>{{256, 1000}, {1024, 1000}, {4096, 1000}};
  if (!runs("planning")) scales.clear();
  double per_item_small = 0;
  std::vector<json> commit_rows;
  const double planning_t0 = NowSeconds();
  for (const auto& [ranks, items] : scales) {
    const int load_ranks = ranks == 4096 ? 3072 : ranks * 3 / 4;
    const bool commit = ranks <= 1024;
    note("planning " + std::to_string(ranks) + " x " + std::to_string(items));
    auto out = RunJson(std::string(commit ? "" : "env DCPP_BENCH_NO_COMMIT=1 ") + self +
                           " bench --case planning --ranks " + std::to_string(ranks) + " --items " +
                           std::to_string(items) + " --load-ranks " + std::to_string(load_ranks),
                       300);
    const std::string name = std::to_string(ranks) + "x" + std::to_string(items);
    if (out.empty()) {
      rows.push_back(Row("planning/" + name, json::object(), "ran", false));
      continue;
    }
    json f = out[0]["figures"];
    if (f.contains("commit_metadata_s")) {
      commit_rows.push_back(Row("commit-metadata/" + name,
                                {{"commit_metadata_s", f["commit_metadata_s"]},
                                 {"metadata_MiB", f.value("metadata_MiB", 0.0)},
                                 {"with_commit_rss_MiB", f.value("with_commit_rss_MiB", 0.0)}},
                                "measured (streaming pickle encoder; no target)", true));
      for (const char* k : {"commit_metadata_s", "metadata_MiB", "with_commit_rss_MiB"}) {
        f.erase(k);
      }
    }
    const double t = f.value("global_plan_s", 0.0);
    const double per_item = t / (static_cast<double>(ranks) * items);
    if (per_item_small == 0) per_item_small = per_item;
    bool pass = f.value("plan_cache_hit", false) &&
                f.value("cached_plan_s", 1e9) < f.value("caching_first_plan_s", 0.0);
    std::string target = "plan cache hit faster than planning";
    if (&scales.front() != &scales.back() || args.quick) {
      pass = pass && per_item <= 2.5 * per_item_small;
      target += ", per-item time <= 2.5x the smallest size's (near-linear)";
    }
    if (ranks == 4096) {
      pass = pass && t < 2.0 && f.value("planning_rss_MiB", 1e9) < 1024;
      target += ", global plan < 2 s and < 1 GiB above its input plans";
    }
    rows.push_back(Row("planning/" + name, f, target, pass));
  }
  for (auto& r : commit_rows) rows.push_back(std::move(r));
  phase_s["planning_s"] = NowSeconds() - planning_t0;

  // Rows from other benchmark scripts (bench/*_rows.py), joined as they print them.
  if (!args.quick && runs("rows") && fs::exists(SourceDir() + "/bench")) {
    for (const auto& e : fs::directory_iterator(SourceDir() + "/bench")) {
      const std::string name = e.path().filename().string();
      if (name.size() < 8 || name.substr(name.size() - 8) != "_rows.py") continue;
      note("rows from " + name);
      const double t0 = NowSeconds();
      for (auto& r :
           RunJson(Quote(python) + " " + Quote(e.path().string()) + " --dir " + Quote(dir), 300)) {
        if (r.is_object() && r.contains("case")) rows.push_back(std::move(r));
      }
      phase_s["rows_" + name.substr(0, name.size() - 8) + "_s"] = NowSeconds() - t0;
    }
  }
  fs::remove_all(dir);
  // The whole run against its budget: 10 minutes for the full benchmark on the development
  // machine, each phase's share beside it.
  const double total = NowSeconds() - bench_t0;
  json tf = {{"total_s", total},
             {"rounds", rounds},
             {"peer_rounds", args.peer_rounds},
             {"peer_small_rounds", args.peer_small_rounds},
             {"fio_rounds", args.fio_rounds}};
  if (!args.only.empty()) tf["only"] = args.only;
  for (const auto& [k, v] : phase_s) tf[k] = v;
  rows.push_back(Row("bench/total", tf, args.quick ? "measured" : "total runtime < 600 s",
                     args.quick || total < 600));
  std::cerr << "dcpp bench: total runtime " << Fmt(total) << " s\n";
  if (args.json) {
    std::cout << json(rows).dump(1) << std::endl;
  } else {
    PrintTable(rows);
  }
  return 0;
}

}  // namespace dcpp::cli
