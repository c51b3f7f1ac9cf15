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

/// A size as `lazykv.units.parse_size` reads it: bytes ("67108864", "8,388,608"), IEC
/// units, powers of 1024 ("64MiB"), SI units, powers of 1000 ("64MB", "1.5GB"); "64M" is
/// ambiguous and refused, like a negative or fractional number of bytes (PolicyError).
Result<int64_t> parse_bytes(const std::string& text);

}  // namespace lazykv
