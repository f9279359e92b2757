// Status and Result<T>: errors as values, in the style of LevelDB's Status.
//
// An OK Status is one null pointer, so returning success costs nothing. An error
// carries a code and a message that tells the user what to do next.
// Thread-safety: a Status/Result is a value; distinct objects may be used from
// distinct threads freely, one object needs external synchronisation.
#pragma once

#include <cassert>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>

namespace tutel {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kNotFound = 2,
  kAlreadyExists = 3,
  kOutOfRange = 4,
  kCorruption = 5,
  kIOError = 6,
  kUnavailable = 7,
  kPermissionDenied = 8,
  kResourceExhausted = 9,
  kUnimplemented = 10,
  kInternal = 11,
  kTimeout = 12,
  kAborted = 13,
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;
  Status(StatusCode code, std::string message);
  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
  static Status Corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status IOError(std::string m) { return {StatusCode::kIOError, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status PermissionDenied(std::string m) { return {StatusCode::kPermissionDenied, std::move(m)}; }
  static Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
  static Status Unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
  static Status Timeout(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
  static Status Aborted(std::string m) { return {StatusCode::kAborted, std::move(m)}; }

  bool ok() const noexcept { return state_ == nullptr; }
  StatusCode code() const noexcept { return state_ ? state_->code : StatusCode::kOk; }
  // The message without the code; empty for OK.
  std::string_view message() const noexcept;
  // "InvalidArgument: <message>", or "OK".
  std::string to_string() const;

  // Returns a copy whose message is "<context>: <message>"; OK stays OK.
  Status with_context(std::string_view context) const;

 private:
  struct State {
    StatusCode code;
    std::string message;
  };
  std::unique_ptr<State> state_;
};

std::ostream& operator<<(std::ostream& os, const Status& s);

// A value or an error. Accessing the value of an error Result is a broken invariant.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : status_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    assert(!status_.ok() && "a Result built from a Status must hold an error");
    // Release builds too: an OK Result without a value would hand out an empty optional.
    if (status_.ok()) status_ = Status::Internal("a Result was made from an OK Status, without a value");
  }

  bool ok() const noexcept { return status_.ok(); }
  const Status& status() const& noexcept { return status_; }
  Status status() && noexcept { return std::move(status_); }

  T& value() & { assert(ok()); return *value_; }
  const T& value() const& { assert(ok()); return *value_; }
  T&& value() && { assert(ok()); return std::move(*value_); }
  T* operator->() { assert(ok()); return &*value_; }
  const T* operator->() const { assert(ok()); return &*value_; }
  T& operator*() & { assert(ok()); return *value_; }
  const T& operator*() const& { assert(ok()); return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace tutel

#define TUTEL_STATUS_CONCAT_INNER(a, b) a##b
#define TUTEL_STATUS_CONCAT(a, b) TUTEL_STATUS_CONCAT_INNER(a, b)

// Returns early from the enclosing function with the error of `expr`.
#define TUTEL_RETURN_IF_ERROR(expr)                  \
  do {                                               \
    ::tutel::Status _tutel_status = (expr);          \
    if (!_tutel_status.ok()) return _tutel_status;   \
  } while (0)

// `TUTEL_ASSIGN_OR_RETURN(auto x, f())`: binds the value or returns the error.
#define TUTEL_ASSIGN_OR_RETURN(lhs, expr) \
  TUTEL_ASSIGN_OR_RETURN_IMPL(TUTEL_STATUS_CONCAT(_tutel_result_, __LINE__), lhs, expr)
#define TUTEL_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return std::move(tmp).status();    \
  lhs = std::move(tmp).value()
