// Status and Result<T>: how every fallible dcpp call reports failure.
//
// A Status is a code plus a message; an OK status carries no allocation. The codes are chosen by
// what the caller should do next (see docs/errors.md):
//   kUnavailable        transient I/O trouble: retry the same call;
//   kAborted            another rank failed: retry the whole save/load;
//   kFailedPrecondition state must be fixed first (e.g. checkpoint exists and overwrite=false);
//   kDataLoss           bytes are corrupt, truncated or fail a checksum;
//   kInvalidArgument    the caller passed something wrong (shape mismatch, bad key);
//   kNotFound           a file or key is absent; kUnimplemented; kInternal (a dcpp bug).
// Messages name things, outermost context first: `rank 3: saving "step_100": writing
// "__3_0.distcp": No space left on device`. Layers add context with Status::WithContext.
//
// Result<T> holds either a T or a non-OK Status. Library code propagates with DCPP_RETURN_IF_ERROR
// and DCPP_ASSIGN_OR_RETURN; no exception crosses a library boundary. At the edge (CLI, tests)
// Result::value() / Status::ThrowIfError() throw dcpp::StatusError.
//
// Thread-safety: values; distinct objects may be used from any thread.
#pragma once

#include <memory>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace dcpp {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 3,
  kNotFound = 5,
  kFailedPrecondition = 9,
  kAborted = 10,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message);

  static Status Ok() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  std::string_view message() const { return rep_ ? std::string_view(rep_->message) : ""; }

  // "CODE: message", or "OK".
  std::string ToString() const;

  // Returns a copy whose message is `context + ": " + message()`. OK stays OK.
  Status WithContext(std::string_view context) const;

  // Throws StatusError if not OK. For the CLI and tests only.
  void ThrowIfError() const;

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::shared_ptr<const Rep> rep_;  // null when OK; immutable so copies may share it
};

std::ostream& operator<<(std::ostream& os, const Status& s);

// Convenience constructors; each takes the message.
Status InvalidArgumentError(std::string message);
Status NotFoundError(std::string message);
Status FailedPreconditionError(std::string message);
Status AbortedError(std::string message);
Status UnimplementedError(std::string message);
Status InternalError(std::string message);
Status UnavailableError(std::string message);
Status DataLossError(std::string message);

// Status from errno after a failed POSIX call: ENOENT → NotFound, ENOSPC/EIO → Unavailable, ...
Status ErrnoToStatus(int err, std::string_view context);

// Thrown only at the edge (Result::value(), Status::ThrowIfError()).
class StatusError : public std::runtime_error {
 public:
  explicit StatusError(Status status)
      : std::runtime_error(status.ToString()), status_(std::move(status)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

template <typename T>
class [[nodiscard]] Result {
  static_assert(!std::is_same_v<std::decay_t<T>, Status>, "Result<Status> is not meaningful");

 public:
  // Implicit from a value or from a non-OK status, so `return value;` and `return status;` work.
  Result(const T& value) : value_(value) {}        // NOLINT
  Result(T&& value) : value_(std::move(value)) {}  // NOLINT
  template <typename U, typename = std::enable_if_t<std::is_constructible_v<T, U&&> &&
                                                    !std::is_same_v<std::decay_t<U>, Status> &&
                                                    !std::is_same_v<std::decay_t<U>, Result>>>
  Result(U&& value) : value_(std::forward<U>(value)) {}  // NOLINT
  Result(Status status) : status_(std::move(status)) {   // NOLINT
    if (status_.ok()) status_ = InternalError("Result constructed from an OK Status");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const& {
    static const Status kOk;
    return ok() ? kOk : status_;
  }
  Status status() && { return ok() ? Status() : std::move(status_); }

  // Throw StatusError when not OK.
  T& value() & {
    Check();
    return *value_;
  }
  const T& value() const& {
    Check();
    return *value_;
  }
  T&& value() && {
    Check();
    return std::move(*value_);
  }

  // Unchecked access: the caller has tested ok().
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }
  T&& operator*() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }

  T value_or(T fallback) const& { return ok() ? *value_ : std::move(fallback); }

 private:
  void Check() const {
    if (!ok()) throw StatusError(status_);
  }
  std::optional<T> value_;
  Status status_;
};

namespace internal {
inline Status AsStatus(const Status& s) { return s; }
inline Status AsStatus(Status&& s) { return std::move(s); }
template <typename T>
Status AsStatus(const Result<T>& r) {
  return r.status();
}
}  // namespace internal

}  // namespace dcpp

#define DCPP_CONCAT_INNER_(a, b) a##b
#define DCPP_CONCAT_(a, b) DCPP_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` (a Status or Result) is not OK.
#define DCPP_RETURN_IF_ERROR(expr)                                    \
  do {                                                                \
    ::dcpp::Status dcpp_status_ = ::dcpp::internal::AsStatus((expr)); \
    if (!dcpp_status_.ok()) return dcpp_status_;                      \
  } while (0)

// `DCPP_ASSIGN_OR_RETURN(auto x, F());` declares x from F()'s value or returns its status.
#define DCPP_ASSIGN_OR_RETURN(lhs, expr) \
  DCPP_ASSIGN_OR_RETURN_IMPL_(DCPP_CONCAT_(dcpp_result_, __LINE__), lhs, expr)
#define DCPP_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return std::move(tmp).status();    \
  lhs = std::move(*tmp)
