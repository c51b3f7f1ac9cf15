// SHA-256 (FIPS 180-4), for the program digest and a session file's payload checksum:
// the same digests Python's hashlib gives, so session files cross languages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lazykv {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  /// Lower-case hex of the digest; the object is spent afterwards.
  std::string hexdigest();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

/// sha256 of a whole file (hex), or "" if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace lazykv
