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

#define LKV_ABI_VERSION 3
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
/* ExecuTorch's error code (runtime/core/error.h) behind the calling thread's last
 * failure, 0 when ExecuTorch did not report one. */
int lkv_last_et_error(void);

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

/* -- Raw programs: the caller owns the KV storage and binds every input ------------------
 * What Python's `lazykv.runtime_shim` runs on (runtime_shim/native_runtime.py, RawProgram):
 * the program is read and rebound in memory as by lkv_program_load, but no session
 * exists; the caller passes every input of a method (its own inputs, then its KV
 * tensors) and checks them first (a tensor of the right element count and a wrong
 * shape aborts inside ExecuTorch). No method loads here, and XNNPACK's weight cache is
 * the process-wide option (`set_option`), as for ExecuTorch's own Python runtime.
 * After a raw call fails, lkv_last_error() holds the message alone (the return code is
 * its kind). */
typedef struct lkv_raw_program lkv_raw_program;
typedef struct lkv_raw_method lkv_raw_method;

#define LKV_VALUE_NONE 0
#define LKV_VALUE_TENSOR 1
#define LKV_VALUE_INT 2
#define LKV_VALUE_DOUBLE 3
#define LKV_VALUE_BOOL 4

/* One method input or output (an EValue). A tensor is contiguous; an input's data is
 * the caller's, an output's points into the program's memory. */
typedef struct lkv_value {
  int32_t kind;        /* LKV_VALUE_* */
  int32_t scalar_type; /* tensors: executorch ScalarType code */
  int32_t dim;         /* tensors */
  int32_t reserved;
  void* data;          /* tensors */
  int64_t i;           /* ints and bools (0/1) */
  double d;            /* doubles */
  int64_t sizes[LKV_MAX_DIMS];
} lkv_value;

/* The file `path`, or (path NULL) `size` bytes at `data`, which the caller keeps alive
 * and unchanged while the program lives (segments are read in place). `name` stands for
 * the program in messages (NULL: path). */
int lkv_raw_program_load(const char* path, const void* data, int64_t size, const char* name, lkv_raw_program** out);
void lkv_raw_program_free(lkv_raw_program* program);
/* Method `name`, loaded on the first call (then the same handle); owned by the program.
 * *n_inputs: the inputs it takes (the user's, then the rebound KV buffers). */
int lkv_raw_method_load(lkv_raw_program* program, const char* name, lkv_raw_method** out, int32_t* n_inputs);
/* Set the method's n inputs and execute it. An input the program does not plan (a
 * rebound KV buffer) is aliased, not copied, and set again only when its data pointer,
 * dtype or shape changes; planned inputs are copied in on every call. On return
 * outputs[0..min(*n_outputs, max_outputs)) describe the outputs: tensor data valid
 * until the next execute of any method of this program. One call at a time per
 * program (the caller serialises). */
int lkv_raw_execute(lkv_raw_method* method, const lkv_value* inputs, int32_t n, lkv_value* outputs,
                    int32_t max_outputs, int32_t* n_outputs);

#ifdef __cplusplus
}
#endif

#endif /* LAZYKV_C_API_H */
