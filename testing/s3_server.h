// Local S3-compatible servers for tests, each on a free loopback port: moto's server mode (in
// memory), `rclone serve s3` (gofakes3 over a directory of files: a second implementation, with
// its own answers where S3 leaves room, such as 200 for ranged GETs), and a fault-injecting proxy
// (testing/s3_fault_proxy.py) in front of either.
//
// Each server is a child process started by the test and killed and reaped when its object is
// destroyed (rclone's directory is removed then too); startup waits at most 60 s for the port to
// answer. Killing moto loses its objects, so "the server dies mid-save" is the proxy dying while
// moto keeps the last good checkpoint.
//
// Thread-safety: construct, use and destroy from one thread; S3Options may be shared.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "dcpp/s3_store.h"
#include "dcpp/status.h"

namespace dcpp::testing {

// A child process with its output in a log file (kept for failure messages).
class ChildProcess {
 public:
  static Result<std::unique_ptr<ChildProcess>> Spawn(const std::vector<std::string>& argv,
                                                     const std::string& log_path);
  ~ChildProcess();  // SIGKILL and reap
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  bool Running();
  // SIGKILL now and reap.
  void Kill();
  // The last bytes of the log.
  std::string LogTail() const;

 private:
  ChildProcess(pid_t pid, std::string log) : pid_(pid), log_(std::move(log)) {}
  pid_t pid_;
  std::string log_;
};

enum class S3ServerKind { kMoto, kRclone };

// An S3 server on 127.0.0.1.
class S3TestServer {
 public:
  static Result<std::unique_ptr<S3TestServer>> Start(S3ServerKind kind = S3ServerKind::kMoto);
  ~S3TestServer();

  int port() const { return port_; }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  // Options for stores on this server: its endpoint, dummy credentials, small parts (5 MiB) so
  // multipart paths run on small data, and short retries.
  S3Options Options() const;
  ChildProcess& process() { return *process_; }

 private:
  int port_ = 0;
  std::unique_ptr<ChildProcess> process_;
  std::string dir_;  // rclone's objects
};

// testing/s3_fault_proxy.py in front of `upstream_port`; `args` are its fault options.
class S3FaultProxy {
 public:
  static Result<std::unique_ptr<S3FaultProxy>> Start(int upstream_port,
                                                     const std::vector<std::string>& args);
  int port() const { return port_; }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  ChildProcess& process() { return *process_; }

 private:
  int port_ = 0;
  std::unique_ptr<ChildProcess> process_;
};

// One server of each kind for the whole test process, started on first use (a test fails and
// the process aborts if it cannot start) and killed at exit.
S3TestServer& SharedS3TestServer(S3ServerKind kind = S3ServerKind::kMoto);

// A bucket name unique within this process: "dcpp-test-<pid>-<n>".
std::string UniqueBucket();

// The directory of scripts/setup's venv binaries (moto_server, rclone, python).
std::string VenvBin();

}  // namespace dcpp::testing
