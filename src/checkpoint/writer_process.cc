// Writer process (writer_process.h). One request, parent -> child, on a SOCK_SEQPACKET-like
// framing over a stream socket: u64 length, then the message; the first message after the arena
// changed carries its shm fd as SCM_RIGHTS. Request: arena size, path, writer options, rank,
// use_collectives, encoded plan, then per item: 0 = tensor in the arena (dtype, shape, strides,
// byte offset), 1 = bytes inline. Reply: status, encoded write results.
#include "checkpoint/writer_process.h"

#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/wire.h"

extern char** environ;

namespace dcpp::internal {
namespace {

constexpr int kChildFd = 3;

// Sends all of `bytes`, with `fd` attached to the first byte when fd >= 0.
bool SendAll(int sock, const std::string& bytes, int fd) {
  size_t done = 0;
  while (done < bytes.size()) {
    struct iovec iov {
      const_cast<char*>(bytes.data() + done), bytes.size() - done
    };
    struct msghdr msg {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int))] = {};
    if (fd >= 0 && done == 0) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    // MSG_NOSIGNAL: a dead peer is an error to report, not a SIGPIPE that kills the trainer.
    ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Receives exactly n bytes; a received fd is stored in *fd.
bool RecvAll(int sock, char* out, size_t n, int* fd) {
  size_t done = 0;
  while (done < n) {
    struct iovec iov {
      out + done, n - done
    };
    struct msghdr msg {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int))] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && fd != nullptr) {
        std::memcpy(fd, CMSG_DATA(c), sizeof(int));
      }
    }
    done += static_cast<size_t>(got);
  }
  return true;
}

bool SendMessage(int sock, const std::string& body, int fd) {
  WireWriter w;
  w.U64(body.size());
  return SendAll(sock, w.Release() + body, fd);
}

bool RecvMessage(int sock, std::string* body, int* fd) {
  char head[8];
  if (!RecvAll(sock, head, 8, fd)) return false;
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(head[i])) << (8 * i);
  body->resize(n);
  return n == 0 || RecvAll(sock, body->data(), n, fd);
}

// Where the dcpp_writer binary is: $DCPP_WRITER, beside this executable, or the build tree's.
std::string WriterBinary() {
  if (const char* env = std::getenv("DCPP_WRITER"); env != nullptr && *env) return env;
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    auto beside = self.parent_path() / "dcpp_writer";
    if (std::filesystem::exists(beside, ec)) return beside.string();
  }
#ifdef DCPP_WRITER_DEFAULT
  return DCPP_WRITER_DEFAULT;
#else
  return "dcpp_writer";
#endif
}

// Resolves each item from what the parent sent (the child's stand-in for the caller's planner).
class ReplayPlanner final : public SavePlanner {
 public:
  std::map<std::string, WriteData> data;
  Status SetUp(const StateDict&, bool) override { return Unsupported(); }
  Result<SavePlan> CreateLocalPlan() override { return Unsupported(); }
  Result<std::pair<std::vector<SavePlan>, Metadata>> CreateGlobalPlan(
      std::vector<SavePlan>) override {
    return Unsupported();
  }
  Result<SavePlan> FinishPlan(SavePlan) override { return Unsupported(); }
  Result<WriteData> ResolveData(const WriteItem& item) override {
    auto it = data.find(item.index.ToString());
    if (it == data.end()) {
      return InternalError("writer process: no data for \"" + item.index.ToString() + "\"");
    }
    return it->second;
  }

 private:
  static Status Unsupported() { return InternalError("writer process: only ResolveData"); }
};

}  // namespace

WriterProcess::~WriterProcess() { Stop(); }

void WriterProcess::Stop() {
  if (sock_ >= 0) close(sock_);
  sock_ = -1;
  if (pid_ > 0) {
    // Closing the socket ends the child's loop; reap it so no zombie stays.
    int st = 0;
    waitpid(pid_.load(), &st, 0);
  }
  pid_ = -1;
  sent_arena_ = 0;
}

Status WriterProcess::Start() {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return UnavailableError(std::string("writer process: socketpair: ") + std::strerror(errno));
  }
  const std::string binary = WriterBinary();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, sv[1], kChildFd);  // dup2 clears close-on-exec
  std::string fd_arg = std::to_string(kChildFd);
  char* argv[] = {const_cast<char*>(binary.c_str()), const_cast<char*>("--fd"), fd_arg.data(),
                  nullptr};
  pid_t pid = -1;
  int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  close(sv[1]);
  if (rc != 0) {
    close(sv[0]);
    return UnavailableError("writer process: cannot start \"" + binary +
                            "\": " + std::strerror(rc));
  }
  pid_ = pid;
  sock_ = sv[0];
  return Status::Ok();
}

Status WriterProcess::Died(std::string_view during) {
  std::string how = "exited";
  if (pid_ > 0) {
    int st = 0;
    if (waitpid(pid_.load(), &st, 0) == pid_.load()) {
      if (WIFSIGNALED(st)) {
        how = "was killed by signal " + std::to_string(WTERMSIG(st));
      } else if (WIFEXITED(st)) {
        how = "exited with status " + std::to_string(WEXITSTATUS(st));
      }
    }
  }
  Status s = UnavailableError("writer process " + std::to_string(pid_.load()) + " " + how + " " +
                              std::string(during) + "; nothing was committed");
  pid_ = -1;  // reaped
  Stop();
  return s;
}

Result<std::vector<WriteResult>> WriterProcess::WriteData(
    const std::string& path, const FileSystemWriterOptions& options, int rank, bool use_collectives,
    const SavePlan& plan, SavePlanner& planner, const Stager& arena) {
  if (arena.shm_fd() < 0 && arena.base() != nullptr) {
    return InternalError("writer process: the staging arena is not shared memory");
  }
  if (pid_ > 0) {
    // A child that died while idle is noticed here, and replaced.
    int st = 0;
    if (waitpid(pid_.load(), &st, WNOHANG) == pid_.load()) {
      pid_ = -1;
      Stop();
    }
  }
  if (pid_ <= 0) DCPP_RETURN_IF_ERROR(Start());
  // By id: a new arena may be mapped at the old one's address with its size.
  const bool send_fd = arena.id() != sent_arena_;
  WireWriter w;
  w.U64(arena.capacity());
  w.U64(send_fd ? 1 : 0);
  w.Str(path);
  w.U64(options.single_file_per_rank ? 1 : 0);
  w.U64(static_cast<uint64_t>(options.thread_count));
  w.U64(static_cast<uint64_t>(options.write_parallelism));
  w.U64(options.sync_files ? 1 : 0);
  w.U64(options.overwrite ? 1 : 0);
  w.U64(static_cast<uint64_t>(options.zstd_level));
  w.U64(static_cast<uint64_t>(rank));
  w.U64(use_collectives ? 1 : 0);
  w.Str(EncodeSavePlan(plan));
  w.U64(plan.items.size());
  const std::byte* base = arena.base();
  for (const WriteItem& item : plan.items) {
    DCPP_ASSIGN_OR_RETURN(dcpp::WriteData d, planner.ResolveData(item));
    w.Str(item.index.ToString());
    if (item.type == WriteItemType::kByteIO) {
      w.U64(1);
      w.Str(d.bytes);
      continue;
    }
    const TensorView& t = d.tensor;
    const bool in_arena = base != nullptr && t.is_contiguous() && t.data() >= base &&
                          t.data() + t.nbytes() <= base + arena.capacity();
    if (in_arena) {
      w.U64(0);
      w.U64(static_cast<uint64_t>(t.dtype()));
      w.Dims(t.shape());
      w.U64(static_cast<uint64_t>(t.data() - base));
    } else {
      // Over the staging budget: the bytes travel in the message.
      Tensor copy = Tensor::Zeros(t.dtype(), t.shape());
      DCPP_RETURN_IF_ERROR(CopyTensor(copy.view(), t));
      w.U64(2);
      w.U64(static_cast<uint64_t>(t.dtype()));
      w.Dims(t.shape());
      w.Str(std::string_view(reinterpret_cast<const char*>(copy.data()), copy.nbytes()));
    }
  }
  if (!SendMessage(sock_, w.Release(), send_fd ? arena.shm_fd() : -1)) {
    return Died("before the request reached it");
  }
  sent_arena_ = arena.id();
  std::string reply;
  if (!RecvMessage(sock_, &reply, nullptr)) return Died("while writing");
  WireReader r(reply, "writer process reply");
  Status carried;
  DCPP_RETURN_IF_ERROR(r.ReadStatus(&carried));
  DCPP_RETURN_IF_ERROR(carried);
  DCPP_ASSIGN_OR_RETURN(std::string results, r.Str());
  return DecodeWriteResults(results);
}

namespace {

struct Mapping {
  std::byte* base = nullptr;
  size_t size = 0;
  int fd = -1;
  void Reset(int new_fd, size_t new_size) {
    if (base != nullptr) munmap(base, size);
    if (fd >= 0) close(fd);
    base = nullptr;
    size = 0;
    fd = new_fd;
    if (fd >= 0 && new_size > 0) {
      void* p = mmap(nullptr, new_size, PROT_READ, MAP_SHARED, fd, 0);
      if (p != MAP_FAILED) {
        base = static_cast<std::byte*>(p);
        size = new_size;
      }
    }
  }
};

Result<std::string> Serve(std::string_view request, int fd, Mapping& arena) {
  WireReader r(request, "writer process request");
  DCPP_ASSIGN_OR_RETURN(uint64_t arena_size, r.U64());
  DCPP_ASSIGN_OR_RETURN(uint64_t has_fd, r.U64());
  if (has_fd) arena.Reset(fd, arena_size);
  if (arena_size > 0 && arena.size != arena_size) {
    return InternalError("writer process: cannot map the staging arena");
  }
  DCPP_ASSIGN_OR_RETURN(std::string path, r.Str());
  FileSystemWriterOptions options;
  DCPP_ASSIGN_OR_RETURN(uint64_t v, r.U64());
  options.single_file_per_rank = v != 0;
  DCPP_ASSIGN_OR_RETURN(v, r.U64());
  options.thread_count = static_cast<int>(v);
  DCPP_ASSIGN_OR_RETURN(v, r.U64());
  options.write_parallelism = static_cast<int>(v);
  DCPP_ASSIGN_OR_RETURN(v, r.U64());
  options.sync_files = v != 0;
  DCPP_ASSIGN_OR_RETURN(v, r.U64());
  options.overwrite = v != 0;
  DCPP_ASSIGN_OR_RETURN(v, r.U64());
  options.zstd_level = static_cast<int>(v);
  DCPP_ASSIGN_OR_RETURN(uint64_t rank, r.U64());
  DCPP_ASSIGN_OR_RETURN(uint64_t use_collectives, r.U64());
  DCPP_ASSIGN_OR_RETURN(std::string plan_bytes, r.Str());
  DCPP_ASSIGN_OR_RETURN(SavePlan plan, DecodeSavePlan(plan_bytes));
  DCPP_ASSIGN_OR_RETURN(uint64_t n, r.U64());
  ReplayPlanner planner;
  std::vector<std::string> inline_bytes;  // keeps kind-2 tensors' bytes alive
  inline_bytes.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    DCPP_ASSIGN_OR_RETURN(std::string key, r.Str());
    DCPP_ASSIGN_OR_RETURN(uint64_t kind, r.U64());
    WriteData d;
    if (kind == 1) {
      DCPP_ASSIGN_OR_RETURN(d.bytes, r.Str());
    } else {
      DCPP_ASSIGN_OR_RETURN(uint64_t dtype, r.U64());
      DCPP_ASSIGN_OR_RETURN(Shape shape, r.Dims());
      std::byte* data = nullptr;
      TensorView probe(nullptr, static_cast<DType>(dtype), shape);
      if (kind == 0) {
        DCPP_ASSIGN_OR_RETURN(uint64_t offset, r.U64());
        if (offset > arena.size || arena.size - offset < probe.nbytes()) {
          return InternalError("writer process: item \"" + key + "\" lies outside the arena");
        }
        data = arena.base + offset;
      } else {
        DCPP_ASSIGN_OR_RETURN(std::string bytes, r.Str());
        if (bytes.size() != probe.nbytes()) {
          return InternalError("writer process: item \"" + key + "\" has the wrong size");
        }
        inline_bytes.push_back(std::move(bytes));
        data = reinterpret_cast<std::byte*>(inline_bytes.back().data());
      }
      d.tensor = TensorView(data, static_cast<DType>(dtype), shape);
    }
    planner.data[key] = std::move(d);
  }
  // The parent's writer holds the destination's lock for this save.
  options.guard_destination = false;
  DCPP_ASSIGN_OR_RETURN(auto writer, FileSystemWriter::Open(path, options));
  // Not the coordinator: the parent's writer commits and cleans up.
  DCPP_RETURN_IF_ERROR(writer->SetUp(false, static_cast<int>(rank), use_collectives != 0));
  DCPP_ASSIGN_OR_RETURN(auto results, writer->WriteData(plan, planner));
  return EncodeWriteResults(results);
}

}  // namespace

int RunWriterProcess(int sock) {
  signal(SIGPIPE, SIG_IGN);
  // A writer outlives no trainer: the parent's death ends it too (its socket would as well, but
  // only once a request is pending).
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  Mapping arena;
  for (;;) {
    std::string request;
    int fd = -1;
    if (!RecvMessage(sock, &request, &fd)) return 0;  // the parent closed: done
    // Tests kill the writer in the middle of a save: it then holds every request unanswered.
    if (std::getenv("DCPP_WRITER_STALL_FOR_TESTING") != nullptr) {
      for (;;) pause();
    }
    Result<std::string> out = Serve(request, fd, arena);
    WireWriter w;
    w.Status(out.status());
    w.Str(out.ok() ? *out : std::string());
    if (!SendMessage(sock, w.Release(), -1)) return 1;
  }
}

}  // namespace dcpp::internal
