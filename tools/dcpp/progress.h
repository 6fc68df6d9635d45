// A one-line progress bar on stderr, drawn only when stderr is a terminal.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace dcpp::cli {

class ProgressBar {
 public:
  explicit ProgressBar(std::string label)
      : label_(std::move(label)),
        enabled_(isatty(STDERR_FILENO) != 0),
        start_(std::chrono::steady_clock::now()) {}
  ~ProgressBar() {
    if (enabled_ && drawn_) std::fputc('\n', stderr);
  }
  void Update(int64_t done, int64_t total) {
    if (!enabled_ || total <= 0) return;
    const double frac = static_cast<double>(done) / static_cast<double>(total);
    const int width = 30, filled = static_cast<int>(frac * width);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::string bar(filled, '=');
    if (filled < width) bar += '>' + std::string(width - filled - 1, ' ');
    std::fprintf(stderr, "\r%s [%s] %3.0f%% %.2f/%.2f GB %.2f GB/s", label_.c_str(), bar.c_str(),
                 frac * 100, done / 1e9, total / 1e9, secs > 0 ? done / 1e9 / secs : 0.0);
    drawn_ = true;
  }

 private:
  std::string label_;
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace dcpp::cli
