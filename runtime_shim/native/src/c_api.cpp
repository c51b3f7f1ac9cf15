// The C ABI of include/lazykv/c_api.h over lazykv::Program / lazykv::Session.
#include <lazykv/c_api.h>

#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <executorch/runtime/core/portable_type/tensor_impl.h>

#include <lazykv/lazykv.h>

#define LKV_EXPORT __attribute__((visibility("default")))

struct lkv_program {
  std::shared_ptr<lazykv::Program> program;
};

struct lkv_session {
  std::unique_ptr<lazykv::Session> session;
  std::vector<executorch::runtime::EValue> outputs;
  // Reused per call: the input tensors' metadata (ExecuTorch tensors do not own it).
  std::vector<std::vector<executorch::aten::SizesType>> sizes;
  std::vector<std::vector<executorch::aten::DimOrderType>> orders;
  std::vector<std::vector<executorch::aten::StridesType>> strides;
  std::vector<executorch::runtime::etensor::TensorImpl> impls;
  std::vector<executorch::runtime::EValue> inputs;
};

namespace {

thread_local std::string g_error;

int fail(const lazykv::Status& s) {
  g_error = s.to_string();
  return static_cast<int>(s.kind());
}

int fail(lazykv::ErrorKind kind, const std::string& message) {
  return fail(lazykv::Status(kind, message));
}

}  // namespace

extern "C" {

LKV_EXPORT int lkv_abi_version(void) { return LKV_ABI_VERSION; }

LKV_EXPORT const char* lkv_last_error(void) { return g_error.c_str(); }

LKV_EXPORT int lkv_program_load(const char* path, const char* policy, int64_t max_bytes, int weight_cache,
                                lkv_program** out) {
  if (path == nullptr || out == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  *out = nullptr;
  lazykv::LoadOptions options;
  auto p = lazykv::Policy::parse(policy ? policy : "doubling");
  if (!p.ok()) return fail(p.status());
  options.policy = p.get();
  options.max_bytes = max_bytes;
  options.weight_cache = weight_cache;
  auto loaded = lazykv::Program::load(path, options);
  if (!loaded.ok()) return fail(loaded.status());
  lkv_program* handle = new (std::nothrow) lkv_program{loaded.get()};
  if (handle == nullptr) return fail(lazykv::ErrorKind::AllocationFailed, "out of memory");
  *out = handle;
  return 0;
}

LKV_EXPORT void lkv_program_free(lkv_program* program) { delete program; }

LKV_EXPORT const char* lkv_program_manifest(const lkv_program* program) {
  return program ? program->program->manifest_json().c_str() : "";
}

LKV_EXPORT int64_t lkv_program_region_bytes(const lkv_program* program) {
  return program ? program->program->patched_region_bytes() : 0;
}

LKV_EXPORT int lkv_program_load_method(lkv_program* program, const char* method) {
  if (program == nullptr || method == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  const lazykv::Status s = program->program->load_method(method);
  return s.ok() ? 0 : fail(s);
}

LKV_EXPORT int lkv_program_digest(lkv_program* program, char* out) {
  if (program == nullptr || out == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  auto d = program->program->digest();
  if (!d.ok()) return fail(d.status());
  std::memcpy(out, d->c_str(), 65);
  return 0;
}

LKV_EXPORT int lkv_program_kv_figures(const lkv_program* program, int64_t* planned_bytes, int64_t* at_max_context) {
  if (program == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  const lazykv::KvFigures& f = program->program->kv_figures();
  if (planned_bytes) *planned_bytes = f.planned_bytes;
  if (at_max_context) *at_max_context = f.at_max_context;
  return 0;
}

static int wrap_session(lazykv::Result<std::unique_ptr<lazykv::Session>> s, lkv_session** out) {
  if (!s.ok()) return fail(s.status());
  lkv_session* handle = new (std::nothrow) lkv_session();
  if (handle == nullptr) return fail(lazykv::ErrorKind::AllocationFailed, "out of memory");
  handle->session = std::move(s.get());
  *out = handle;
  return 0;
}

LKV_EXPORT int lkv_session_new(lkv_program* program, lkv_session** out) {
  if (program == nullptr || out == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  *out = nullptr;
  return wrap_session(program->program->session(), out);
}

LKV_EXPORT int lkv_session_restore(lkv_program* program, const char* path, lkv_session** out) {
  if (program == nullptr || path == nullptr || out == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  *out = nullptr;
  return wrap_session(program->program->restore(path), out);
}

LKV_EXPORT int lkv_session_fork(lkv_session* session, int64_t positions, lkv_session** out) {
  if (session == nullptr || out == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  *out = nullptr;
  return wrap_session(session->session->fork(positions), out);
}

LKV_EXPORT void lkv_session_free(lkv_session* session) { delete session; }

LKV_EXPORT int lkv_session_run(lkv_session* session, const char* method, const lkv_tensor* inputs, int32_t n,
                               int32_t* n_outputs) {
  if (session == nullptr || method == nullptr || (n > 0 && inputs == nullptr) || n < 0 || n > 64) {
    return fail(lazykv::ErrorKind::InvalidInput, "bad arguments to lkv_session_run");
  }
  try {
    const size_t count = static_cast<size_t>(n);
    session->sizes.resize(count);
    session->orders.resize(count);
    session->strides.resize(count);
    session->impls.clear();
    session->impls.reserve(count);
    session->inputs.clear();
    for (size_t i = 0; i < count; ++i) {
      const lkv_tensor& t = inputs[i];
      if (t.dim < 0 || t.dim > LKV_MAX_DIMS) return fail(lazykv::ErrorKind::InvalidInput, "a tensor with a bad dim");
      auto& sz = session->sizes[i];
      auto& od = session->orders[i];
      auto& st = session->strides[i];
      sz.assign(t.sizes, t.sizes + t.dim);
      od.resize(static_cast<size_t>(t.dim));
      st.resize(static_cast<size_t>(t.dim));
      int64_t stride = 1;
      for (int d = t.dim - 1; d >= 0; --d) {
        od[static_cast<size_t>(d)] = static_cast<executorch::aten::DimOrderType>(d);
        st[static_cast<size_t>(d)] = static_cast<executorch::aten::StridesType>(stride);
        stride *= t.sizes[d];
      }
      session->impls.emplace_back(static_cast<executorch::aten::ScalarType>(t.scalar_type), t.dim, sz.data(), t.data,
                                  od.data(), st.data(), executorch::runtime::TensorShapeDynamism::DYNAMIC_BOUND);
      session->inputs.emplace_back(executorch::aten::Tensor(&session->impls.back()));
    }
    auto out = session->session->run(method, session->inputs);
    session->outputs.clear();
    if (!out.ok()) return fail(out.status());
    session->outputs = std::move(out.get());
    if (n_outputs != nullptr) *n_outputs = static_cast<int32_t>(session->outputs.size());
    return 0;
  } catch (const std::bad_alloc&) {
    return fail(lazykv::ErrorKind::AllocationFailed, "out of memory");
  }
}

LKV_EXPORT int lkv_session_output(lkv_session* session, int32_t i, lkv_tensor* out) {
  if (session == nullptr || out == nullptr || i < 0 || static_cast<size_t>(i) >= session->outputs.size()) {
    return fail(lazykv::ErrorKind::InvalidInput, "no such output");
  }
  const executorch::runtime::EValue& v = session->outputs[static_cast<size_t>(i)];
  if (!v.isTensor()) return fail(lazykv::ErrorKind::InvalidInput, "output is not a tensor");
  const auto& t = v.toTensor();
  if (t.dim() > LKV_MAX_DIMS) return fail(lazykv::ErrorKind::InvalidInput, "output has too many dims");
  out->data = t.mutable_data_ptr();
  out->scalar_type = static_cast<int32_t>(t.scalar_type());
  out->dim = static_cast<int32_t>(t.dim());
  for (ssize_t d = 0; d < t.dim(); ++d) out->sizes[d] = t.size(d);
  return 0;
}

LKV_EXPORT int lkv_session_stats(lkv_session* session, int64_t* out) {
  if (session == nullptr || out == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  const lazykv::SessionStats s = session->session->stats();
  const int64_t v[12] = {s.current_bytes, s.peak_bytes,    s.grow_events,        s.shrink_events,
                         s.bytes_copied,  s.positions_filled, s.capacity_positions, s.max_positions,
                         s.bytes_per_position, s.allocations, s.frees, s.grows};
  std::memcpy(out, v, sizeof(v));
  return 0;
}

LKV_EXPORT int lkv_session_trim(lkv_session* session, int64_t n, int64_t* positions, int64_t* bytes) {
  if (session == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  auto f = session->session->trim(n);
  if (!f.ok()) return fail(f.status());
  if (positions) *positions = f->positions;
  if (bytes) *bytes = f->bytes;
  return 0;
}

LKV_EXPORT int lkv_session_reset(lkv_session* session, int64_t* positions, int64_t* bytes) {
  if (session == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  auto f = session->session->reset();
  if (!f.ok()) return fail(f.status());
  if (positions) *positions = f->positions;
  if (bytes) *bytes = f->bytes;
  return 0;
}

LKV_EXPORT int lkv_session_save(lkv_session* session, const char* path, int64_t* written) {
  if (session == nullptr || path == nullptr) return fail(lazykv::ErrorKind::InvalidInput, "null argument");
  auto w = session->session->save(path);
  if (!w.ok()) return fail(w.status());
  if (written) *written = w.get();
  return 0;
}

}  // extern "C"
