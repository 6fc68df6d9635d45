// The writer process of AsyncExecutor::kProcess (internal to AsyncSave).
//
// A long-lived child (the small `dcpp_writer` binary, started with posix_spawn) that writes a
// rank's items: the save thread sends it, over a Unix socket, the final plan, the writer options
// and where each item's bytes lie in the staging arena, whose shared-memory fd travels with the
// message (SCM_RIGHTS) whenever the arena changed. The child maps the arena and runs the ordinary
// FileSystemWriter::WriteData over it, so staged bytes reach the files without another copy and
// without the trainer's threads or allocator; it answers with the write results.
//
// If the child dies, the request fails with Unavailable naming its pid and signal; the parent
// never commits such a save, and the next request starts a new child.
//
// Thread-safety: a WriterProcess is used by one save thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <string>
#include <vector>

#include "checkpoint/staging.h"
#include "dcpp/layout.h"

namespace dcpp::internal {

class WriterProcess {
 public:
  WriterProcess() = default;
  ~WriterProcess();
  WriterProcess(const WriterProcess&) = delete;
  WriterProcess& operator=(const WriterProcess&) = delete;

  // Writes `plan` (resolved through `planner`, whose tensors lie in `arena` unless noted) into
  // the checkpoint directory `path` as rank `rank`, in the child.
  Result<std::vector<WriteResult>> WriteData(const std::string& path,
                                             const FileSystemWriterOptions& options, int rank,
                                             bool use_collectives, const SavePlan& plan,
                                             SavePlanner& planner, const Stager& arena);

  pid_t pid() const { return pid_.load(); }
  // Ends the child (the next request starts a new one).
  void Stop();

 private:
  Status Start();
  Status Died(std::string_view during);

  std::atomic<pid_t> pid_{-1};  // read by tests from other threads
  int sock_ = -1;
  uint64_t sent_arena_ = 0;  // Stager::id() of the arena the child has mapped
};

// The child's loop: serves requests on `sock` until it closes. Returns the exit code.
int RunWriterProcess(int sock);

}  // namespace dcpp::internal
