// lazykv::Program: load a `.pte`, rebind its lazy KV buffers in memory, load methods.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>

#include <executorch/runtime/backend/backend_options_map.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/runtime.h>

#include "kv_figures.h"
#include "sha256.h"
#include "state.h"

namespace lazykv {

using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace detail {

void* HeapAllocator::allocate(size_t size, size_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) return nullptr;
  if (size > SIZE_MAX - alignment) return nullptr;
  void* block = std::malloc(size + alignment);
  if (block == nullptr) return nullptr;
  try {
    blocks_.push_back(block);
  } catch (...) {
    std::free(block);
    return nullptr;
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(block);
  return reinterpret_cast<void*>((p + alignment - 1) & ~(uintptr_t(alignment) - 1));
}

void HeapAllocator::reset() {
  for (void* b : blocks_) std::free(b);
  blocks_.clear();
}

PlannedMemory::~PlannedMemory() {
  for (size_t i = 0; i < blocks.size(); ++i) ::munmap(blocks[i], sizes[i] ? sizes[i] : 1);
}

Result<LoadedMethod*> ProgramState::method(const std::string& name) {
  auto it = loaded.find(name);
  if (it != loaded.end()) return it->second.get();
  if (infos.count(name) == 0) {
    std::string names;
    for (const auto& n : method_names) names += (names.empty() ? "'" : ", '") + n + "'";
    return Status(ErrorKind::UnknownMethod, source + ": no method '" + name + "'; it has [" + names + "]");
  }
  // Planned memory: sized to the largest need over all methods, shared by all of them.
  if (planned.sizes.empty()) {
    std::vector<size_t> sizes;
    for (const std::string& n : method_names) {
      auto meta = program->method_meta(n.c_str());
      if (!meta.ok()) continue;
      for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
        auto s = meta->memory_planned_buffer_size(i);
        if (!s.ok() || s.get() < 0) continue;
        if (sizes.size() <= i) sizes.resize(i + 1, 0);
        if (static_cast<size_t>(s.get()) > sizes[i]) sizes[i] = static_cast<size_t>(s.get());
      }
    }
    planned.blocks.reserve(sizes.size());  // no throw between a mapping and its record
    planned.sizes.reserve(sizes.size());
    for (size_t s : sizes) {
      // Its own mapping of zero pages: resident once written, or at once (MAP_POPULATE)
      // when the program holds memory as ExecuTorch's Python runtime does; never part of
      // the malloc heap, so freeing it gives it back.
      void* b = ::mmap(nullptr, s ? s : 1, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | (options.resident ? MAP_POPULATE : 0), -1, 0);
      if (b == MAP_FAILED) b = nullptr;
      if (b == nullptr) {
        return Status(ErrorKind::AllocationFailed,
                      source + ": allocating " + std::to_string(s) + " bytes of planned memory failed");
      }
      planned.blocks.push_back(b);
      planned.sizes.push_back(s);
    }
  }
  auto lm = std::make_unique<LoadedMethod>();
  auto meta = program->method_meta(name.c_str());
  if (!meta.ok()) {
    return Status(ErrorKind::ProgramRejected,
                  source + ": ExecuTorch has no metadata for method '" + name + "'", static_cast<int>(meta.error()));
  }
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    if (i >= planned.blocks.size()) {
      return Status(ErrorKind::ProgramRejected, source + ": method '" + name + "' plans more buffers than sized");
    }
    lm->spans.emplace_back(static_cast<uint8_t*>(planned.blocks[i]), planned.sizes[i]);
  }
  lm->planned = std::make_unique<executorch::runtime::HierarchicalAllocator>(
      executorch::runtime::Span<executorch::runtime::Span<uint8_t>>(lm->spans.data(), lm->spans.size()));
  lm->memory = std::make_unique<executorch::runtime::MemoryManager>(&lm->method_allocator, lm->planned.get(),
                                                                   &lm->temp_allocator);
  // XNNPACK's weight cache per load (the runtime spec the delegate reads at init),
  // never the process-wide option: other programs in the process keep theirs.
  executorch::runtime::BackendOptions<1> xnn;
  executorch::runtime::LoadBackendOptionsMap options_map;
  const executorch::runtime::LoadBackendOptionsMap* options = nullptr;
  if (weight_cache >= 0) {
    if (xnn.set_option("weight_cache_enabled", weight_cache == 1) == Error::Ok &&
        options_map.set_options("XnnpackBackend", xnn.view()) == Error::Ok) {
      options = &options_map;
    }
  }
  auto method = program->load_method(name.c_str(), lm->memory.get(), nullptr, nullptr, options);
  if (!method.ok()) {
    return Status(ErrorKind::ProgramRejected,
                  source + ": loading method '" + name + "': the ExecuTorch runtime refused it, error 0x" +
                      [](int e) {
                        char b[8];
                        std::snprintf(b, sizeof(b), "%02x", e);
                        return std::string(b);
                      }(static_cast<int>(method.error())) +
                      ". The file is corrupt, needs a backend or operator this runtime lacks (link its "
                      "kernels), or was exported for another runtime version",
                  static_cast<int>(method.error()));
  }
  lm->method.reset(new (std::nothrow) executorch::runtime::Method(std::move(method.get())));
  if (!lm->method) {
    return Status(ErrorKind::AllocationFailed, source + ": out of memory loading method '" + name + "'");
  }
  lm->user_inputs = infos[name].inputs.size();
  LoadedMethod* raw = lm.get();
  loaded[name] = std::move(lm);
  return raw;
}

KvStorage::~KvStorage() = default;

}  // namespace detail

namespace {

Status invalid(const std::string& m) {
  return Status(ErrorKind::InvalidProgram, m);
}

std::once_flag g_runtime_once;

}  // namespace

namespace detail {

namespace {

/// What a program is read from: a file (`fd`) or the caller's buffer (`memory`).
struct Bytes {
  int fd = -1;
  const uint8_t* memory = nullptr;
  uint64_t size = 0;
  /// Read `n` bytes at `offset` into `out`; false past the end or on a read error.
  bool read(uint64_t offset, size_t n, void* out) const {
    if (offset > size || n > size - offset) return false;
    if (memory != nullptr) {
      if (n) std::memcpy(out, memory + offset, n);
      return true;
    }
    uint8_t* dst = static_cast<uint8_t*>(out);
    while (n > 0) {
      const ssize_t got = ::pread(fd, dst, n, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      dst += got;
      n -= static_cast<size_t>(got);
      offset += static_cast<uint64_t>(got);
    }
    return true;
  }
};

Status open_bytes(const std::string& path, const Bytes& in, ProgramState& st);

}  // namespace

Status open_rebound(const std::string& path, ProgramState& st) {
  st.source = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return invalid(path + ": cannot open (" + std::strerror(errno) + ")");
  }
  struct FdGuard {
    int fd;
    bool keep = false;
    ~FdGuard() {
      if (!keep) ::close(fd);
    }
  } guard{fd};
  struct stat sb;
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    return invalid(path + ": not a regular file, expected a .pte");
  }
  Bytes in;
  in.fd = fd;
  in.size = static_cast<uint64_t>(sb.st_size);
  Status s = open_bytes(path, in, st);
  guard.keep = s.ok();  // the loader owns the descriptor now
  return s;
}

Status open_rebound_memory(const std::string& name, const uint8_t* data, uint64_t size, ProgramState& st) {
  st.source = name;
  if (data == nullptr && size != 0) return invalid(name + ": no bytes given");
  Bytes in;
  in.memory = data;
  in.size = size;
  st.memory = data;
  return open_bytes(name, in, st);
}

namespace {

Status open_bytes(const std::string& path, const Bytes& in, ProgramState& st) {
  st.file_size = in.size;
  if (st.file_size < 16) {
    return invalid(path + ": " + std::to_string(st.file_size) + " bytes is too short to be a .pte (truncated file?)");
  }
  uint8_t head[64] = {0};
  const size_t head_n = st.file_size < 64 ? static_cast<size_t>(st.file_size) : 64;
  if (!in.read(0, head_n, head)) {
    return invalid(path + ": cannot read its header");
  }
  if (head[4] != 'E' || head[5] != 'T' || head[6] < '0' || head[6] > '9' || head[7] < '0' || head[7] > '9') {
    return invalid(path + ": not an ExecuTorch program (file identifier is not 'ETnn'); export it with "
                   "`lazykv export` or ExecuTorch's to_executorch()");
  }
  const fb::ExtendedHeader eh = fb::read_extended_header(head, head_n);
  uint64_t program_size = st.file_size;
  if (eh.present) {
    if (eh.program_size < 16 || eh.program_size > st.file_size) {
      return invalid(path + ": header says the program is " + std::to_string(eh.program_size) +
                     " bytes but the file has " + std::to_string(st.file_size) + " (truncated or corrupt .pte)");
    }
    if (eh.segment_base_offset != 0 &&
        (eh.segment_base_offset < eh.program_size || eh.segment_base_offset > st.file_size)) {
      return invalid(path + ": segment base offset " + std::to_string(eh.segment_base_offset) +
                     " is outside the file (truncated or corrupt .pte)");
    }
    if (eh.segment_base_offset != 0 && eh.segment_data_size != 0 &&
        eh.segment_data_size > st.file_size - eh.segment_base_offset) {
      return invalid(path + ": segments need " + std::to_string(eh.segment_base_offset + eh.segment_data_size) +
                     " bytes but the file has " + std::to_string(st.file_size) + " (truncated .pte)");
    }
    program_size = eh.program_size;
  }
  if (program_size > (uint64_t(1) << 31)) {
    return invalid(path + ": a program flatbuffer of " + std::to_string(program_size) + " bytes is not plausible");
  }
  std::vector<uint8_t> region(static_cast<size_t>(program_size));
  if (!in.read(0, region.size(), region.data())) return invalid(path + ": cannot read the program flatbuffer");
  fb::ProgramModel model;
  try {
    model = fb::parse_program(region.data(), region.size());
  } catch (const fb::Corrupt& e) {
    return invalid(path + ": the program flatbuffer is corrupt (" + e.what() + ")");
  }
  const uint64_t base = eh.present ? eh.segment_base_offset : 0;
  for (size_t i = 0; i < model.segments.size(); ++i) {
    const fb::Segment& s = model.segments[i];
    if (base == 0 || s.offset > st.file_size || s.size > st.file_size || base + s.offset + s.size > st.file_size) {
      return invalid(path + ": segment " + std::to_string(i) + " lies past the end of the file (truncated or "
                     "corrupt .pte)");
    }
  }
  // The manifest, if any.
  bool have_manifest = false;
  for (const auto& nd : model.named_data) {
    if (nd.first != kManifestKey) continue;
    if (nd.second >= model.segments.size()) {
      return invalid(path + ": named data 'lazykv/manifest' points at segment " + std::to_string(nd.second) +
                     " of " + std::to_string(model.segments.size()));
    }
    const fb::Segment& s = model.segments[nd.second];
    if (s.size > (16u << 20)) {
      return Status(ErrorKind::ManifestError, path + ": the lazykv manifest is " + std::to_string(s.size) +
                                                  " bytes; a manifest is a few KB (corrupt .pte)");
    }
    std::string bytes(static_cast<size_t>(s.size), '\0');
    if (s.size && !in.read(base + s.offset, bytes.size(), &bytes[0])) {
      return invalid(path + ": the lazykv manifest lies past the end of the file (truncated .pte)");
    }
    auto m = parse_manifest(bytes, path);
    if (!m.ok()) return m.status();
    st.manifest = std::move(m.get());
    have_manifest = true;
    break;
  }
  st.lazy = have_manifest && !st.manifest.buffers.empty();
  st.kv_figures = kv_figures(model, st.manifest);
  for (const fb::PlanModel& plan : model.plans) {
    Status checked = check_indices(plan, path);
    if (!checked.ok()) return checked;
    st.method_names.push_back(plan.name);
    MethodInfo info = describe_method(plan);
    st.infos[plan.name] = std::move(info);
  }
  std::vector<uint8_t> patched;
  uint64_t old_base = 0, new_base = 0;
  if (st.lazy) {
    auto rb = rebind(region.data(), region.size(), eh, st.file_size, model, st.manifest, path);
    if (!rb.ok()) return rb.status();
    for (auto& kv : rb->appended) st.infos[kv.first].lazy_fqns = kv.second;
    patched = std::move(rb->region);
    old_base = eh.segment_base_offset;
    new_base = rb->segment_base;
    int64_t mp = -1;
    for (const LazyBuffer& b : st.manifest.buffers) {
      st.bytes_per_position += b.bytes_per_position();
      mp = mp < 0 ? b.max_positions() : std::min(mp, b.max_positions());
    }
    st.max_positions = mp < 0 ? 0 : mp;
    for (auto& kv : st.infos) {
      MethodInfo& info = kv.second;
      if (!info.uses_lazy()) continue;
      const FillRule* rule = st.manifest.fill_rule(info.name);
      const size_t n = info.inputs.size();
      if (rule == nullptr || static_cast<size_t>(rule->position_input) >= n ||
          static_cast<size_t>(rule->length_input) >= n ||
          info.inputs[static_cast<size_t>(rule->position_input)].kind != InputSpec::Kind::Tensor ||
          info.inputs[static_cast<size_t>(rule->length_input)].kind != InputSpec::Kind::Tensor ||
          static_cast<size_t>(rule->length_axis) >= info.inputs[static_cast<size_t>(rule->length_input)].sizes.size()) {
        return Status(ErrorKind::ManifestError, path + ": the fill rule of '" + info.name +
                                                    "' names inputs the method does not have; re-export with lazykv");
      }
      int64_t bound = -1;
      for (const std::string& fqn : info.lazy_fqns) {
        const int64_t p = st.manifest.buffer(fqn)->max_positions();
        bound = bound < 0 ? p : std::min(bound, p);
      }
      st.method_bounds[info.name] = bound;
      info.position_input = rule->position_input;
      info.position_index = rule->position_index;
      info.length_input = rule->length_input;
      info.length_axis = rule->length_axis;
    }
  }
  for (auto& kv : st.infos) {
    MethodInfo& info = kv.second;
    for (auto& t : info.token_inputs) {
      if (info.inputs[static_cast<size_t>(t.first)].kind != InputSpec::Kind::Tensor) t.second = -1;
    }
  }
  if (in.memory != nullptr) {
    st.loader.reset(new RebindingLoader(in.memory, st.file_size, std::move(patched), old_base, new_base));
  } else {
    st.loader.reset(new RebindingLoader(in.fd, st.file_size, std::move(patched), old_base, new_base));
  }
  st.loader->set_populate_constants(st.options.resident);
  return Status();
}

}  // namespace
}  // namespace detail

Program::Program() : state_(new detail::ProgramState()) {}
Program::~Program() = default;

Result<std::shared_ptr<Program>> Program::load(const std::string& path, const LoadOptions& options) {
  try {
    std::shared_ptr<Program> self(new Program());
    return finish_load(path, options, [&](detail::ProgramState& st) { return detail::open_rebound(path, st); },
                       std::move(self));
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, path + ": out of memory while loading");
  }
}

Result<std::shared_ptr<Program>> Program::load_bytes(const void* data, size_t size, const std::string& name,
                                                     const LoadOptions& options) {
  try {
    std::shared_ptr<Program> self(new Program());
    return finish_load(name, options,
                     [&](detail::ProgramState& st) {
                       return detail::open_rebound_memory(name, static_cast<const uint8_t*>(data), size, st);
                     },
                     std::move(self));
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, name + ": out of memory while loading");
  }
}

Result<std::shared_ptr<Program>> Program::finish_load(const std::string& path, const LoadOptions& options,
                                                     const std::function<Status(detail::ProgramState&)>& open,
                                                     std::shared_ptr<Program> self) {
  std::call_once(g_runtime_once, [] { executorch::runtime::runtime_init(); });
  try {
    detail::ProgramState& st = *self->state_;
    st.source = path;
    st.options = options;
    if (options.max_bytes < -1) {
      return Status(ErrorKind::InvalidInput, "max_bytes must be >= 0 bytes, got " + std::to_string(options.max_bytes));
    }
    Status opened = open(st);
    if (!opened.ok()) return opened;
    auto program = executorch::runtime::Program::load(st.loader.get(),
                                                      executorch::runtime::Program::Verification::InternalConsistency);
    if (!program.ok()) {
      char code[8];
      std::snprintf(code, sizeof(code), "%02x", static_cast<int>(program.error()));
      return Status(ErrorKind::ProgramRejected,
                    path + ": loading the program: the ExecuTorch runtime refused it, error 0x" + code +
                        ". The file is corrupt or was exported for another runtime version",
                    static_cast<int>(program.error()));
    }
    st.program.reset(new executorch::runtime::Program(std::move(program.get())));
    if (options.defer_methods) return self;
    // Several methods over the same weights: XNNPACK's weight cache keeps one packed
    // copy (DESIGN fact 7); load every method now, inside that setting.
    std::vector<std::string> runnable;
    for (const auto& n : st.method_names) {
      if (!st.infos[n].inputs.empty()) runnable.push_back(n);
    }
    int wc = options.weight_cache;
    if (wc < 0 && runnable.size() > 1) wc = 1;
    st.weight_cache = wc;
    if (wc >= 0) {
      std::lock_guard<std::recursive_mutex> lock(st.mutex);
      for (const auto& n : runnable) {
        auto m = st.method(n);
        if (!m.ok()) return m.status();
      }
    }
    return self;
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, path + ": out of memory while loading");
  } catch (const std::exception& e) {
    return invalid(path + ": cannot be loaded (" + e.what() + ")");
  }
}

const std::string& Program::source() const { return state_->source; }
const std::vector<std::string>& Program::method_names() const { return state_->method_names; }
bool Program::lazy() const { return state_->lazy; }
const std::vector<LazyBuffer>& Program::buffers() const { return state_->manifest.buffers; }
const std::string& Program::manifest_json() const { return state_->manifest.json; }
const Policy& Program::policy() const { return state_->options.policy; }
int64_t Program::max_bytes() const { return state_->options.max_bytes; }
int64_t Program::bytes_per_position() const { return state_->bytes_per_position; }
int64_t Program::max_positions() const { return state_->max_positions; }
int Program::weight_cache() const { return state_->weight_cache; }
int64_t Program::patched_region_bytes() const {
  return static_cast<int64_t>(state_->loader ? state_->loader->region_bytes() : 0);
}

const KvFigures& Program::kv_figures() const { return state_->kv_figures; }

Result<const MethodInfo*> Program::method_info(const std::string& name) const {
  auto it = state_->infos.find(name);
  if (it == state_->infos.end()) {
    std::string names;
    for (const auto& n : state_->method_names) names += (names.empty() ? "'" : ", '") + n + "'";
    return Status(ErrorKind::UnknownMethod, state_->source + ": no method '" + name + "'; it has [" + names + "]");
  }
  return &it->second;
}

Result<std::string> Program::digest() const {
  std::lock_guard<std::mutex> lock(state_->digest_mutex);
  if (state_->digest.empty()) {
    if (state_->memory != nullptr) {
      Sha256 h;
      h.update(state_->memory, static_cast<size_t>(state_->file_size));
      state_->digest = h.hexdigest();
    } else {
      state_->digest = sha256_file(state_->source);
    }
    if (state_->digest.empty()) {
      return Status(ErrorKind::IoError, state_->source + ": cannot read the program to compute its sha256");
    }
  }
  return state_->digest;
}

Status Program::load_method(const std::string& name) {
  std::lock_guard<std::recursive_mutex> lock(state_->mutex);
  try {
    auto m = state_->method(name);
    return m.ok() ? Status() : m.status();
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, state_->source + ": out of memory loading method '" + name + "'");
  }
}

Result<executorch::ET_RUNTIME_NAMESPACE::Method*> Program::raw_method(const std::string& name) {
  std::lock_guard<std::recursive_mutex> lock(state_->mutex);
  try {
    auto m = state_->method(name);
    if (!m.ok()) return m.status();
    m.get()->bound_session = 0;  // its inputs are the caller's from now on
    return m.get()->method.get();
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, state_->source + ": out of memory loading method '" + name + "'");
  }
}

Result<int64_t> Program::constant_int(const std::string& name) {
  auto info = method_info(name);
  if (!info.ok()) return info.status();
  if (!info.get()->inputs.empty()) {
    return Status(ErrorKind::InvalidInput, "'" + name + "' takes " + std::to_string(info.get()->inputs.size()) +
                                               " inputs; not a constant");
  }
  std::lock_guard<std::recursive_mutex> lock(state_->mutex);
  auto m = state_->method(name);
  if (!m.ok()) return m.status();
  executorch::runtime::Method& method = *m.get()->method;
  const Error err = method.execute();
  if (err != Error::Ok || method.outputs_size() < 1) {
    return Status(ErrorKind::ExecutionFailed, state_->source + ": running '" + name + "' failed",
                  static_cast<int>(err));
  }
  const EValue& out = method.get_output(0);
  if (out.isInt()) return out.toInt();
  if (out.isTensor()) {
    const auto& t = out.toTensor();
    if (t.numel() == 1 && t.scalar_type() == executorch::aten::ScalarType::Long) return t.const_data_ptr<int64_t>()[0];
    if (t.numel() == 1 && t.scalar_type() == executorch::aten::ScalarType::Int) return t.const_data_ptr<int32_t>()[0];
  }
  return Status(ErrorKind::ExecutionFailed, state_->source + ": '" + name + "' did not return one integer");
}

Result<std::unique_ptr<Session>> Program::session() {
  std::unique_ptr<Session> s(new (std::nothrow) Session(shared_from_this()));
  if (!s) return Status(ErrorKind::AllocationFailed, "out of memory creating a session");
  Status st = s->init();
  if (!st.ok()) return st;
  return s;
}

}  // namespace lazykv
