// Structured log lines on stderr, enabled by DCPP_LOG=info (or debug).
//
//   dcpp level=info event=save.write rank=1 ms=12.5 bytes=1048576 path="/ckpt"
//
// Thread-safety: lines are written whole under a lock.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

namespace dcpp::internal {

enum class LogLevel { kOff = 0, kInfo = 1, kDebug = 2 };

LogLevel CurrentLogLevel();  // from DCPP_LOG, read once
void LogLine(LogLevel level, std::string_view event, std::string_view fields);

// Times a phase and logs `event` with its duration when destroyed (if logging is on).
class PhaseTimer {
 public:
  PhaseTimer(std::string event, std::string fields)
      : event_(std::move(event)),
        fields_(std::move(fields)),
        start_(std::chrono::steady_clock::now()) {}
  ~PhaseTimer();
  void Add(std::string_view key, std::string_view value);
  double ElapsedMs() const;

 private:
  std::string event_;
  std::string fields_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace dcpp::internal
