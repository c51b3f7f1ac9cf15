#include "loader.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace lazykv {

using executorch::runtime::Error;
using executorch::runtime::FreeableBuffer;
using executorch::runtime::Result;

namespace {

struct Mapping {
  void* base;
  size_t size;
};

void unmap(void* context, void*, size_t) {
  Mapping* m = static_cast<Mapping*>(context);
  ::munmap(m->base, m->size);
  delete m;
}

void free_copy(void* context, void*, size_t) {
  std::free(context);
}

}  // namespace

RebindingLoader::RebindingLoader(int fd, uint64_t file_size, std::vector<uint8_t> region, uint64_t old_base,
                                 uint64_t new_base)
    : fd_(fd), file_size_(file_size), old_base_(old_base), new_base_(new_base) {
  set_region(std::move(region));
}

RebindingLoader::RebindingLoader(const uint8_t* memory, uint64_t file_size, std::vector<uint8_t> region,
                                 uint64_t old_base, uint64_t new_base)
    : memory_(memory), file_size_(file_size), old_base_(old_base), new_base_(new_base) {
  set_region(std::move(region));
}

void RebindingLoader::set_region(std::vector<uint8_t> region) {
  const long page = ::sysconf(_SC_PAGESIZE);
  page_size_ = page > 0 ? static_cast<size_t>(page) : 4096;
  if (!region.empty()) {
    // The runtime parses the flatbuffer in place: give it an aligned copy.
    region_size_ = region.size();
    region_ = static_cast<uint8_t*>(std::aligned_alloc(64, (region_size_ + 63) / 64 * 64));
    if (region_ != nullptr) {
      std::memcpy(region_, region.data(), region_size_);
    } else {
      region_size_ = 0;
      old_base_ = new_base_ = 0;  // load() then refuses reads of the program (see size())
      file_size_ = 0;
    }
  }
}

RebindingLoader::~RebindingLoader() {
  std::free(region_);
  if (fd_ >= 0) ::close(fd_);
}

Result<size_t> RebindingLoader::size() const {
  return static_cast<size_t>(file_size_ - old_base_ + new_base_);
}

Error RebindingLoader::read_file(uint64_t file_offset, size_t size, void* out) const {
  if (memory_ != nullptr) {
    if (file_offset > file_size_ || size > file_size_ - file_offset) return Error::AccessFailed;
    std::memcpy(out, memory_ + file_offset, size);
    return Error::Ok;
  }
  uint8_t* dst = static_cast<uint8_t*>(out);
  while (size > 0) {
    const ssize_t n = ::pread(fd_, dst, size, static_cast<off_t>(file_offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Error::AccessFailed;
    dst += n;
    size -= static_cast<size_t>(n);
    file_offset += static_cast<uint64_t>(n);
  }
  return Error::Ok;
}

Result<FreeableBuffer> RebindingLoader::load(size_t offset, size_t size, const SegmentInfo& segment_info) const {
  const size_t total = static_cast<size_t>(file_size_ - old_base_ + new_base_);
  if (offset > total || size > total - offset) {
    return Error::InvalidArgument;
  }
  if (size == 0) {
    return FreeableBuffer(nullptr, 0, nullptr);
  }
  if (offset + size <= region_size_) {
    return FreeableBuffer(region_ + offset, size, nullptr);
  }
  if (offset >= new_base_) {
    const uint64_t file_offset = offset - new_base_ + old_base_;
    if (memory_ != nullptr) {  // the caller's buffer: point into it (it outlives the program)
      return FreeableBuffer(memory_ + file_offset, size, nullptr);
    }
    const uint64_t start = file_offset / page_size_ * page_size_;
    const size_t span = static_cast<size_t>(file_offset - start) + size;
    const bool populate = populate_constants_ && segment_info.segment_type == SegmentInfo::Type::Constant;
    void* base = ::mmap(nullptr, span, PROT_READ, MAP_PRIVATE | (populate ? MAP_POPULATE : 0), fd_,
                        static_cast<off_t>(start));
    if (base == MAP_FAILED) {
      return Error::AccessFailed;
    }
    Mapping* m = new (std::nothrow) Mapping{base, span};
    if (m == nullptr) {
      ::munmap(base, span);
      return Error::MemoryAllocationFailed;
    }
    return FreeableBuffer(static_cast<uint8_t*>(base) + (file_offset - start), size, unmap, m);
  }
  // A read across the end of the region (never made by the runtime; served by copy).
  void* copy = std::malloc(size);
  if (copy == nullptr) return Error::MemoryAllocationFailed;
  const Error err = load_into(offset, size, SegmentInfo(SegmentInfo::Type::Program), copy);
  if (err != Error::Ok) {
    std::free(copy);
    return err;
  }
  return FreeableBuffer(copy, size, free_copy, copy);
}

Error RebindingLoader::load_into(size_t offset, size_t size, const SegmentInfo&, void* buffer) const {
  const size_t total = static_cast<size_t>(file_size_ - old_base_ + new_base_);
  if (offset > total || size > total - offset || (buffer == nullptr && size != 0)) {
    return Error::InvalidArgument;
  }
  uint8_t* dst = static_cast<uint8_t*>(buffer);
  // Bytes of the padded region, then of the file.
  if (offset < new_base_) {
    const size_t end = offset + size < new_base_ ? offset + size : static_cast<size_t>(new_base_);
    const size_t n = end - offset;
    if (region_size_ == 0) {
      const Error err = read_file(offset, n, dst);  // unpatched: the file itself
      if (err != Error::Ok) return err;
    } else {
      std::memcpy(dst, region_ + offset, n);
    }
    dst += n;
    offset += n;
    size -= n;
  }
  if (size == 0) return Error::Ok;
  return read_file(offset - new_base_ + old_base_, size, dst);
}

}  // namespace lazykv
