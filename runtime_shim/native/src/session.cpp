// lazykv::Session: one conversation's KV storage, grown by a policy, bound as inputs.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include <executorch/runtime/core/portable_type/tensor_impl.h>

#include "json.h"
#include "sha256.h"
#include "state.h"

namespace lazykv {

using executorch::aten::ScalarType;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

constexpr char kSessionMagic[8] = {'L', 'K', 'V', 'S', 'E', 'S', 'S', '\0'};
constexpr const char* kSessionFormat = "lazykv-session";
constexpr int kSessionVersion = 1;
constexpr size_t kMapThreshold = 64 << 10;  // as TorchAllocator: own mmap from 64 KiB

std::atomic<uint64_t> g_next_session{1};

Status invalid_input(const std::string& m) { return Status(ErrorKind::InvalidInput, m); }
Status file_error(const std::string& m) { return Status(ErrorKind::SessionFileError, m); }

const char* scalar_name(int st) {
  switch (st) {
    case 0: return "uint8";
    case 1: return "int8";
    case 2: return "int16";
    case 3: return "int32";
    case 4: return "int64";
    case 5: return "float16";
    case 6: return "float32";
    case 7: return "float64";
    case 11: return "bool";
    case 15: return "bfloat16";
    default: return "dtype";
  }
}

bool integer_type(int st) { return st == 0 || st == 1 || st == 2 || st == 3 || st == 4; }

// Element `i` of an integer tensor as int64.
int64_t int_at(const executorch::aten::Tensor& t, ssize_t i) {
  switch (static_cast<int>(t.scalar_type())) {
    case 0: return t.const_data_ptr<uint8_t>()[i];
    case 1: return t.const_data_ptr<int8_t>()[i];
    case 2: return t.const_data_ptr<int16_t>()[i];
    case 3: return t.const_data_ptr<int32_t>()[i];
    default: return t.const_data_ptr<int64_t>()[i];
  }
}

std::string shape_of(const executorch::aten::Tensor& t) {
  std::string s = "[";
  for (ssize_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

uint8_t* alloc_storage(size_t bytes, bool* mapped) {
  if (bytes >= kMapThreshold) {
    // Its own anonymous mapping: pages are committed only when the runtime writes them,
    // and unmapping gives them back whatever the C allocator's heuristics.
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    *mapped = true;
    return p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  *mapped = false;
  return static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
}

void free_storage(detail::KvBuffer& b) {
  if (b.data == nullptr) return;
  if (b.mapped) ::munmap(b.data, b.bytes);
  else std::free(b.data);
  b.data = nullptr;
  b.bytes = 0;
  b.capacity = 0;
}

// Copies the first `n` positions of buffer `lb` from storage holding `src_cap`
// positions to storage holding `dst_cap` (the growth axis is one dimension of the
// layout: each outer slice holds capacity x inner bytes).
void copy_positions(const LazyBuffer& lb, uint8_t* dst, int64_t dst_cap, const uint8_t* src, int64_t src_cap,
                    int64_t n) {
  if (n <= 0) return;
  int64_t outer = 1, inner = lb.element_size();
  for (size_t i = 0; i < lb.max_shape.size(); ++i) {
    if (static_cast<int>(i) < lb.growth_axis) outer *= lb.max_shape[i];
    if (static_cast<int>(i) > lb.growth_axis) inner *= lb.max_shape[i];
  }
  for (int64_t o = 0; o < outer; ++o) {
    std::memcpy(dst + o * dst_cap * inner, src + o * src_cap * inner, static_cast<size_t>(n * inner));
  }
}

}  // namespace

std::string InputSpec::describe() const {
  switch (kind) {
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::Bool: return "bool";
    case Kind::Other: return "other";
    case Kind::Tensor: break;
  }
  std::string dims;
  for (size_t i = 0; i < sizes.size(); ++i) dims += (i ? "x" : "") + std::to_string(sizes[i]);
  return std::string(scalar_name(scalar_type)) + "[" + dims + "]" + (dynamic ? " (dims up to these)" : "");
}

Session::Session(std::shared_ptr<Program> program) : program_(std::move(program)), kv_(new detail::KvStorage()) {
  kv_->id = g_next_session.fetch_add(1);
  kv_->buffers.resize(program_->buffers().size());
}

Session::~Session() { close(); }

Status Session::init() {
  detail::ProgramState& st = *program_->state_;
  if (!st.lazy && ++st.plain_sessions > 1) {
    std::fprintf(stderr, "lazykv: %s has no lazy KV buffers: its sessions share the program's state\n",
                 st.source.c_str());
  }
  const int64_t initial = st.options.policy.initial(st.max_positions, st.bytes_per_position);
  if (st.lazy && initial) {
    int64_t target = initial;
    Status s = check_budget(initial, &target);
    if (!s.ok()) return s;
    s = resize(target);
    if (s.ok()) kv_->grows += 1;
    return s;
  }
  return Status();
}

Status Session::check_open() const {
  if (closed_) return Status(ErrorKind::SessionClosed, "this session was closed; open a new one with program->session()");
  return Status();
}

int64_t Session::offset() const {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  return filled_;
}

int64_t Session::capacity() const {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  return kv_->capacity;
}

int64_t Session::kv_bytes() const {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  int64_t n = 0;
  for (const auto& b : kv_->buffers) n += static_cast<int64_t>(b.bytes);
  return n;
}

bool Session::closed() const {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  return closed_;
}

SessionStats Session::stats() const {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  SessionStats s;
  s.current_bytes = kv_bytes();
  s.peak_bytes = kv_->peak_bytes;
  s.grow_events = kv_->grow_events + kv_->allocations;
  s.shrink_events = kv_->shrink_events;
  s.bytes_copied = kv_->bytes_copied;
  s.positions_filled = filled_;
  s.capacity_positions = kv_->capacity;
  s.max_positions = program_->max_positions();
  s.bytes_per_position = program_->bytes_per_position();
  s.allocations = kv_->allocations;
  s.frees = kv_->frees;
  s.grows = kv_->grows;
  return s;
}

Status Session::check_budget(int64_t need, int64_t* target) const {
  const int64_t mb = program_->max_bytes();
  const int64_t bpp = program_->bytes_per_position();
  if (mb < 0 || bpp == 0) return Status();
  const int64_t afford = mb / bpp;
  if (need > afford) {
    return Status(ErrorKind::MemoryBudgetExceeded,
                  "holding " + std::to_string(need) + " positions needs " + std::to_string(need * bpp) +
                      " bytes of KV storage (" + std::to_string(bpp) + " per position) but max_bytes is " +
                      std::to_string(mb) + " (" + std::to_string(afford) +
                      " positions); trim or reset the session, or raise max_bytes");
  }
  if (*target > afford) *target = afford;
  return Status();
}

Status Session::ensure(int64_t need, int64_t bound) {
  const int64_t cap = kv_->capacity;
  if (need <= cap) return Status();
  int64_t target = program_->policy().capacity(need, bound, program_->bytes_per_position());
  target = std::max(std::min(std::max(target, cap), bound), need);
  Status s = check_budget(need, &target);
  if (!s.ok()) return s;
  s = resize(target);
  if (s.ok()) kv_->grows += 1;
  return s;
}

Status Session::resize(int64_t positions) {
  const std::vector<LazyBuffer>& buffers = program_->buffers();
  detail::KvStorage& kv = *kv_;
  Status result;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const LazyBuffer& lb = buffers[i];
    detail::KvBuffer& old = kv.buffers[i];
    const int64_t p = std::min(positions, lb.max_positions());
    if (old.data != nullptr && old.capacity == p) continue;
    if (p == 0) {
      if (old.data != nullptr) {
        kv.current_bytes -= static_cast<int64_t>(old.bytes);
        kv.frees += 1;
        free_storage(old);
        kv.generation += 1;
      }
      continue;
    }
    const size_t bytes = static_cast<size_t>(p * lb.bytes_per_position());
    if (old.data != nullptr) kv.peak_bytes = std::max(kv.peak_bytes, kv.current_bytes + static_cast<int64_t>(bytes));
    bool mapped = false;
    uint8_t* data = alloc_storage(bytes, &mapped);
    if (data == nullptr) {
      result = Status(ErrorKind::AllocationFailed,
                      "growing KV buffer '" + lb.fqn + "' to " + std::to_string(p) + " positions (" +
                          std::to_string(bytes) + " bytes) failed (out of memory); the session is unchanged. "
                          "Free memory (trim, reset or close sessions) or set max_bytes");
      break;
    }
    detail::KvBuffer fresh{data, bytes, p, mapped};
    if (old.data == nullptr) {
      kv.current_bytes += static_cast<int64_t>(bytes);
      kv.peak_bytes = std::max(kv.peak_bytes, kv.current_bytes);
      kv.allocations += 1;
    } else {
      const int64_t keep = std::min(filled_, p);
      copy_positions(lb, data, p, old.data, old.capacity, keep);
      const int64_t old_bytes = static_cast<int64_t>(old.bytes);
      kv.current_bytes += static_cast<int64_t>(bytes) - old_bytes;
      kv.bytes_copied += keep * lb.bytes_per_position();
      if (static_cast<int64_t>(bytes) >= old_bytes) kv.grow_events += 1;
      else kv.shrink_events += 1;
      free_storage(old);
    }
    old = fresh;
    kv.generation += 1;
  }
  int64_t cap = -1;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const int64_t c = kv.buffers[i].data == nullptr ? 0 : kv.buffers[i].capacity;
    cap = cap < 0 ? c : std::min(cap, c);
  }
  kv.capacity = cap < 0 ? 0 : cap;
  return result;
}

Status Session::check_inputs(const MethodInfo& info, const std::vector<EValue>& inputs, int64_t* need,
                             int64_t bound) const {
  const std::string& method = info.name;
  if (inputs.size() != info.inputs.size()) {
    std::string desc;
    for (const auto& s : info.inputs) desc += (desc.empty() ? "" : ", ") + s.describe();
    return invalid_input(method + " takes " + std::to_string(info.inputs.size()) + " input(s) (" +
                         (desc.empty() ? "no inputs" : desc) + "), got " + std::to_string(inputs.size()) +
                         (info.uses_lazy() ? "; pass the user inputs only, the session supplies the KV cache" : ""));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const InputSpec& spec = info.inputs[i];
    const EValue& x = inputs[i];
    const std::string where = method + ": input " + std::to_string(i);
    switch (spec.kind) {
      case InputSpec::Kind::Tensor: {
        if (!x.isTensor()) return invalid_input(where + " must be a tensor " + spec.describe());
        const auto& t = x.toTensor();
        if (static_cast<int>(t.scalar_type()) != spec.scalar_type) {
          return invalid_input(where + " must be " + spec.describe() + ", got dtype " +
                               scalar_name(static_cast<int>(t.scalar_type())));
        }
        if (t.dim() != static_cast<ssize_t>(spec.sizes.size())) {
          return invalid_input(where + " must have " + std::to_string(spec.sizes.size()) + " dims (" +
                               spec.describe() + "), got shape " + shape_of(t));
        }
        for (ssize_t d = 0; d < t.dim(); ++d) {
          const int64_t want = spec.sizes[static_cast<size_t>(d)];
          const int64_t got = t.size(d);
          if (got < 0 || (spec.dynamic ? got > want : got != want)) {
            return invalid_input(where + " must be " + spec.describe() + ", got shape " + shape_of(t));
          }
        }
        if (t.dim() > 0) {
          const auto order = t.dim_order();
          if (order.data() == nullptr) return invalid_input(where + " has no dim order; build it with make_tensor_ptr");
          for (ssize_t d = 0; d < t.dim(); ++d) {
            if (order[static_cast<size_t>(d)] != d) {
              return invalid_input(where + " must be contiguous (default dim order)");
            }
          }
        }
        if (t.numel() > 0 && t.const_data_ptr() == nullptr) return invalid_input(where + " has no data");
        break;
      }
      case InputSpec::Kind::Int:
        if (!x.isInt()) return invalid_input(where + " must be an int");
        break;
      case InputSpec::Kind::Float:
        if (!x.isDouble() && !x.isInt()) return invalid_input(where + " must be a float");
        break;
      case InputSpec::Kind::Bool:
        if (!x.isBool()) return invalid_input(where + " must be a bool");
        break;
      case InputSpec::Kind::Other:
        return invalid_input(where + " is of a kind lazykv cannot check; run this method through Module");
    }
  }
  for (const auto& tv : info.token_inputs) {
    if (tv.second < 0) continue;
    const auto& t = inputs[static_cast<size_t>(tv.first)].toTensor();
    if (t.numel() == 0 || !integer_type(static_cast<int>(t.scalar_type()))) continue;
    int64_t lo = int_at(t, 0), hi = lo;
    for (ssize_t k = 1; k < t.numel(); ++k) {
      const int64_t v = int_at(t, k);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    if (lo < 0 || hi >= tv.second) {
      return invalid_input(method + ": input " + std::to_string(tv.first) + " holds token id " +
                           std::to_string(lo < 0 ? lo : hi) + ", outside the vocabulary [0, " +
                           std::to_string(tv.second) + ") of the program's embedding table");
    }
  }
  // Positions: the fill rule of a lazy method, or the cache write found in the graph.
  int pos_i = info.position_input, pos_k = info.position_index, len_i = info.length_input, len_axis = info.length_axis;
  if (!info.uses_lazy() && (pos_i < 0 || len_i < 0 || bound < 0)) {
    *need = -1;
    return Status();
  }
  const EValue& pv = inputs[static_cast<size_t>(pos_i)];
  if (!pv.isTensor() || pv.toTensor().numel() <= pos_k || pos_k < 0) {
    return invalid_input(method + ": input " + std::to_string(pos_i) +
                         " (the start position) must be a tensor with at least " + std::to_string(pos_k + 1) +
                         " element(s)");
  }
  if (!integer_type(static_cast<int>(pv.toTensor().scalar_type()))) {
    return invalid_input(method + ": input " + std::to_string(pos_i) + " (positions) must be integer");
  }
  const int64_t pos = int_at(pv.toTensor(), pos_k);
  const EValue& lv = inputs[static_cast<size_t>(len_i)];
  if (!lv.isTensor() || lv.toTensor().dim() <= len_axis) {
    return invalid_input(method + ": input " + std::to_string(len_i) + " must be a tensor with a dimension " +
                         std::to_string(len_axis));
  }
  const int64_t length = lv.toTensor().size(len_axis);
  if (length < 1) return invalid_input(method + ": input " + std::to_string(len_i) + " holds no positions (length 0)");
  if (pos != filled_) {
    return invalid_input(method + ": call starts at position " + std::to_string(pos) + " but this session has filled " +
                         std::to_string(filled_) + "; positions must continue at " + std::to_string(filled_) +
                         " (no gaps). To go back, trim(" + std::to_string(pos < filled_ ? filled_ - pos : 0) +
                         ") or reset() first");
  }
  const int64_t n = pos + length;
  if (bound >= 0 && n > bound) {
    return Status(ErrorKind::ContextOverflow,
                  method + ": positions " + std::to_string(pos) + ".." + std::to_string(n - 1) +
                      " go past the exported bound of " + std::to_string(bound) + " positions (" +
                      std::to_string(filled_) + " filled, " + std::to_string(bound - filled_) +
                      " left). Trim or reset the session, or export with a larger max context");
  }
  *need = n;
  return Status();
}

Result<std::vector<EValue>> Session::run(const std::string& method, const std::vector<EValue>& inputs) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  try {
    Status s = check_open();
    if (!s.ok()) return s;
    detail::ProgramState& st = *program_->state_;
    auto found = st.infos.find(method);
    if (found == st.infos.end()) return program_->method_info(method).status();
    const MethodInfo& info = found->second;
    int64_t bound = info.cache_positions;
    if (info.uses_lazy()) bound = st.method_bounds[method];
    int64_t need = -1;
    s = check_inputs(info, inputs, &need, bound);
    if (!s.ok()) return s;
    if (info.uses_lazy()) {
      s = ensure(need, bound);
      if (!s.ok()) return s;
      if (kv_->capacity < need) {
        return Status(ErrorKind::AllocationFailed, "lazykv bug: KV storage holds fewer positions than needed");
      }
    }
    std::lock_guard<std::recursive_mutex> plock(st.mutex);
    auto lm = st.method(method);
    if (!lm.ok()) return lm.status();
    executorch::runtime::Method& m = *lm.get()->method;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const Error err = m.set_input(inputs[i], i);
      if (err != Error::Ok) {
        return Status(ErrorKind::InvalidInput,
                      method + ": ExecuTorch refused input " + std::to_string(i) + " (error " +
                          std::to_string(static_cast<int>(err)) + "); check its dtype and shape",
                      static_cast<int>(err));
      }
    }
    if (info.uses_lazy() && (lm.get()->bound_session != kv_->id || lm.get()->bound_generation != kv_->generation)) {
      // Bind this session's storage; it stays bound while the storage is unchanged and
      // no other session runs the method (DESIGN fact 14: unplanned inputs alias).
      const std::vector<LazyBuffer>& buffers = program_->buffers();
      for (size_t k = 0; k < info.lazy_fqns.size(); ++k) {
        size_t bi = 0;
        while (bi < buffers.size() && buffers[bi].fqn != info.lazy_fqns[k]) ++bi;
        const LazyBuffer& lb = buffers[bi];
        const detail::KvBuffer& b = kv_->buffers[bi];
        std::vector<executorch::aten::SizesType> sizes;
        for (int64_t d : lb.shape_at(b.capacity)) sizes.push_back(static_cast<executorch::aten::SizesType>(d));
        std::vector<executorch::aten::DimOrderType> order(sizes.size());
        std::vector<executorch::aten::StridesType> strides(sizes.size());
        for (size_t d = 0; d < sizes.size(); ++d) order[d] = static_cast<executorch::aten::DimOrderType>(d);
        int64_t stride = 1;
        for (size_t d = sizes.size(); d-- > 0;) {
          strides[d] = static_cast<executorch::aten::StridesType>(stride);
          stride *= sizes[d];
        }
        executorch::runtime::etensor::TensorImpl impl(static_cast<ScalarType>(lb.scalar_type),
                                                      static_cast<ssize_t>(sizes.size()), sizes.data(), b.data,
                                                      order.data(), strides.data(),
                                                      executorch::runtime::TensorShapeDynamism::DYNAMIC_BOUND);
        executorch::aten::Tensor tensor(&impl);
        const Error err = m.set_input(EValue(tensor), inputs.size() + k);
        if (err != Error::Ok) {
          lm.get()->bound_session = 0;
          return Status(ErrorKind::ExecutionFailed,
                        method + ": ExecuTorch refused KV buffer '" + lb.fqn + "' (error " +
                            std::to_string(static_cast<int>(err)) + ")",
                        static_cast<int>(err));
        }
      }
      lm.get()->bound_session = kv_->id;
      lm.get()->bound_generation = kv_->generation;
    }
    const Error err = m.execute();
    if (err != Error::Ok) {
      char code[8];
      std::snprintf(code, sizeof(code), "%02x", static_cast<int>(err));
      return Status(ErrorKind::ExecutionFailed,
                    st.source + ": running method '" + method + "': the ExecuTorch runtime failed while running it, "
                                "error 0x" + code + "; a kernel rejected its inputs or the program is corrupt. "
                                "The session is unchanged",
                    static_cast<int>(err));
    }
    std::vector<EValue> out(m.outputs_size());
    if (!out.empty() && m.get_outputs(out.data(), out.size()) != Error::Ok) {
      return Status(ErrorKind::ExecutionFailed, st.source + ": reading the outputs of '" + method + "' failed");
    }
    if (need >= 0) filled_ = need;
    return out;
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, "out of memory running '" + method + "'");
  }
}

Result<Freed> Session::reset() {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  Status s = check_open();
  if (!s.ok()) return s;
  const int64_t before = kv_bytes(), n = filled_;
  filled_ = 0;
  if (program_->lazy()) {
    s = resize(program_->policy().initial(program_->max_positions(), program_->bytes_per_position()));
    if (!s.ok()) return s;
  }
  return Freed{n, before - kv_bytes()};
}

Result<Freed> Session::trim(int64_t n) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  Status s = check_open();
  if (!s.ok()) return s;
  n = std::max<int64_t>(0, std::min(filled_, n));
  const int64_t before = kv_bytes();
  filled_ -= n;
  if (program_->lazy()) {
    int64_t target = program_->policy().capacity(filled_, program_->max_positions(), program_->bytes_per_position());
    target = std::max(target, filled_);
    if (target < kv_->capacity) {
      s = resize(target);
      if (!s.ok()) return s;
    }
  }
  return Freed{n, before - kv_bytes()};
}

void Session::close() {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  if (closed_) return;
  for (auto& b : kv_->buffers) {
    if (b.data != nullptr) {
      kv_->current_bytes -= static_cast<int64_t>(b.bytes);
      kv_->frees += 1;
      free_storage(b);
    }
  }
  kv_->capacity = 0;
  kv_->generation += 1;
  closed_ = true;
  if (!program_->lazy()) program_->state_->plain_sessions -= 1;
}

Result<std::unique_ptr<Session>> Session::fork(int64_t positions) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  try {
    Status s = check_open();
    if (!s.ok()) return s;
    if (!program_->lazy()) {
      return Status(ErrorKind::InvalidProgram,
                    program_->source() + " has no lazy KV buffers: its state lives inside the runtime and cannot be "
                                         "forked; export it with lazykv to fork sessions");
    }
    const int64_t n = positions == -1 ? filled_ : positions;
    if (n < 0 || n > filled_) {
      return invalid_input("fork(positions=" + std::to_string(positions) + "): positions must be an int from 0 to the " +
                           std::to_string(filled_) + " this session has filled");
    }
    auto made = program_->session();
    if (!made.ok()) return made.status();
    std::unique_ptr<Session> child = std::move(made.get());
    if (n > 0) {
      const int64_t bound = program_->max_positions();
      const int64_t bpp = program_->bytes_per_position();
      int64_t target = std::max(std::min(program_->policy().capacity(n, bound, bpp), bound), n);
      s = child->check_budget(n, &target);
      if (!s.ok()) return s;
      if (target != child->kv_->capacity) {
        s = child->resize(target);
        if (!s.ok()) {
          return Status(s.kind(), "fork of " + std::to_string(n) + " positions: " + s.message());
        }
      }
      const std::vector<LazyBuffer>& buffers = program_->buffers();
      for (size_t i = 0; i < buffers.size(); ++i) {
        const LazyBuffer& lb = buffers[i];
        const detail::KvBuffer& from = kv_->buffers[i];
        const detail::KvBuffer& to = child->kv_->buffers[i];
        copy_positions(lb, to.data, to.capacity, from.data, from.capacity, n);
        child->kv_->bytes_copied += n * lb.bytes_per_position();
      }
      child->filled_ = n;
    }
    return child;
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, "out of memory forking a session");
  }
}

Result<std::vector<uint8_t>> Session::buffer_prefix(const std::string& fqn) const {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  const auto& buffers = program_->buffers();
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (buffers[i].fqn != fqn) continue;
    const LazyBuffer& lb = buffers[i];
    const detail::KvBuffer& b = kv_->buffers[i];
    std::vector<uint8_t> out(static_cast<size_t>(filled_ * lb.bytes_per_position()));
    copy_positions(lb, out.data(), filled_, b.data, b.capacity, filled_);
    return out;
  }
  return invalid_input("no lazy buffer '" + fqn + "'");
}

Result<int64_t> Session::save(const std::string& path, const std::map<std::string, std::string>& metadata) {
  std::lock_guard<std::recursive_mutex> lock(mutex_);
  Status s = check_open();
  if (!s.ok()) return s;
  if (!program_->lazy()) {
    return Status(ErrorKind::InvalidProgram,
                  program_->source() + " has no lazy KV buffers: its state lives inside the runtime and cannot be "
                                       "saved; export it with lazykv to save sessions");
  }
  auto digest = program_->digest();
  if (!digest.ok()) return digest.status();
  const auto& buffers = program_->buffers();
  std::vector<std::vector<uint8_t>> prefixes;
  Sha256 payload;
  std::string entries;
  int64_t offset = 0;
  for (const LazyBuffer& lb : buffers) {
    auto p = buffer_prefix(lb.fqn);
    if (!p.ok()) return p.status();
    payload.update(p->data(), p->size());
    std::string shape;
    for (int64_t d : lb.shape_at(filled_)) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    const int64_t nb = lb.bytes_per_position() * filled_;
    entries += std::string(entries.empty() ? "" : ", ") + "{\"dtype\": " + json::quote(lb.dtype) +
               ", \"fqn\": " + json::quote(lb.fqn) + ", \"growth_axis\": " + std::to_string(lb.growth_axis) +
               ", \"nbytes\": " + std::to_string(nb) + ", \"offset\": " + std::to_string(offset) +
               ", \"shape\": [" + shape + "]}";
    offset += nb;
    prefixes.push_back(std::move(p.get()));
  }
  std::string meta;
  for (const auto& kv : metadata) {
    meta += (meta.empty() ? "" : ", ") + json::quote(kv.first) + ": " + json::quote(kv.second);
  }
  const std::string header = "{\"buffers\": [" + entries + "], \"format\": " + json::quote(kSessionFormat) +
                             ", \"metadata\": {" + meta + "}, \"payload_sha256\": " + json::quote(payload.hexdigest()) +
                             ", \"positions_filled\": " + std::to_string(filled_) +
                             ", \"program_sha256\": " + json::quote(digest.get()) +
                             ", \"program_source\": " + json::quote(program_->source()) +
                             ", \"version\": " + std::to_string(kSessionVersion) + "}";
  const std::string tmp = path + "." + std::to_string(::getpid()) + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return Status(ErrorKind::IoError, path + ": cannot write the session file (" + std::strerror(errno) + ")");
  }
  const uint64_t hlen = header.size();
  bool ok = std::fwrite(kSessionMagic, 1, 8, f) == 8 && std::fwrite(&hlen, 1, 8, f) == 8 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (const auto& p : prefixes) ok = ok && std::fwrite(p.data(), 1, p.size(), f) == p.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Status(ErrorKind::IoError, path + ": writing the session file failed");
  }
  return static_cast<int64_t>(16 + header.size() + static_cast<size_t>(offset));
}

Result<std::unique_ptr<Session>> Program::restore(const std::string& path) {
  try {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) return file_error(path + ": cannot open session file (" + std::strerror(errno) + ")");
    struct Closer {
      FILE* f;
      ~Closer() { std::fclose(f); }
    } closer{f};
    struct stat sb;
    if (::fstat(::fileno(f), &sb) != 0) return file_error(path + ": cannot stat session file");
    const uint64_t size = static_cast<uint64_t>(sb.st_size);
    char head[16];
    if (std::fread(head, 1, 16, f) != 16 || std::memcmp(head, kSessionMagic, 8) != 0) {
      return file_error(path + ": not a lazykv session file");
    }
    uint64_t hlen;
    std::memcpy(&hlen, head + 8, 8);
    if (hlen > size - 16) {
      return file_error(path + ": session header is corrupt or truncated (it claims " + std::to_string(hlen) +
                        " bytes, the file has " + std::to_string(size - 16) + " after the magic)");
    }
    std::string raw(static_cast<size_t>(hlen), '\0');
    if (hlen && std::fread(&raw[0], 1, raw.size(), f) != raw.size()) return file_error(path + ": truncated session file");
    json::Value h;
    try {
      h = json::parse(raw);
    } catch (const json::JsonError&) {
      return file_error(path + ": session header is corrupt or truncated");
    }
    if (!h.is_object()) return file_error(path + ": session header is corrupt or truncated");
    const json::Value* format = h.get("format");
    if (format == nullptr || !format->is_string() || format->s != kSessionFormat) {
      return file_error(path + ": not a lazykv session file (format)");
    }
    const json::Value* version = h.get("version");
    if (version == nullptr || !version->is_int() || version->i > kSessionVersion) {
      return file_error(path + ": session file version is newer than this lazykv reads (" +
                        std::to_string(kSessionVersion) + "); upgrade lazykv");
    }
    auto digest = this->digest();
    if (!digest.ok()) return digest.status();
    const json::Value* sha = h.get("program_sha256");
    if (sha == nullptr || !sha->is_string() || sha->s != digest.get()) {
      const json::Value* src = h.get("program_source");
      return file_error(path + ": this session was saved from a different program (" +
                        (src && src->is_string() ? "'" + src->s + "'" : std::string("unknown")) + ", sha256 " +
                        (sha && sha->is_string() ? sha->s.substr(0, 12) : std::string("?")) + "...) than '" +
                        source() + "' (sha256 " + digest->substr(0, 12) + "...); load that program to restore it");
    }
    const json::Value* filled_v = h.get("positions_filled");
    const int64_t filled = filled_v && filled_v->is_int() ? filled_v->i : -1;
    if (filled < 0 || filled > max_positions()) return file_error(path + ": positions_filled is out of range");
    std::map<std::string, const json::Value*> by_fqn;
    const json::Value* list = h.get("buffers");
    if (list == nullptr || !list->is_array()) return file_error(path + ": its buffers do not match the program's");
    for (const json::Value& e : list->a) {
      const json::Value* fqn = e.get("fqn");
      if (fqn == nullptr || !fqn->is_string()) return file_error(path + ": its buffers do not match the program's");
      by_fqn[fqn->s] = &e;
    }
    if (by_fqn.size() != buffers().size() || list->a.size() != buffers().size()) {
      return file_error(path + ": its buffers do not match the program's");
    }
    int64_t total = 0;
    std::vector<int64_t> offsets;
    for (const LazyBuffer& lb : buffers()) {
      auto it = by_fqn.find(lb.fqn);
      if (it == by_fqn.end()) return file_error(path + ": its buffers do not match the program's");
      const json::Value& e = *it->second;
      const json::Value* dtype = e.get("dtype");
      const json::Value* shape = e.get("shape");
      const json::Value* nbytes = e.get("nbytes");
      bool match = dtype && dtype->is_string() && dtype->s == lb.dtype && shape && shape->is_array() && nbytes &&
          nbytes->is_int() && nbytes->i == lb.bytes_per_position() * filled;
      if (match) {
        const std::vector<int64_t> want = lb.shape_at(filled);
        match = shape->a.size() == want.size();
        for (size_t d = 0; match && d < want.size(); ++d) match = shape->a[d].is_int() && shape->a[d].i == want[d];
      }
      if (!match) return file_error(path + ": buffer '" + lb.fqn + "' does not match the program");
      const json::Value* off = e.get("offset");
      if (off == nullptr || !off->is_int() || off->i != total) {
        return file_error(path + ": buffer '" + lb.fqn + "' is at a corrupt offset");
      }
      offsets.push_back(total);
      total += nbytes->i;
    }
    const uint64_t expected = 16 + hlen + static_cast<uint64_t>(total);
    if (size != expected) {
      return file_error(size < expected ? path + ": truncated session file (" + std::to_string(size) +
                                              " bytes; its header describes " + std::to_string(expected) + ")"
                                        : path + ": session file is corrupt (" + std::to_string(size - expected) +
                                              " bytes after the data its header describes)");
    }
    auto made = session();
    if (!made.ok()) return made.status();
    std::unique_ptr<Session> s = std::move(made.get());
    Sha256 payload;
    if (filled) {
      const int64_t bound = max_positions();
      int64_t target = policy().capacity(filled, bound, bytes_per_position());
      target = std::max(std::min(target, bound), filled);
      Status st = s->check_budget(filled, &target);
      if (!st.ok()) return st;
      st = s->resize(target);
      if (!st.ok()) return st;
      const auto& bufs = buffers();
      for (size_t i = 0; i < bufs.size(); ++i) {
        const LazyBuffer& lb = bufs[i];
        detail::KvBuffer& b = s->kv_->buffers[i];
        std::vector<uint8_t> data(static_cast<size_t>(lb.bytes_per_position() * filled));
        if (std::fseek(f, static_cast<long>(16 + hlen + static_cast<uint64_t>(offsets[i])), SEEK_SET) != 0 ||
            std::fread(data.data(), 1, data.size(), f) != data.size()) {
          return file_error(path + ": truncated session file");
        }
        payload.update(data.data(), data.size());
        copy_positions(lb, b.data, b.capacity, data.data(), filled, filled);
      }
    }
    const json::Value* want = h.get("payload_sha256");  // absent in files from before the checksum
    if (want != nullptr && (!want->is_string() || want->s != payload.hexdigest())) {
      return file_error(path + ": session data is corrupt (its sha256 does not match the one recorded when it "
                               "was saved)");
    }
    s->filled_ = filled;
    return s;
  } catch (const std::bad_alloc&) {
    return Status(ErrorKind::AllocationFailed, path + ": out of memory restoring the session");
  }
}

}  // namespace lazykv
