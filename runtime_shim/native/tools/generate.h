// Greedy generation over a loaded lazykv::Program: the data behind `lazykv_run`, the
// C++ twin of Python's `runtime_shim/generate.py` (`greedy_generate`,
// `decoder_methods`, `GenerationResult.as_json`). It prints nothing.
//
// Which methods run: `forward` for the prompt and the new tokens when the program has
// it; otherwise, for a program with `prefill` and `decode`, the prompt goes through
// `prefill` and each new token through `decode`. A method whose token input is static
// takes its tokens in chunks of that size.
//
// KV bytes are counted as `lazykv inspect` counts them: a program's planned KV caches
// (static exports) are held from load on, once for the program and shared by its
// sessions; lazy KV storage is each session's own. Totals are planned + every session's.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <lazykv/lazykv.h>

namespace lazykv {
namespace gen {

/// `lazykv generate --json`'s schema name and version (runtime_shim/generate.py).
constexpr const char* kJsonSchema = "lazykv-generate";
constexpr int kJsonVersion = 1;

/// (prefill method, decode method) for `method`: "" (forward, else prefill + decode),
/// "NAME" (both) or "PREFILL,DECODE". UnknownMethod naming the methods the program has;
/// InvalidInput for a malformed `method` (more than two names, an empty one).
Result<std::pair<std::string, std::string>> decoder_methods(const Program& program, const std::string& method);

struct Options {
  int64_t prompt_len = 16;
  int64_t new_tokens = 64;
  int64_t sessions = 1;
  uint64_t seed = 0;
  std::string method;                  ///< as decoder_methods takes it
  std::vector<int64_t> prompt_tokens;  ///< the prompt of every session (overrides prompt_len)
  /// The first P prompt tokens are the same in every session: computed once in session
  /// 0 and forked into the others (lazy programs only).
  int64_t shared_prefix = 0;
  /// If set: every call's last-position logits of session 0, appended.
  std::vector<float>* logits = nullptr;
  /// If set: session 0 is saved there at the end (Python's session-file format).
  std::string save_session;
};

/// One session of a run (bytes: the session's own lazy storage).
struct SessionResult {
  std::vector<int64_t> prompt;
  std::vector<int64_t> tokens;
  int64_t positions_filled = 0;
  int64_t kv_bytes_after_prefill = 0;
  int64_t kv_bytes_end = 0;
  int64_t peak_kv_bytes = 0;
  int64_t grows = 0;               ///< storage enlargements (all buffers at once: one)
  int64_t buffer_grow_events = 0;  ///< the same, one per buffer
  int64_t bytes_copied = 0;
};

/// What computing a shared prefix once and forking it saved.
struct SharedPrefix {
  int64_t positions = 0;
  double prefill_seconds = 0;
  double fork_seconds = 0;
  int64_t bytes_copied = 0;
  double prefill_seconds_unshared_estimate = 0;
  double seconds_saved = 0;
  int64_t positions_saved = 0;
  int64_t bytes_saved = 0;
};

/// Tokens and memory of one run: per-session figures plus totals (planned + sessions).
struct GenerationResult {
  std::string program;
  bool lazy = false;
  std::string policy;
  std::string prefill_method, decode_method;
  int64_t max_positions = 0;
  int64_t bytes_per_position = 0;  ///< lazy bytes one position costs one session
  int64_t planned_kv_bytes = 0;
  int64_t kv_bytes_at_max_context = 0;
  std::vector<SessionResult> sessions;
  int64_t kv_bytes_after_load = 0;
  int64_t kv_bytes_after_prefill = 0;
  int64_t kv_bytes_end = 0;
  int64_t peak_kv_bytes = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t decode_steps = 0;
  bool has_shared_prefix = false;
  SharedPrefix shared_prefix;

  int64_t grows() const;
  int64_t bytes_copied() const;
  /// Decode tokens per second over all sessions; NaN without decode steps.
  double decode_tokens_per_s() const;
};

/// Prefill a seeded random prompt (or `options.prompt_tokens`) in each session, then
/// decode greedily, sessions interleaved token by token. Refuses (InvalidInput,
/// UnknownMethod, ContextOverflow, ...) before any session runs when it can tell;
/// errors of a run come back as they are.
Result<GenerationResult> greedy_generate(Program& program, const Options& options);

/// The `lazykv generate --json` document (schema "lazykv-generate", version 1): the
/// same keys, order and types as Python's `GenerationResult.as_json`; floats always
/// carry a decimal point or an exponent, `decode_tokens_per_s` is null without decode
/// steps, `shared_prefix` null without one.
std::string to_json(const GenerationResult& result);

}  // namespace gen
}  // namespace lazykv
