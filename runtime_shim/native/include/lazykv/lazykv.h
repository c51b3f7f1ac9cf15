// lazykv native runtime: run lazy-KV `.pte` programs on an unmodified ExecuTorch.
//
//   auto program = lazykv::Program::load("model.pte", {});   // KV bytes at load: 0
//   auto session = program.get()->session();
//   auto out = session.get()->run("forward", {tokens, input_pos});  // KV grows as needed
//
// `Program::load` rebinds the lazy KV buffers in memory (each DYNAMIC_UNBOUND tensor
// becomes a DYNAMIC_BOUND input with no allocation, as the Python shim does) through a
// DataLoader that serves the patched program flatbuffer and maps every segment read to
// the original file: no copy on disk, none in anonymous memory. A `Session` owns one
// conversation's KV storage, grown by a policy and bound to the method's inputs.
// See docs/cpp.md.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <executorch/runtime/core/evalue.h>

#include <lazykv/policy.h>
#include <lazykv/status.h>

namespace executorch {
namespace ET_RUNTIME_NAMESPACE {
class Method;
}  // namespace ET_RUNTIME_NAMESPACE
}  // namespace executorch

namespace lazykv {

/// One lazy KV buffer of the manifest (see docs/format.md).
struct LazyBuffer {
  std::string fqn;
  std::string dtype;          ///< manifest name: float32, bfloat16, ...
  int scalar_type = 6;        ///< executorch ScalarType code of `dtype`
  std::vector<int64_t> max_shape;
  int growth_axis = 1;
  std::vector<std::string> methods;

  int64_t element_size() const;
  int64_t bytes_per_position() const;
  int64_t max_positions() const { return max_shape[growth_axis]; }
  std::vector<int64_t> shape_at(int64_t positions) const;
};

/// positions after a call = inputs[position_input].flat[position_index]
///                         + inputs[length_input].size(length_axis)
struct FillRule {
  std::string method;
  int position_input = 1;
  int position_index = 0;
  int length_input = 0;
  int length_axis = 1;
};

/// What one user input of a method must look like (from the program flatbuffer).
struct InputSpec {
  enum class Kind { Tensor, Int, Float, Bool, Other };
  Kind kind = Kind::Other;
  int scalar_type = -1;            ///< executorch ScalarType code, tensors only
  std::vector<int64_t> sizes;      ///< exact (static) or upper bound (dynamic)
  bool dynamic = false;
  std::string describe() const;    ///< "int64[1x16] (dims up to these)"
};

/// A method as sessions see it.
struct MethodInfo {
  std::string name;
  std::vector<InputSpec> inputs;           ///< the user's inputs
  std::vector<std::string> lazy_fqns;      ///< KV buffers appended after them, in order
  std::vector<std::pair<int, int64_t>> token_inputs;  ///< (input, vocabulary size)
  // Which inputs hold the start position and the length: the fill rule of a lazy
  // method, or the cache write found in the graph of a plain one (-1: none).
  int position_input = -1;
  int position_index = 0;
  int length_input = -1;
  int length_axis = 1;
  int64_t cache_positions = -1;            ///< planned cache capacity, -1 if none
  bool uses_lazy() const { return !lazy_fqns.empty(); }
};

/// Options of `Program::load`.
struct LoadOptions {
  Policy policy;                 ///< growth policy of every session
  int64_t max_bytes = -1;        ///< cap on each session's KV storage; -1 = none
  /// XNNPACK weight cache while methods load: -1 = on for programs with several
  /// methods (weights resident once, DESIGN fact 7), 0 = off, 1 = on. Whenever it is
  /// not -1 or the program has several methods, every method is loaded by `load`.
  int weight_cache = -1;
  /// Load no method in `load` and never set XNNPACK's weight cache per load: methods
  /// load on request (`Program::load_method`, `Program::raw_method`) under the
  /// process-wide option (the Python shim sets it itself, runtime_shim/weight_cache.py).
  bool defer_methods = false;
  /// Memory as ExecuTorch's own Python runtime holds it, which `lazykv.estimate`
  /// counts: constant segments read in at load (that runtime mlocks its mapping) and
  /// planned memory touched when a method loads. Off (default): both are paged in as
  /// they are used (file-backed constants, zero pages until written).
  bool resident = false;
};

/// A snapshot of a session's KV storage (the fields of Python's `SessionStats`).
struct SessionStats {
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
  int64_t grow_events = 0;
  int64_t shrink_events = 0;
  int64_t bytes_copied = 0;
  int64_t positions_filled = 0;
  int64_t capacity_positions = 0;
  int64_t max_positions = 0;
  int64_t bytes_per_position = 0;
  int64_t allocations = 0;
  int64_t frees = 0;
  /// Enlargements of the session's storage (all buffers at once count once; the
  /// allocation of preallocate's bound counts one); `grow_events` counts per buffer.
  int64_t grows = 0;
  int64_t ideal_bytes() const { return positions_filled * bytes_per_position; }
};

/// KV cache bytes of a program, as `lazykv inspect` reports them (Python's
/// `runtime_shim.generate.KVFigures`).
struct KvFigures {
  /// Static (planned) KV caches: held in the planned arena from load on, once for the
  /// program and shared by its sessions (0 for a fully lazy program).
  int64_t planned_bytes = 0;
  /// Every KV cache at its upper bound: what a static export holds.
  int64_t at_max_context = 0;
};

/// What trim/reset gave back.
struct Freed {
  int64_t positions = 0;
  int64_t bytes = 0;
};

class Session;
namespace detail {
struct ProgramState;
struct KvStorage;
}  // namespace detail

/// A loaded program: weights and methods once; make sessions with `session()`.
/// Thread-safe: one execute at a time per program (the methods' planned arenas are
/// shared by all methods, as in ExecuTorch's Python `Program`).
class Program : public std::enable_shared_from_this<Program> {
 public:
  /// Load a `.pte` (lazy or not). Refuses a corrupt file, a foreign or newer manifest,
  /// or a program ExecuTorch rejects, with a message naming the problem.
  static Result<std::shared_ptr<Program>> load(const std::string& path, const LoadOptions& options = {});
  /// Load a `.pte` held in memory: `size` bytes at `data`, which the caller keeps alive
  /// and unchanged while the program lives (segments are read in place, not copied).
  /// `name` stands for the file in messages.
  static Result<std::shared_ptr<Program>> load_bytes(const void* data, size_t size, const std::string& name,
                                                     const LoadOptions& options = {});
  ~Program();

  const std::string& source() const;
  const std::vector<std::string>& method_names() const;
  /// The method's description; UnknownMethod naming the methods it has.
  Result<const MethodInfo*> method_info(const std::string& name) const;
  bool lazy() const;
  const std::vector<LazyBuffer>& buffers() const;
  /// The manifest JSON as stored ("" for a program lazykv did not mark).
  const std::string& manifest_json() const;
  const Policy& policy() const;
  int64_t max_bytes() const;
  /// KV bytes one filled position costs (all lazy buffers together).
  int64_t bytes_per_position() const;
  /// The exported bound along the growth axis (smallest over the lazy buffers).
  int64_t max_positions() const;
  /// Whether XNNPACK's weight cache was on while the methods loaded (-1: not set).
  int weight_cache() const;
  /// sha256 (hex) of the `.pte` file, as Python's `LazyProgram.digest`; computed once,
  /// on first use (saving or restoring a session), not at load.
  Result<std::string> digest() const;
  /// Load a method now instead of on its first run.
  Status load_method(const std::string& name);
  /// The loaded ExecuTorch method `name` (loading it on first use), for a caller that
  /// sets every input itself (the C ABI's `lkv_raw_*` calls: the KV storage is the
  /// caller's). Valid while the program lives; the caller serialises its use with every
  /// other call on this program (the methods share planned memory).
  Result<executorch::ET_RUNTIME_NAMESPACE::Method*> raw_method(const std::string& name);
  /// Run a method that takes no inputs (e.g. `get_vocab_size`), returning its first
  /// output as an int64 (ints and integer tensors of one element).
  Result<int64_t> constant_int(const std::string& name);

  /// A new conversation with its own KV storage (none until needed, except preallocate).
  Result<std::unique_ptr<Session>> session();
  /// A session restored from a file written by `Session::save` (C++ or Python).
  Result<std::unique_ptr<Session>> restore(const std::string& path);

  /// Bytes of the rebound program flatbuffer held in memory (the only copy made).
  int64_t patched_region_bytes() const;
  /// The program's KV bytes, planned and at max context (computed at load).
  const KvFigures& kv_figures() const;

 private:
  friend class Session;
  Program();
  /// `open` reads and rebinds the program into the state; then ExecuTorch loads it.
  static Result<std::shared_ptr<Program>> finish_load(const std::string& name, const LoadOptions& options,
                                                      const std::function<Status(detail::ProgramState&)>& open,
                                                      std::shared_ptr<Program> self);
  std::unique_ptr<detail::ProgramState> state_;
};

/// One conversation. Not copyable; close() or destroy to give the storage back.
/// Thread-safe: one call at a time per session.
class Session {
 public:
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  /// Run `method` on the user's inputs (KV storage is supplied by the session). Every
  /// input is checked first (count, kind, dtype, shape, token ids, start position,
  /// capacity); a refusal leaves the session as it was. The outputs are shallow
  /// EValues into the program's memory: valid until the next run of any session of
  /// this program (copy what you keep).
  Result<std::vector<executorch::runtime::EValue>> run(
      const std::string& method, const std::vector<executorch::runtime::EValue>& inputs);

  int64_t offset() const;      ///< positions filled (the next call starts here)
  int64_t capacity() const;    ///< positions the storage holds now
  int64_t kv_bytes() const;    ///< bytes of KV storage held now
  SessionStats stats() const;
  bool closed() const;
  /// Forget every position and give the storage back (preallocate keeps its bound).
  Result<Freed> reset();
  /// Drop the last `n` positions and shrink to what the policy holds for the rest.
  Result<Freed> trim(int64_t n);
  /// Release the storage; later calls give SessionClosed. Idempotent.
  void close();
  /// Write the filled prefix of every lazy buffer (Python's session-file format: a file
  /// saved here restores in Python and the reverse). Returns the bytes written.
  Result<int64_t> save(const std::string& path, const std::map<std::string, std::string>& metadata = {});
  /// A new session holding a copy of this one's first `positions` filled positions
  /// (-1: all of them), independent from then on (Python's `Session.fork`). Its storage
  /// is what the policy holds for `positions` (clamped to the bound and `max_bytes`);
  /// only the filled prefix is copied, counted in the new session's `bytes_copied`. Any
  /// method can continue it at position `positions`. InvalidInput for `positions`
  /// outside 0..offset(), MemoryBudgetExceeded, AllocationFailed, SessionClosed,
  /// InvalidProgram for a program without lazy KV buffers. This session is unchanged
  /// whatever happens, and a failed fork leaves nothing allocated.
  Result<std::unique_ptr<Session>> fork(int64_t positions = -1);
  /// The filled prefix of buffer `fqn` as raw bytes (for tests and tools).
  Result<std::vector<uint8_t>> buffer_prefix(const std::string& fqn) const;

 private:
  friend class Program;
  explicit Session(std::shared_ptr<Program> program);
  Status init();
  Status check_budget(int64_t need, int64_t* target) const;
  Status ensure(int64_t need, int64_t bound);
  Status resize(int64_t positions);
  Status check_open() const;
  Status check_inputs(const MethodInfo& info, const std::vector<executorch::runtime::EValue>& inputs,
                      int64_t* need, int64_t bound) const;

  std::shared_ptr<Program> program_;
  std::unique_ptr<detail::KvStorage> kv_;
  int64_t filled_ = 0;
  bool closed_ = false;
  mutable std::recursive_mutex mutex_;
};

}  // namespace lazykv
