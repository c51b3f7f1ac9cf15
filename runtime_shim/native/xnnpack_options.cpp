// lazykv native helper: backend options of the ExecuTorch runtime, through a C ABI.
//
// ExecuTorch's Python runtime has no binding for `executorch::runtime::set_option` /
// `get_option` (runtime/backend/interface.h); the wheel's libexecutorch.so exports them.
// This file wraps them in four C functions that `weight_cache.py` loads with ctypes.
// Python must import `executorch.runtime` first so that libexecutorch.so (and the
// backends registered in it) is already in the process: the loader then resolves this
// library's DT_NEEDED entry to that same copy, whatever the RUNPATH says.
//
// Every function returns an `executorch::runtime::Error` code (0 = Ok).

#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>

#include <cstring>
#include <variant>

#ifndef LAZYKV_EXECUTORCH_VERSION
#define LAZYKV_EXECUTORCH_VERSION "unknown"
#endif

namespace {

using executorch::runtime::BackendOption;
using executorch::runtime::Error;
using executorch::runtime::Span;

constexpr int kAbiVersion = 1;

// Copies `key` into an option; false if it does not fit.
bool make_option(const char* key, BackendOption& option) {
  if (key == nullptr) {
    return false;
  }
  const size_t len = std::strlen(key);
  if (len == 0 || len >= executorch::runtime::kMaxOptionKeyLength) {
    return false;
  }
  std::memcpy(option.key, key, len + 1);
  return true;
}

int set_one(const char* backend, BackendOption& option) {
  if (backend == nullptr) {
    return static_cast<int>(Error::InvalidArgument);
  }
  return static_cast<int>(
      executorch::runtime::set_option(backend, Span<BackendOption>(&option, 1)));
}

// Reads one option; the value keeps its sentinel type if the backend does not fill it.
int get_one(const char* backend, BackendOption& option) {
  if (backend == nullptr) {
    return static_cast<int>(Error::InvalidArgument);
  }
  return static_cast<int>(
      executorch::runtime::get_option(backend, Span<BackendOption>(&option, 1)));
}

} // namespace

extern "C" {

// Layout version of this C ABI; the Python loader refuses a library it does not know.
__attribute__((visibility("default"))) int lazykv_native_abi_version() {
  return kAbiVersion;
}

// The `executorch` version whose headers this library was compiled against.
__attribute__((visibility("default"))) const char* lazykv_native_executorch_version() {
  return LAZYKV_EXECUTORCH_VERSION;
}

// set_option(backend, {key: value != 0}) with a bool value.
__attribute__((visibility("default"))) int lazykv_set_bool_option(
    const char* backend, const char* key, int value) {
  BackendOption option;
  if (!make_option(key, option)) {
    return static_cast<int>(Error::InvalidArgument);
  }
  option.value = (value != 0);
  return set_one(backend, option);
}

// get_option(backend, {key}) expecting a bool; *out is 0 or 1. InvalidType if the
// backend left the value unset or stored another type.
__attribute__((visibility("default"))) int lazykv_get_bool_option(
    const char* backend, const char* key, int* out) {
  BackendOption option;
  if (out == nullptr || !make_option(key, option)) {
    return static_cast<int>(Error::InvalidArgument);
  }
  option.value = -1; // sentinel of the wrong type: a filled bool replaces it
  const int err = get_one(backend, option);
  if (err != 0) {
    return err;
  }
  const bool* value = std::get_if<bool>(&option.value);
  if (value == nullptr) {
    return static_cast<int>(Error::InvalidType);
  }
  *out = *value ? 1 : 0;
  return 0;
}

// set_option(backend, {key: value}) with an int value.
__attribute__((visibility("default"))) int lazykv_set_int_option(
    const char* backend, const char* key, int value) {
  BackendOption option;
  if (!make_option(key, option)) {
    return static_cast<int>(Error::InvalidArgument);
  }
  option.value = value;
  return set_one(backend, option);
}

// get_option(backend, {key}) expecting an int. InvalidType if not filled with an int.
__attribute__((visibility("default"))) int lazykv_get_int_option(
    const char* backend, const char* key, int* out) {
  BackendOption option;
  if (out == nullptr || !make_option(key, option)) {
    return static_cast<int>(Error::InvalidArgument);
  }
  option.value = false; // sentinel of the wrong type
  const int err = get_one(backend, option);
  if (err != 0) {
    return err;
  }
  const int* value = std::get_if<int>(&option.value);
  if (value == nullptr) {
    return static_cast<int>(Error::InvalidType);
  }
  *out = *value;
  return 0;
}

} // extern "C"
