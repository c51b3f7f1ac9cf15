// The DataLoader that hands ExecuTorch a rebound program without copying the file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <executorch/runtime/core/data_loader.h>

namespace lazykv {

/// Serves `region` (the patched program flatbuffer, padded to the new segment base) for
/// reads below `region.size()`, and maps every read at or past the new segment base to
/// the original file, shifted by (old base - new base): each such read is its own
/// read-only `mmap` of the file's pages, unmapped when ExecuTorch frees the buffer (as
/// ExecuTorch's MmapDataLoader does), so weights are never copied and pages a delegate
/// has packed and released leave the process. An empty region serves the file as is.
/// A program given as bytes (`memory`) is served the same way from the caller's buffer,
/// which must outlive the loader: segment reads point into it, nothing is copied.
class RebindingLoader final : public executorch::runtime::DataLoader {
 public:
  /// Takes ownership of `fd` (closed by the destructor).
  RebindingLoader(int fd, uint64_t file_size, std::vector<uint8_t> region, uint64_t old_base,
                  uint64_t new_base);
  /// Serves `memory` (`file_size` bytes, not owned, kept alive by the caller) instead of a file.
  RebindingLoader(const uint8_t* memory, uint64_t file_size, std::vector<uint8_t> region, uint64_t old_base,
                  uint64_t new_base);
  ~RebindingLoader() override;

  executorch::runtime::Result<executorch::runtime::FreeableBuffer> load(
      size_t offset, size_t size, const SegmentInfo& segment_info) const override;
  executorch::runtime::Error load_into(size_t offset, size_t size, const SegmentInfo& segment_info,
                                       void* buffer) const override;
  executorch::runtime::Result<size_t> size() const override;

  size_t region_bytes() const { return region_size_; }
  /// Map constant segments with their pages read in at once (MAP_POPULATE), as
  /// ExecuTorch's Python runtime holds them (LoadOptions::resident).
  void set_populate_constants(bool on) { populate_constants_ = on; }

 private:
  executorch::runtime::Error read_file(uint64_t file_offset, size_t size, void* out) const;

  void set_region(std::vector<uint8_t> region);

  int fd_ = -1;
  const uint8_t* memory_ = nullptr;  // the caller's bytes when not reading a file
  uint64_t file_size_;
  uint8_t* region_ = nullptr;  // 64-byte aligned copy of the patched program region
  size_t region_size_ = 0;
  uint64_t old_base_;
  uint64_t new_base_;
  size_t page_size_;
  bool populate_constants_ = false;
};

}  // namespace lazykv
