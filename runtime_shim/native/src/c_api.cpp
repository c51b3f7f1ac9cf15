// The C ABI of include/lazykv/c_api.h over lazykv::Program / lazykv::Session.
#include <lazykv/c_api.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <executorch/runtime/core/portable_type/tensor_impl.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/method_meta.h>

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

struct lkv_raw_method {
  executorch::runtime::Method* method = nullptr;
  /// Per input: not memory-planned, so set_input aliases the caller's data.
  std::vector<char> aliased;
  /// Per aliased input: what it points at now (set again only when this changes).
  struct Bound {
    bool valid = false;
    void* data = nullptr;
    int32_t scalar_type = -1;
    int32_t dim = -1;
    int64_t sizes[LKV_MAX_DIMS] = {0};
  };
  std::vector<Bound> bound;
};

struct lkv_raw_program {
  std::shared_ptr<lazykv::Program> program;
  std::mutex mutex;  // guards `methods`
  std::map<std::string, std::unique_ptr<lkv_raw_method>> methods;
};

namespace {

thread_local std::string g_error;
thread_local int g_et_error = 0;

int fail(const lazykv::Status& s) {
  g_error = s.to_string();
  g_et_error = s.et_error();
  return static_cast<int>(s.kind());
}

int fail(lazykv::ErrorKind kind, const std::string& message) {
  return fail(lazykv::Status(kind, message));
}

/// The raw calls' failures: the message alone (the kind is the return code).
int fail_raw(const lazykv::Status& s) {
  g_error = s.message();
  g_et_error = s.et_error();
  return static_cast<int>(s.kind());
}

int fail_raw(lazykv::ErrorKind kind, const std::string& message) {
  return fail_raw(lazykv::Status(kind, message));
}

}  // namespace

extern "C" {

LKV_EXPORT int lkv_abi_version(void) { return LKV_ABI_VERSION; }

LKV_EXPORT const char* lkv_last_error(void) { return g_error.c_str(); }

LKV_EXPORT int lkv_last_et_error(void) { return g_et_error; }

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

// -- raw programs ----------------------------------------------------------------------------

LKV_EXPORT int lkv_raw_program_load(const char* path, const void* data, int64_t size, const char* name,
                                    lkv_raw_program** out) {
  if (out == nullptr || (path == nullptr && (size < 0 || (data == nullptr && size != 0)))) {
    return fail_raw(lazykv::ErrorKind::InvalidInput, "bad arguments to lkv_raw_program_load");
  }
  *out = nullptr;
  lazykv::LoadOptions options;
  options.defer_methods = true;
  options.resident = true;  // what ExecuTorch's Python runtime holds (lazykv.estimate counts it)
  const std::string label = name ? name : (path ? path : "<bytes>");
  auto loaded = path ? lazykv::Program::load(path, options)
                     : lazykv::Program::load_bytes(data, static_cast<size_t>(size), label, options);
  if (!loaded.ok()) return fail_raw(loaded.status());
  lkv_raw_program* handle = new (std::nothrow) lkv_raw_program();
  if (handle == nullptr) return fail_raw(lazykv::ErrorKind::AllocationFailed, "out of memory");
  handle->program = loaded.get();
  *out = handle;
  return 0;
}

LKV_EXPORT void lkv_raw_program_free(lkv_raw_program* program) { delete program; }

LKV_EXPORT int lkv_raw_method_load(lkv_raw_program* program, const char* name, lkv_raw_method** out, int32_t* n_inputs) {
  if (program == nullptr || name == nullptr || out == nullptr) {
    return fail_raw(lazykv::ErrorKind::InvalidInput, "null argument");
  }
  *out = nullptr;
  try {
    std::lock_guard<std::mutex> lock(program->mutex);
    auto it = program->methods.find(name);
    if (it == program->methods.end()) {
      auto m = program->program->raw_method(name);
      if (!m.ok()) return fail_raw(m.status());
      std::unique_ptr<lkv_raw_method> rm(new lkv_raw_method());
      rm->method = m.get();
      const size_t n = rm->method->inputs_size();
      rm->aliased.assign(n, 0);
      rm->bound.assign(n, lkv_raw_method::Bound());
      const executorch::runtime::MethodMeta meta = rm->method->method_meta();
      for (size_t i = 0; i < n; ++i) {
        auto tag = meta.input_tag(i);
        if (!tag.ok() || tag.get() != executorch::runtime::Tag::Tensor) continue;
        auto info = meta.input_tensor_meta(i);
        rm->aliased[i] = info.ok() && !info->is_memory_planned();
      }
      it = program->methods.emplace(name, std::move(rm)).first;
    }
    *out = it->second.get();
    if (n_inputs != nullptr) *n_inputs = static_cast<int32_t>(it->second->method->inputs_size());
    return 0;
  } catch (const std::bad_alloc&) {
    return fail_raw(lazykv::ErrorKind::AllocationFailed, "out of memory loading a method");
  }
}

LKV_EXPORT int lkv_raw_execute(lkv_raw_method* method, const lkv_value* inputs, int32_t n, lkv_value* outputs,
                               int32_t max_outputs, int32_t* n_outputs) {
  using executorch::runtime::EValue;
  using executorch::runtime::Error;
  if (method == nullptr || n < 0 || (n > 0 && inputs == nullptr) || max_outputs < 0 ||
      (max_outputs > 0 && outputs == nullptr)) {
    return fail_raw(lazykv::ErrorKind::InvalidInput, "bad arguments to lkv_raw_execute");
  }
  executorch::runtime::Method& m = *method->method;
  if (static_cast<size_t>(n) != m.inputs_size()) {
    return fail_raw(lazykv::ErrorKind::InvalidInput, "the method takes " + std::to_string(m.inputs_size()) +
                                                     " inputs, got " + std::to_string(n));
  }
  for (int32_t i = 0; i < n; ++i) {
    const lkv_value& v = inputs[i];
    lkv_raw_method::Bound& b = method->bound[static_cast<size_t>(i)];
    Error err = Error::Ok;
    if (v.kind == LKV_VALUE_TENSOR) {
      if (v.dim < 0 || v.dim > LKV_MAX_DIMS) return fail_raw(lazykv::ErrorKind::InvalidInput, "a tensor with a bad dim");
      const bool aliased = method->aliased[static_cast<size_t>(i)] != 0;
      if (aliased && b.valid && b.data == v.data && b.scalar_type == v.scalar_type && b.dim == v.dim &&
          std::memcmp(b.sizes, v.sizes, sizeof(int64_t) * static_cast<size_t>(v.dim)) == 0) {
        continue;  // still bound to this storage (DESIGN fact 14: unplanned inputs alias)
      }
      executorch::aten::SizesType sizes[LKV_MAX_DIMS];
      executorch::aten::DimOrderType order[LKV_MAX_DIMS];
      executorch::aten::StridesType strides[LKV_MAX_DIMS];
      int64_t stride = 1;
      for (int d = v.dim - 1; d >= 0; --d) {
        sizes[d] = static_cast<executorch::aten::SizesType>(v.sizes[d]);
        order[d] = static_cast<executorch::aten::DimOrderType>(d);
        strides[d] = static_cast<executorch::aten::StridesType>(stride);
        stride *= v.sizes[d];
      }
      executorch::runtime::etensor::TensorImpl impl(static_cast<executorch::aten::ScalarType>(v.scalar_type), v.dim,
                                                    sizes, v.data, order, strides,
                                                    executorch::runtime::TensorShapeDynamism::DYNAMIC_BOUND);
      err = m.set_input(EValue(executorch::aten::Tensor(&impl)), static_cast<size_t>(i));
      b.valid = aliased && err == Error::Ok;
      if (b.valid) {
        b.data = v.data;
        b.scalar_type = v.scalar_type;
        b.dim = v.dim;
        std::memcpy(b.sizes, v.sizes, sizeof(int64_t) * static_cast<size_t>(v.dim));
      }
    } else if (v.kind == LKV_VALUE_INT) {
      err = m.set_input(EValue(v.i), static_cast<size_t>(i));
    } else if (v.kind == LKV_VALUE_DOUBLE) {
      err = m.set_input(EValue(v.d), static_cast<size_t>(i));
    } else if (v.kind == LKV_VALUE_BOOL) {
      err = m.set_input(EValue(v.i != 0), static_cast<size_t>(i));
    } else if (v.kind == LKV_VALUE_NONE) {
      err = m.set_input(EValue(), static_cast<size_t>(i));
    } else {
      return fail_raw(lazykv::ErrorKind::InvalidInput, "input " + std::to_string(i) + " has an unknown kind");
    }
    if (err != Error::Ok) {
      b.valid = false;
      char code[8];
      std::snprintf(code, sizeof(code), "%02x", static_cast<int>(err));
      return fail_raw(lazykv::Status(lazykv::ErrorKind::InvalidInput,
                                 "ExecuTorch refused input " + std::to_string(i) + ", error 0x" + code,
                                 static_cast<int>(err)));
    }
  }
  const Error err = m.execute();
  if (err != Error::Ok) {
    char code[8];
    std::snprintf(code, sizeof(code), "%02x", static_cast<int>(err));
    return fail_raw(lazykv::Status(lazykv::ErrorKind::ExecutionFailed,
                               std::string("the ExecuTorch runtime failed while running it, error 0x") + code,
                               static_cast<int>(err)));
  }
  const size_t count = m.outputs_size();
  if (n_outputs != nullptr) *n_outputs = static_cast<int32_t>(count);
  for (size_t i = 0; i < count && i < static_cast<size_t>(max_outputs); ++i) {
    const EValue& o = m.get_output(i);
    lkv_value& d = outputs[i];
    d.kind = LKV_VALUE_NONE;
    d.data = nullptr;
    d.dim = 0;
    if (o.isTensor()) {
      const auto& t = o.toTensor();
      if (t.dim() > LKV_MAX_DIMS) return fail_raw(lazykv::ErrorKind::ExecutionFailed, "an output has too many dims");
      d.kind = LKV_VALUE_TENSOR;
      d.data = t.mutable_data_ptr();
      d.scalar_type = static_cast<int32_t>(t.scalar_type());
      d.dim = static_cast<int32_t>(t.dim());
      for (ssize_t k = 0; k < t.dim(); ++k) d.sizes[k] = t.size(k);
    } else if (o.isInt()) {
      d.kind = LKV_VALUE_INT;
      d.i = o.toInt();
    } else if (o.isDouble()) {
      d.kind = LKV_VALUE_DOUBLE;
      d.d = o.toDouble();
    } else if (o.isBool()) {
      d.kind = LKV_VALUE_BOOL;
      d.i = o.toBool() ? 1 : 0;
    }
  }
  return 0;
}

}  // extern "C"
