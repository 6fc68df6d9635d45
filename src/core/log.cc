#include "core/log.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace dcpp::internal {

LogLevel CurrentLogLevel() {
  static const LogLevel level = [] {
    const char* v = std::getenv("DCPP_LOG");
    if (!v) return LogLevel::kOff;
    if (std::strcmp(v, "debug") == 0) return LogLevel::kDebug;
    if (std::strcmp(v, "info") == 0) return LogLevel::kInfo;
    return LogLevel::kOff;
  }();
  return level;
}

void LogLine(LogLevel level, std::string_view event, std::string_view fields) {
  if (CurrentLogLevel() < level) return;
  static std::mutex mu;
  std::string line = "dcpp level=";
  line += level == LogLevel::kDebug ? "debug" : "info";
  line += " event=";
  line += event;
  if (!fields.empty()) {
    line += ' ';
    line += fields;
  }
  line += '\n';
  std::lock_guard<std::mutex> lock(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

void PhaseTimer::Add(std::string_view key, std::string_view value) {
  if (!fields_.empty()) fields_ += ' ';
  fields_ += key;
  fields_ += '=';
  fields_ += value;
}

double PhaseTimer::ElapsedMs() const {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
      .count();
}

PhaseTimer::~PhaseTimer() {
  if (CurrentLogLevel() < LogLevel::kInfo) return;
  char ms[32];
  std::snprintf(ms, sizeof ms, "ms=%.3f", ElapsedMs());
  std::string f = fields_.empty() ? std::string(ms) : fields_ + " " + ms;
  LogLine(LogLevel::kInfo, event_, f);
}

}  // namespace dcpp::internal
