// Growth policies: how many positions of KV storage to hold for `needed` filled ones.
// The same parameters and arithmetic as `runtime_shim/policy.py` (tested side by side).
#pragma once

#include <cstdint>
#include <string>

#include <lazykv/status.h>

namespace lazykv {

struct Policy {
  enum class Kind { Doubling, Step, Hybrid, Preallocate };

  Kind kind = Kind::Doubling;
  int64_t initial_positions = 16;   ///< doubling
  int64_t step = 256;               ///< step:N
  int64_t start = 256;              ///< hybrid
  int64_t linear_after = 64 << 20;  ///< hybrid, bytes
  int64_t increment = 32 << 20;     ///< hybrid, bytes

  /// Positions to hold for `needed` filled ones (clamped to `bound`; 0 for needed <= 0,
  /// except preallocate, which always holds the bound).
  int64_t capacity(int64_t needed, int64_t bound, int64_t bytes_per_position) const;
  /// Positions a new session holds before its first call (0 = nothing allocated).
  int64_t initial(int64_t bound, int64_t bytes_per_position) const;
  /// The string `parse` turns back into this policy ("doubling", "step:256", ...).
  std::string spec() const;
  /// The name: doubling, step, hybrid, preallocate.
  const char* name() const;

  /// `doubling`, `doubling:initial_positions=16`, `step`, `step:512`, `hybrid`,
  /// `hybrid:start=256,linear_after=64MiB,increment=32MiB`, `preallocate`.
  static Result<Policy> parse(const std::string& text);
};

/// "64MiB", "64M", "67108864" -> bytes (binary units), as `policy.parse_bytes`.
Result<int64_t> parse_bytes(const std::string& text);

}  // namespace lazykv
