// Lent writes: a sink that can write from memory it borrows, so the caller goes on filling other
// buffers while the device takes this one (a local file in direct I/O, through io_uring).
//
// A writer that gathers small records into buffers of its own (HashingSink) hands each full one
// over with WriteLent and takes it back once Settle says the sink is done with it. Without this,
// the writer's one write at a time bounds a one-file save: the device's one-job direct write ran
// faster at two writes in flight than at one (see storage/posix_io.h).
//
// Invariants: lent writes land at the sink's position in the order they were lent, exactly as
// Write would put them; a lent buffer is neither written to nor freed by the caller until a
// Settle covers it. Settle(k) returns once every lent write but the newest k is complete, so the
// caller recycles buffers oldest first. Any other call on the sink (Write, a sync, a close)
// first completes every lent write. Errors are sticky, like the sink's own: after one, calls
// that would write fail at once, while Settle and a close still wait for what is in flight.
//
// Thread-safety: as the sink's (one thread at a time).
#pragma once

#include <cstddef>

#include "dcpp/status.h"

namespace dcpp::internal {

class LentWrites {
 public:
  virtual ~LentWrites() = default;
  // Writes [data, data + n) at the sink's position, possibly after returning. A sink that cannot
  // write this buffer so (misaligned, no ring) writes it before it returns. On error the buffer
  // was not kept.
  virtual Status WriteLent(const void* data, size_t n) = 0;
  // Waits until at most the `keep` newest lent writes are still in flight; returns the sink's
  // first error. Only if the sink cannot wait any more (its ring failed) do more stay in flight.
  virtual Status Settle(size_t keep) = 0;
  // Lent writes not known complete.
  virtual size_t lent_in_flight() const = 0;
  // How many lent writes the sink keeps in flight at most; WriteLent settles down to it. 0 while
  // the sink would write every lent buffer before returning (a caller then does better writing
  // from a thread of its own).
  virtual size_t lent_depth() const = 0;
};

}  // namespace dcpp::internal
