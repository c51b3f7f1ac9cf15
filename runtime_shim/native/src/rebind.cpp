#include "rebind.h"

#include <cstring>
#include <set>

#include "json.h"

namespace lazykv {

namespace {

struct DType {
  const char* name;
  int scalar_type;
  int64_t size;
};

constexpr DType kDTypes[] = {
    {"uint8", 0, 1},   {"int8", 1, 1},     {"int16", 2, 2},    {"int32", 3, 4},     {"int64", 4, 8},
    {"float16", 5, 2}, {"float32", 6, 4},  {"float64", 7, 8},  {"bool", 11, 1},     {"bfloat16", 15, 2},
};

Status manifest_error(const std::string& message) {
  return Status(ErrorKind::ManifestError, message);
}

Status invalid(const std::string& message) {
  return Status(ErrorKind::InvalidProgram, message);
}

uint64_t align_up(uint64_t v, uint64_t a) {
  return (v + a - 1) / a * a;
}

}  // namespace

bool dtype_info(const std::string& name, int* scalar_type, int64_t* element_size) {
  for (const DType& d : kDTypes) {
    if (name == d.name) {
      *scalar_type = d.scalar_type;
      *element_size = d.size;
      return true;
    }
  }
  return false;
}

const char* dtype_name(int scalar_type) {
  for (const DType& d : kDTypes) {
    if (d.scalar_type == scalar_type) return d.name;
  }
  return "";
}

int64_t LazyBuffer::element_size() const {
  int st;
  int64_t size = 0;
  dtype_info(dtype, &st, &size);
  return size;
}

int64_t LazyBuffer::bytes_per_position() const {
  int64_t n = element_size();
  for (size_t i = 0; i < max_shape.size(); ++i) {
    if (static_cast<int>(i) != growth_axis) n *= max_shape[i];
  }
  return n;
}

std::vector<int64_t> LazyBuffer::shape_at(int64_t positions) const {
  std::vector<int64_t> s = max_shape;
  s[static_cast<size_t>(growth_axis)] = positions;
  return s;
}

const FillRule* Manifest::fill_rule(const std::string& method) const {
  for (const FillRule& r : fill_rules) {
    if (r.method == method) return &r;
  }
  return nullptr;
}

const LazyBuffer* Manifest::buffer(const std::string& fqn) const {
  for (const LazyBuffer& b : buffers) {
    if (b.fqn == fqn) return &b;
  }
  return nullptr;
}

Result<Manifest> parse_manifest(const std::string& bytes, const std::string& source) {
  json::Value d;
  try {
    d = json::parse(bytes);
  } catch (const json::JsonError& e) {
    return manifest_error(source + ": the lazykv manifest is not valid JSON (" + e.what() +
                          "); re-export the program with lazykv");
  }
  const json::Value* format = d.get("format");
  if (!d.is_object() || format == nullptr || !format->is_string() || format->s != "lazykv-manifest") {
    return manifest_error(source + ": the blob under 'lazykv/manifest' is not a lazykv manifest");
  }
  const json::Value* version = d.get("version");
  if (version == nullptr || !version->is_int() || version->i < 1) {
    return manifest_error(source + ": lazykv manifest has no valid version");
  }
  Manifest m;
  const json::Value* producer = d.get("producer");
  m.producer = producer != nullptr && producer->is_string() ? producer->s : "";
  if (version->i > kManifestVersion) {
    return manifest_error(source + ": lazykv manifest version " + std::to_string(version->i) +
                          " was written by a newer lazykv (" + (m.producer.empty() ? "unknown" : m.producer) +
                          "); this lazykv reads up to version " + std::to_string(kManifestVersion) +
                          ". Upgrade lazykv to run this program.");
  }
  m.version = static_cast<int>(version->i);
  m.json = bytes;
  try {
    for (const json::Value& b : d.need("lazy_buffers", json::Value::Type::Array).a) {
      LazyBuffer lb;
      lb.fqn = b.need("fqn", json::Value::Type::String).s;
      lb.dtype = b.need("dtype", json::Value::Type::String).s;
      int64_t elem = 0;
      if (!dtype_info(lb.dtype, &lb.scalar_type, &elem)) {
        return manifest_error(source + ": lazy buffer '" + lb.fqn + "': unknown dtype '" + lb.dtype + "'");
      }
      for (const json::Value& x : b.need("max_shape", json::Value::Type::Array).a) {
        if (!x.is_int()) throw json::JsonError("max_shape holds a non-integer");
        if (x.i <= 0 || x.i > (int64_t(1) << 40)) {
          return manifest_error(source + ": lazy buffer '" + lb.fqn + "': bad shape");
        }
        lb.max_shape.push_back(x.i);
      }
      if (lb.max_shape.empty() || lb.max_shape.size() > 16) {
        return manifest_error(source + ": lazy buffer '" + lb.fqn + "': bad shape");
      }
      const int64_t axis = b.need("growth_axis", json::Value::Type::Int).i;
      if (axis < 0 || axis >= static_cast<int64_t>(lb.max_shape.size())) {
        return manifest_error(source + ": lazy buffer '" + lb.fqn + "': growth axis " + std::to_string(axis) +
                              " is outside its shape");
      }
      lb.growth_axis = static_cast<int>(axis);
      int64_t total = elem;
      for (int64_t x : lb.max_shape) {
        if (total > (int64_t(1) << 50) / x) {
          return manifest_error(source + ": lazy buffer '" + lb.fqn + "': shape too large");
        }
        total *= x;
      }
      for (const json::Value& x : b.need("methods", json::Value::Type::Array).a) {
        if (!x.is_string()) throw json::JsonError("methods holds a non-string");
        lb.methods.push_back(x.s);
      }
      const int64_t bpp = b.need("bytes_per_position", json::Value::Type::Int).i;
      if (bpp != lb.bytes_per_position()) {
        return manifest_error(source + ": lazy buffer '" + lb.fqn + "' records " + std::to_string(bpp) +
                              " bytes per position but its shape and dtype give " +
                              std::to_string(lb.bytes_per_position()));
      }
      m.buffers.push_back(std::move(lb));
    }
    for (const json::Value& r : d.need("fill_rules", json::Value::Type::Array).a) {
      FillRule fr;
      fr.method = r.need("method", json::Value::Type::String).s;
      const char* names[] = {"position_input", "position_index", "length_input", "length_axis"};
      int* slots[] = {&fr.position_input, &fr.position_index, &fr.length_input, &fr.length_axis};
      for (int k = 0; k < 4; ++k) {
        const int64_t v = r.need(names[k], json::Value::Type::Int).i;
        if (v < 0 || v > (1 << 20)) {
          return manifest_error(source + ": fill rule of '" + fr.method + "' has a bad " + names[k]);
        }
        *slots[k] = static_cast<int>(v);
      }
      m.fill_rules.push_back(fr);
    }
  } catch (const json::JsonError& e) {
    return manifest_error(source + ": lazykv manifest is malformed (" + e.what() +
                          "); re-export the program with lazykv");
  }
  std::set<std::string> seen;
  for (const LazyBuffer& b : m.buffers) {
    if (!seen.insert(b.fqn).second) {
      return manifest_error(source + ": lazy buffer '" + b.fqn + "' is listed twice");
    }
    for (const std::string& method : b.methods) {
      if (m.fill_rule(method) == nullptr) {
        return manifest_error(source + ": method '" + method + "' uses lazy buffer '" + b.fqn +
                              "' but the manifest has no fill rule for it");
      }
    }
  }
  return m;
}

Result<Rebound> rebind(const uint8_t* program, size_t program_size, const fb::ExtendedHeader& header,
                       uint64_t file_size, const fb::ProgramModel& model, const Manifest& manifest,
                       const std::string& source) {
  if (!header.present || header.length < 24 || header.segment_base_offset == 0) {
    return invalid(source + ": a lazy program without an extended header or segments; re-export it with lazykv");
  }
  Rebound out;
  std::vector<uint8_t> buf(program, program + program_size);
  struct NewVector {
    size_t field;
    std::vector<int32_t> items;
  };
  std::vector<NewVector> vectors;
  for (const fb::PlanModel& plan : model.plans) {
    std::map<std::string, int32_t> lazy;  // fqn -> value index
    for (size_t j = 0; j < plan.values.size(); ++j) {
      const fb::TensorValue* t = plan.tensor_of(static_cast<int32_t>(j));
      if (t == nullptr || t->dynamism != fb::kDynamicUnbound) continue;
      if (t->fqn.empty()) {
        return invalid(source + ": method '" + plan.name + "' value " + std::to_string(j) +
                       " is DYNAMIC_UNBOUND but has no fully qualified name; re-export with lazykv");
      }
      if (!lazy.emplace(t->fqn, static_cast<int32_t>(j)).second) {
        return invalid(source + ": lazy buffer '" + t->fqn + "' appears twice in '" + plan.name + "'");
      }
    }
    for (const LazyBuffer& b : manifest.buffers) {
      bool uses = false;
      for (const std::string& m : b.methods) uses = uses || m == plan.name;
      if (uses && lazy.count(b.fqn) == 0) {
        return invalid(source + ": the manifest says '" + plan.name + "' uses lazy buffer '" + b.fqn +
                       "' but that method has no DYNAMIC_UNBOUND tensor by that name");
      }
    }
    std::vector<std::string> fqns;
    for (const LazyBuffer& b : manifest.buffers) {
      if (lazy.count(b.fqn)) fqns.push_back(b.fqn);
    }
    if (fqns.size() != lazy.size()) {
      std::string extra;
      for (const auto& kv : lazy) {
        if (manifest.buffer(kv.first) == nullptr) extra += (extra.empty() ? "'" : ", '") + kv.first + "'";
      }
      return invalid(source + ": method '" + plan.name +
                     "' has DYNAMIC_UNBOUND tensors the lazykv manifest does not list: [" + extra +
                     "]; re-export with lazykv");
    }
    out.appended[plan.name] = fqns;
    if (fqns.empty()) continue;
    if (manifest.fill_rule(plan.name) == nullptr) {
      return invalid(source + ": method '" + plan.name + "' has lazy buffers but no fill rule in the manifest");
    }
    std::vector<int32_t> items = plan.inputs;
    for (const std::string& fqn : fqns) {
      const int32_t j = lazy[fqn];
      const fb::TensorValue* t = plan.tensor_of(j);
      const LazyBuffer* lb = manifest.buffer(fqn);
      if (t->sizes != lb->max_shape || t->scalar_type != lb->scalar_type) {
        return invalid(source + ": lazy buffer '" + fqn + "' in '" + plan.name + "' is " +
                       dtype_name(t->scalar_type) + " of another shape than the manifest's " + lb->dtype);
      }
      if (!t->default_dim_order) {
        return invalid(source + ": lazy buffer '" + fqn + "' has a non-default dim order; lazykv binds "
                       "contiguous storage only");
      }
      if (t->has_allocation) {
        return invalid(source + ": lazy buffer '" + fqn + "' in '" + plan.name +
                       "' has an allocation (memory id and offset); a lazy buffer has none. Re-export with lazykv");
      }
      if (t->dynamism_at == 0 || t->dynamism_at >= buf.size()) {
        return invalid(source + ": lazy buffer '" + fqn + "' has no stored shape_dynamism");
      }
      buf[t->dynamism_at] = fb::kDynamicBound;
      items.push_back(j);
    }
    if (plan.inputs_field == 0) {
      return invalid(source + ": method '" + plan.name + "' has no inputs vector; re-export with lazykv");
    }
    vectors.push_back({plan.inputs_field, std::move(items)});
  }
  for (const NewVector& v : vectors) {
    buf.resize(align_up(buf.size(), 4), 0);
    const size_t at = buf.size();
    const uint32_t n = static_cast<uint32_t>(v.items.size());
    buf.resize(at + 4 + 4 * v.items.size());
    std::memcpy(buf.data() + at, &n, 4);
    std::memcpy(buf.data() + at + 4, v.items.data(), 4 * v.items.size());
    const uint32_t rel = static_cast<uint32_t>(at - v.field);
    std::memcpy(buf.data() + v.field, &rel, 4);
  }
  const uint64_t new_size = buf.size();
  uint64_t base = header.segment_base_offset;
  if (new_size > base) {
    // Keep every segment's alignment: the largest power of two dividing the old base.
    uint64_t align = base & (~base + 1);
    if (align > (1u << 16)) align = 1u << 16;
    if (align < 128) align = 128;
    base = align_up(new_size, align);
  }
  // Extended header fields (the layout of schema/extended_header.h).
  std::memcpy(buf.data() + 16, &new_size, 8);
  std::memcpy(buf.data() + 24, &base, 8);
  if (header.length >= 32) {
    const uint64_t seg_data = file_size - header.segment_base_offset;
    std::memcpy(buf.data() + 32, &seg_data, 8);
  }
  buf.resize(base, 0);
  out.region = std::move(buf);
  out.segment_base = base;
  return out;
}

Status check_indices(const fb::PlanModel& plan, const std::string& source) {
  const int64_t n_values = static_cast<int64_t>(plan.values.size());
  const int64_t n_ops = static_cast<int64_t>(plan.operators.size());
  const std::string where = source + ": method '" + plan.name + "'";
  for (size_t k = 0; k < plan.kernels.size(); ++k) {
    const fb::KernelCall& call = plan.kernels[k];
    if (call.op < 0 || call.op >= n_ops) {
      return invalid(where + ": kernel call " + std::to_string(k) + " calls operator " + std::to_string(call.op) +
                     " of " + std::to_string(n_ops) + ". The file is corrupt; re-export it");
    }
    for (int32_t a : call.args) {
      if (a < 0 || a >= n_values) {
        return invalid(where + ": kernel call " + std::to_string(k) + " (" + plan.operators[static_cast<size_t>(call.op)].first +
                       ") refers to value " + std::to_string(a) + " of " + std::to_string(n_values) +
                       ". The file is corrupt; re-export it");
      }
    }
  }
  for (const auto* list : {&plan.inputs, &plan.outputs}) {
    for (int32_t v : *list) {
      if (v < 0 || v >= n_values) {
        return invalid(where + ": an input or output refers to value " + std::to_string(v) + " of " +
                       std::to_string(n_values) + ". The file is corrupt; re-export it");
      }
    }
  }
  return Status();
}

MethodInfo describe_method(const fb::PlanModel& plan) {
  MethodInfo info;
  info.name = plan.name;
  std::map<int32_t, int> input_of;
  for (size_t i = 0; i < plan.inputs.size(); ++i) {
    const int32_t v = plan.inputs[i];
    input_of.emplace(v, static_cast<int>(i));
    InputSpec spec;
    if (v >= 0 && static_cast<size_t>(v) < plan.values.size()) {
      const fb::Value& val = plan.values[static_cast<size_t>(v)];
      if (val.tensor >= 0) {
        const fb::TensorValue& t = plan.tensors[static_cast<size_t>(val.tensor)];
        spec.kind = InputSpec::Kind::Tensor;
        spec.scalar_type = t.scalar_type;
        spec.sizes = t.sizes;
        spec.dynamic = t.dynamism != fb::kStatic;
      } else if (val.type == fb::kKernelTypes_Int) {
        spec.kind = InputSpec::Kind::Int;
      } else if (val.type == fb::kKernelTypes_Double) {
        spec.kind = InputSpec::Kind::Float;
      } else if (val.type == fb::kKernelTypes_Bool) {
        spec.kind = InputSpec::Kind::Bool;
      }
    }
    info.inputs.push_back(spec);
  }
  // The graph facts of pte_validate._limits_of: embeddings indexed by an input (token
  // ids must lie in the table) and the start position of llama::update_cache.
  std::map<int32_t, const fb::KernelCall*> writer;
  for (const fb::KernelCall& k : plan.kernels) {
    if (!k.args.empty()) writer[k.args.back()] = &k;
  }
  auto op_is = [&plan](const fb::KernelCall* k, const char* name, const char* overload) {
    if (k == nullptr || k->op < 0 || static_cast<size_t>(k->op) >= plan.operators.size()) return false;
    const auto& op = plan.operators[static_cast<size_t>(k->op)];
    return op.first == name && op.second == overload;
  };
  std::set<std::pair<int, int64_t>> tokens;
  for (const fb::KernelCall& k : plan.kernels) {
    if (op_is(&k, "aten::embedding", "out") && k.args.size() >= 2 && input_of.count(k.args[1])) {
      const fb::TensorValue* w = plan.tensor_of(k.args[0]);
      if (w != nullptr && !w->sizes.empty()) tokens.emplace(input_of[k.args[1]], w->sizes[0]);
    }
    if (k.op < 0 || static_cast<size_t>(k.op) >= plan.operators.size() || k.args.size() < 3) continue;
    const std::string& name = plan.operators[static_cast<size_t>(k.op)].first;
    if (name != "llama::update_cache" && name != "llama::update_cache_with_indices") continue;
    const fb::TensorValue* cache = plan.tensor_of(k.args[1]);
    if (cache != nullptr && cache->sizes.size() > 1) {
      const int64_t cap = cache->sizes[1];
      info.cache_positions = info.cache_positions < 0 ? cap : std::min(info.cache_positions, cap);
    }
    auto src = writer.find(k.args[2]);
    if (src == writer.end() || !op_is(src->second, "aten::_local_scalar_dense", "") || src->second->args.empty()) {
      continue;
    }
    auto sel = writer.find(src->second->args[0]);
    if (sel == writer.end() || !op_is(sel->second, "aten::select_copy", "int_out") || sel->second->args.size() < 3) {
      continue;
    }
    const int32_t x = sel->second->args[0];
    const fb::TensorValue* xt = plan.tensor_of(x);
    auto int_of = [&plan](int32_t v, int64_t dflt) {
      if (v < 0 || static_cast<size_t>(v) >= plan.values.size()) return dflt;
      const fb::Value& val = plan.values[static_cast<size_t>(v)];
      return val.type == fb::kKernelTypes_Int ? val.int_val : dflt;
    };
    if (input_of.count(x) && xt != nullptr && xt->sizes.size() == 1 && int_of(sel->second->args[1], -1) == 0) {
      info.position_input = input_of[x];
      info.position_index = static_cast<int>(int_of(sel->second->args[2], 0));
    }
  }
  info.token_inputs.assign(tokens.begin(), tokens.end());
  if (info.position_input >= 0 && tokens.size() == 1) {
    const int t = tokens.begin()->first;
    if (info.inputs[static_cast<size_t>(t)].sizes.size() == 2) info.length_input = t;
  }
  return info;
}

}  // namespace lazykv
