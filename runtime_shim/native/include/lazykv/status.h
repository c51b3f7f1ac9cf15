// lazykv native runtime: errors as values.
//
// Every public call returns a `Status` or a `Result<T>`; nothing in lazykv throws
// across its API or aborts the process. The kinds mirror the Python shim's exception
// classes (`lazykv.errors`), and every message names the problem and the fix.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace lazykv {

/// What went wrong; the same families as `lazykv.errors` in Python.
enum class ErrorKind : int {
  Ok = 0,
  InvalidProgram = 1,        ///< unreadable, truncated or corrupt `.pte`
  ManifestError = 2,         ///< the lazykv manifest is foreign, newer or inconsistent
  ProgramRejected = 3,       ///< ExecuTorch refused the program or a method at load
  InvalidInput = 4,          ///< shape, dtype, token id, position the runtime would mishandle
  UnknownMethod = 5,         ///< no method by that name
  ContextOverflow = 6,       ///< positions past the exported bound
  MemoryBudgetExceeded = 7,  ///< growth past `max_bytes`
  AllocationFailed = 8,      ///< out of memory while growing KV storage
  ExecutionFailed = 9,       ///< ExecuTorch reported an error while running a method
  SessionClosed = 10,        ///< a closed session was used
  SessionFileError = 11,     ///< a truncated, corrupt or foreign saved session
  PolicyError = 12,          ///< a growth policy string that cannot be used
  IoError = 13,              ///< a file could not be opened, read or written
};

/// The Python class name of a kind ("InvalidInput", ...).
const char* error_kind_name(ErrorKind kind);

/// Ok, or an error kind with a message (and ExecuTorch's error code when it has one).
class Status {
 public:
  Status() = default;
  Status(ErrorKind kind, std::string message, int et_error = 0)
      : kind_(kind), message_(std::move(message)), et_error_(et_error) {}

  static Status ok_status() { return Status(); }
  bool ok() const { return kind_ == ErrorKind::Ok; }
  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return message_; }
  /// `executorch::runtime::Error` code behind a ProgramRejected/ExecutionFailed, else 0.
  int et_error() const { return et_error_; }
  /// "Kind: message".
  std::string to_string() const;

 private:
  ErrorKind kind_ = ErrorKind::Ok;
  std::string message_;
  int et_error_ = 0;
};

/// A value or the Status saying why there is none.
template <typename T>
class Result {
 public:
  Result(T value) : ok_(true), value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : ok_(false), status_(std::move(status)) {  // NOLINT
    if (status_.ok()) {
      status_ = Status(ErrorKind::InvalidInput, "lazykv bug: an error Result made from Ok");
    }
  }
  bool ok() const { return ok_; }
  const Status& status() const { return status_; }
  /// The value; only call when ok().
  T& get() { return value_; }
  const T& get() const { return value_; }
  T* operator->() { return &value_; }
  const T* operator->() const { return &value_; }
  T& operator*() { return value_; }

 private:
  bool ok_;
  T value_{};
  Status status_;
};

}  // namespace lazykv
