// KV bytes of a program as `lazykv inspect` reports them (lazykv/inspect.py).
#include "kv_figures.h"

#include <climits>
#include <map>
#include <set>
#include <string>

namespace lazykv {

namespace {

// Bytes per element of a ScalarType, as inspect's _SCALAR_BYTES (1 for any other).
int64_t scalar_bytes(int st) {
  switch (st) {
    case 2: case 5: case 15: case 27: return 2;  // int16, float16, bfloat16, uint16
    case 3: case 6: case 28: return 4;           // int32, float32, uint32
    case 4: case 7: case 29: return 8;           // int64, float64, uint64
    default: return 1;
  }
}

// Saturating arithmetic: a corrupt file's sizes must not overflow (sizes < 0 count 0).
int64_t mul(int64_t a, int64_t b) {
  int64_t r;
  if (a <= 0 || b <= 0) return 0;
  return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

int64_t add(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? INT64_MAX : r;
}

int64_t tensor_nbytes(const fb::TensorValue& t) {
  int64_t n = scalar_bytes(t.scalar_type);
  for (int64_t d : t.sizes) n = mul(n, d);
  return n;
}

// Kernels whose argument 1 is a cache written in place at a position.
bool cache_update(const std::string& op) {
  return op == "llama::update_cache" || op == "llama::update_cache_with_indices" ||
         op == "llama::update_quantized_cache";
}

struct Entry {
  int64_t nbytes = 0;
  bool lazy = false;
  bool kv = false;
};

}  // namespace

KvFigures kv_figures(const fb::ProgramModel& model, const Manifest& manifest) {
  std::map<std::string, Entry> buffers;  // by FQN, else by planned location, else by value
  for (const fb::PlanModel& plan : model.plans) {
    if (plan.inputs.empty() && plan.instructions == 0) continue;  // a constant method
    std::set<int32_t> targets;
    for (const fb::KernelCall& k : plan.kernels) {
      if (k.op >= 0 && static_cast<size_t>(k.op) < plan.operators.size() &&
          cache_update(plan.operators[static_cast<size_t>(k.op)].first) && k.args.size() > 1) {
        targets.insert(k.args[1]);
      }
    }
    const std::set<int32_t> inputs(plan.inputs.begin(), plan.inputs.end());
    const std::set<int32_t> outputs(plan.outputs.begin(), plan.outputs.end());
    const int64_t first_input =
        inputs.empty() ? static_cast<int64_t>(plan.values.size()) : static_cast<int64_t>(*inputs.begin());
    for (size_t i = 0; i < plan.values.size(); ++i) {
      const int32_t v = static_cast<int32_t>(i);
      const fb::TensorValue* t = plan.tensor_of(v);
      if (t == nullptr || t->data_buffer_idx != 0 || inputs.count(v) || outputs.count(v)) continue;
      // A mutable buffer: planned or unbound and placed before the first user input
      // (the emitter writes parameters and buffers first), or named.
      const bool planned_or_unbound = t->has_allocation || t->dynamism == fb::kDynamicUnbound;
      if (!((static_cast<int64_t>(i) < first_input && planned_or_unbound) || !t->fqn.empty())) continue;
      std::string key;
      if (!t->fqn.empty()) key = "fqn:" + t->fqn;
      else if (t->has_allocation) key = "mem" + std::to_string(t->memory_id) + "@" + std::to_string(t->memory_offset);
      else key = plan.name + ":value" + std::to_string(i);
      const LazyBuffer* lb = t->fqn.empty() ? nullptr : manifest.buffer(t->fqn);
      auto found = buffers.find(key);
      if (found == buffers.end()) {
        Entry e;
        e.nbytes = lb != nullptr ? mul(lb->bytes_per_position(), lb->max_positions()) : tensor_nbytes(*t);
        e.lazy = lb != nullptr || t->dynamism == fb::kDynamicUnbound;
        e.kv = lb != nullptr;
        found = buffers.emplace(key, e).first;
      }
      if (targets.count(v)) found->second.kv = true;
    }
  }
  KvFigures f;
  int64_t lazy = 0;
  for (const auto& kv : buffers) {
    const Entry& e = kv.second;
    if (!e.kv && !e.lazy) continue;
    f.at_max_context = add(f.at_max_context, e.nbytes);
    if (e.lazy) lazy = add(lazy, e.nbytes);
  }
  f.planned_bytes = f.at_max_context - lazy;
  return f;
}

}  // namespace lazykv
