/* lazykv native runtime: a C ABI over lazykv::Program and lazykv::Session.
 *
 * What Python's `lazykv.runtime_shim.native_runtime` loads with ctypes, and what any
 * language with a C FFI can use. Every function returns 0 or an lazykv::ErrorKind code;
 * `lkv_last_error()` holds the message of the calling thread's last failure.
 * Loaded into a Python process that already imported ExecuTorch's runtime, it shares
 * that process's libexecutorch.so, so the kernels and delegates registered there are
 * the ones it runs with.
 */
#ifndef LAZYKV_C_API_H
#define LAZYKV_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LKV_ABI_VERSION 2
#define LKV_MAX_DIMS 16

typedef struct lkv_program lkv_program;
typedef struct lkv_session lkv_session;

/* A tensor handed across the ABI: caller-owned contiguous data. */
typedef struct lkv_tensor {
  void* data;
  int32_t scalar_type; /* executorch ScalarType code (4 = int64, 6 = float32, ...) */
  int32_t dim;
  int64_t sizes[LKV_MAX_DIMS];
} lkv_tensor;

int lkv_abi_version(void);
const char* lkv_last_error(void);

/* policy: "doubling", "step:256", ... ; max_bytes -1 = none; weight_cache -1/0/1. */
int lkv_program_load(const char* path, const char* policy, int64_t max_bytes, int weight_cache, lkv_program** out);
void lkv_program_free(lkv_program* program);
/* The manifest JSON (NUL-terminated; "" without one), valid while the program lives. */
const char* lkv_program_manifest(const lkv_program* program);
int64_t lkv_program_region_bytes(const lkv_program* program);
int lkv_program_load_method(lkv_program* program, const char* method);
/* sha256 of the program file into out (65 bytes). */
int lkv_program_digest(lkv_program* program, char* out);

int lkv_session_new(lkv_program* program, lkv_session** out);
int lkv_session_restore(lkv_program* program, const char* path, lkv_session** out);
void lkv_session_free(lkv_session* session);
/* Run `method` on n user inputs (tensors only). The outputs stay readable through
 * lkv_session_output until the next run of any session of the program. */
int lkv_session_run(lkv_session* session, const char* method, const lkv_tensor* inputs, int32_t n,
                    int32_t* n_outputs);
/* Output i: shape and dtype into *out (data points into the program's memory). */
int lkv_session_output(lkv_session* session, int32_t i, lkv_tensor* out);
/* KV bytes as `lazykv inspect` counts them: planned (static caches, held from load on,
 * shared by the sessions) and every cache at its bound. */
int lkv_program_kv_figures(const lkv_program* program, int64_t* planned_bytes, int64_t* at_max_context);
/* A copy of the session's first `positions` filled positions (-1: all) in a new session. */
int lkv_session_fork(lkv_session* session, int64_t positions, lkv_session** out);
/* int64[12]: current, peak, grow_events, shrink, copied, filled, capacity, max_positions,
 * bytes_per_position, allocations, frees, grows. */
int lkv_session_stats(lkv_session* session, int64_t* out);
int lkv_session_trim(lkv_session* session, int64_t n, int64_t* freed_positions, int64_t* freed_bytes);
int lkv_session_reset(lkv_session* session, int64_t* freed_positions, int64_t* freed_bytes);
int lkv_session_save(lkv_session* session, const char* path, int64_t* bytes_written);

#ifdef __cplusplus
}
#endif

#endif /* LAZYKV_C_API_H */
