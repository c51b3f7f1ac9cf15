// Internal state behind lazykv::Program and lazykv::Session.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>

#include <lazykv/lazykv.h>

#include "loader.h"
#include "rebind.h"

namespace lazykv {
namespace detail {

/// malloc-backed MemoryAllocator that honours any power-of-two alignment (ExecuTorch's
/// MallocMemoryAllocator rounds the size, not the block, so an aligned pointer can run
/// past its block) and frees everything on reset().
class HeapAllocator final : public executorch::runtime::MemoryAllocator {
 public:
  HeapAllocator() : MemoryAllocator(0, nullptr) {}
  ~HeapAllocator() override { reset(); }
  void* allocate(size_t size, size_t alignment = kDefaultAlignment) override;
  void reset() override;

 private:
  std::vector<void*> blocks_;
};

/// One loaded method and the memory it runs in.
struct LoadedMethod {
  HeapAllocator method_allocator;
  HeapAllocator temp_allocator;
  std::vector<executorch::runtime::Span<uint8_t>> spans;
  std::unique_ptr<executorch::runtime::HierarchicalAllocator> planned;
  std::unique_ptr<executorch::runtime::MemoryManager> memory;
  std::unique_ptr<executorch::runtime::Method> method;
  size_t user_inputs = 0;
  // Whose KV storage the method's KV inputs point at: (session id, storage generation).
  uint64_t bound_session = 0;
  uint64_t bound_generation = 0;
};

/// Planned memory shared by every method of a program (as ExecuTorch's Python Program
/// does): buffer i is sized to the largest need over the methods.
struct PlannedMemory {
  std::vector<void*> blocks;
  std::vector<size_t> sizes;
  ~PlannedMemory();
};

struct ProgramState {
  std::string source;
  LoadOptions options;
  uint64_t file_size = 0;
  const uint8_t* memory = nullptr;  // the caller's bytes of a program loaded from memory
  std::unique_ptr<RebindingLoader> loader;
  std::unique_ptr<executorch::runtime::Program> program;
  Manifest manifest;
  bool lazy = false;
  std::vector<std::string> method_names;
  std::map<std::string, MethodInfo> infos;
  std::map<std::string, int64_t> method_bounds;  // lazy methods: min max_positions of their buffers
  int64_t bytes_per_position = 0;
  int64_t max_positions = 0;
  KvFigures kv_figures;  // the program's KV bytes as `lazykv inspect` counts them
  int weight_cache = -1;
  PlannedMemory planned;
  std::map<std::string, std::unique_ptr<LoadedMethod>> loaded;
  std::recursive_mutex mutex;  // loading methods and every execute
  mutable std::mutex digest_mutex;
  mutable std::string digest;
  std::atomic<int> plain_sessions{0};

  /// The loaded method `name` (loading it on first use): ProgramRejected if ExecuTorch
  /// refuses it. Caller holds `mutex`.
  Result<LoadedMethod*> method(const std::string& name);
};

/// Open `path`, read and check its program flatbuffer and manifest, rebind the lazy
/// buffers in memory and make `st.loader` serve the result (the first half of
/// Program::load; also used to hand the loader to ExecuTorch's PyDataLoader).
Status open_rebound(const std::string& path, ProgramState& st);
/// The same over the caller's `size` bytes at `data` (kept alive by the caller for the
/// program's life), named `name` in messages.
Status open_rebound_memory(const std::string& name, const uint8_t* data, uint64_t size, ProgramState& st);

/// One lazy buffer's storage.
struct KvBuffer {
  uint8_t* data = nullptr;
  size_t bytes = 0;
  int64_t capacity = 0;
  bool mapped = false;
};

/// A session's KV storage and the counters of Python's TrackingAllocator.
struct KvStorage {
  uint64_t id = 0;
  uint64_t generation = 0;  // bumped whenever a buffer's address or capacity changes
  std::vector<KvBuffer> buffers;
  int64_t capacity = 0;
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
  int64_t grow_events = 0;
  int64_t shrink_events = 0;
  int64_t allocations = 0;
  int64_t frees = 0;
  int64_t bytes_copied = 0;
  int64_t grows = 0;  // enlargements of the whole storage (SessionStats::grows)
  ~KvStorage();
};

}  // namespace detail
}  // namespace lazykv
