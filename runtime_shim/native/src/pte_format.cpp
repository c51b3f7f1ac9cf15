#include "pte_format.h"

#include <cstring>
#include <limits>

namespace lazykv {
namespace fb {

namespace {

// Caps that keep a corrupt count from turning into a huge allocation.
constexpr uint32_t kMaxDims = 64;

std::string where(size_t at, size_t n, size_t size) {
  return "a read of " + std::to_string(n) + " bytes at " + std::to_string(at) +
      " is outside the " + std::to_string(size) + "-byte program";
}

}  // namespace

template <typename T>
T FbReader::read(size_t at) const {
  if (at > size_ || sizeof(T) > size_ - at) {
    throw Corrupt(where(at, sizeof(T), size_));
  }
  T v;
  std::memcpy(&v, buf_ + at, sizeof(T));  // little-endian hosts only (x86, ARM)
  return v;
}

template uint8_t FbReader::read<uint8_t>(size_t) const;
template int8_t FbReader::read<int8_t>(size_t) const;
template uint16_t FbReader::read<uint16_t>(size_t) const;
template int32_t FbReader::read<int32_t>(size_t) const;
template uint32_t FbReader::read<uint32_t>(size_t) const;
template int64_t FbReader::read<int64_t>(size_t) const;
template uint64_t FbReader::read<uint64_t>(size_t) const;

size_t FbReader::field(size_t table, uint16_t slot) const {
  const int64_t vt = static_cast<int64_t>(table) - read<int32_t>(table);
  if (vt < 0 || static_cast<size_t>(vt) >= size_) {
    throw Corrupt("a vtable at " + std::to_string(vt) + " is outside the program");
  }
  const uint16_t vt_len = read<uint16_t>(static_cast<size_t>(vt));
  if (static_cast<size_t>(slot) + 2 > vt_len) {
    return 0;
  }
  const uint16_t off = read<uint16_t>(static_cast<size_t>(vt) + slot);
  if (off == 0) {
    return 0;
  }
  if (table + off >= size_) {
    throw Corrupt("a field at " + std::to_string(table + off) + " is outside the program");
  }
  return table + off;
}

size_t FbReader::ref(size_t table, uint16_t slot) const {
  const size_t at = field(table, slot);
  if (at == 0) {
    return 0;
  }
  const uint64_t target = static_cast<uint64_t>(at) + read<uint32_t>(at);
  if (target >= size_) {
    throw Corrupt("an offset at " + std::to_string(at) + " points past the program's end");
  }
  return static_cast<size_t>(target);
}

void FbReader::vector(size_t table, uint16_t slot, size_t elem, size_t* start, uint32_t* count) const {
  const size_t r = ref(table, slot);
  *start = 0;
  *count = 0;
  if (r == 0) {
    return;
  }
  const uint32_t n = read<uint32_t>(r);
  if (static_cast<uint64_t>(n) * elem > size_ - (r + 4 > size_ ? size_ : r + 4)) {
    throw Corrupt("a vector of " + std::to_string(n) + " elements at " + std::to_string(r) +
                  " runs past the program's end");
  }
  *start = r + 4;
  *count = n;
}

size_t FbReader::table_at(size_t start, uint32_t i) const {
  const size_t at = start + 4 * static_cast<size_t>(i);
  const uint64_t target = static_cast<uint64_t>(at) + read<uint32_t>(at);
  if (target >= size_) {
    throw Corrupt("a table offset at " + std::to_string(at) + " points past the program's end");
  }
  return static_cast<size_t>(target);
}

std::string FbReader::string(size_t table, uint16_t slot, bool* present) const {
  size_t start;
  uint32_t n;
  vector(table, slot, 1, &start, &n);
  if (present != nullptr) {
    *present = start != 0;
  }
  if (start == 0) {
    return std::string();
  }
  return std::string(reinterpret_cast<const char*>(buf_ + start), n);
}

size_t FbReader::root() const {
  const size_t r = read<uint32_t>(0);
  if (r >= size_) {
    throw Corrupt("the root table offset " + std::to_string(r) + " is outside the program");
  }
  return r;
}

const TensorValue* PlanModel::tensor_of(int32_t value) const {
  if (value < 0 || static_cast<size_t>(value) >= values.size()) {
    return nullptr;
  }
  const Value& v = values[static_cast<size_t>(value)];
  return v.tensor >= 0 ? &tensors[static_cast<size_t>(v.tensor)] : nullptr;
}

ExtendedHeader read_extended_header(const uint8_t* data, size_t size) {
  ExtendedHeader h;
  if (size < 40 || std::memcmp(data + 8, "eh00", 4) != 0) {
    return h;
  }
  std::memcpy(&h.length, data + 12, 4);
  if (h.length < 24) {
    return h;
  }
  std::memcpy(&h.program_size, data + 16, 8);
  std::memcpy(&h.segment_base_offset, data + 24, 8);
  if (h.length >= 32) {
    std::memcpy(&h.segment_data_size, data + 32, 8);
  }
  h.present = true;
  return h;
}

namespace {

std::vector<int32_t> read_int_vector(const FbReader& r, size_t table, uint16_t slot) {
  size_t start;
  uint32_t n;
  r.vector(table, slot, 4, &start, &n);
  std::vector<int32_t> out(n);
  for (uint32_t i = 0; i < n; ++i) {
    out[i] = r.read<int32_t>(start + 4 * static_cast<size_t>(i));
  }
  return out;
}

TensorValue read_tensor(const FbReader& r, size_t t) {
  TensorValue tv;
  tv.scalar_type = r.scalar<int8_t>(t, kTensor_scalar_type, 0);
  size_t start;
  uint32_t n;
  r.vector(t, kTensor_sizes, 4, &start, &n);
  if (n > kMaxDims) {
    throw Corrupt("a tensor with " + std::to_string(n) + " dimensions");
  }
  for (uint32_t i = 0; i < n; ++i) {
    tv.sizes.push_back(r.read<int32_t>(start + 4 * static_cast<size_t>(i)));
  }
  r.vector(t, kTensor_dim_order, 1, &start, &n);
  for (uint32_t i = 0; i < n; ++i) {
    if (r.read<uint8_t>(start + i) != i) {
      tv.default_dim_order = false;
    }
  }
  tv.dynamism_at = r.field(t, kTensor_shape_dynamism);
  tv.dynamism = tv.dynamism_at ? r.read<uint8_t>(tv.dynamism_at) : kStatic;
  tv.data_buffer_idx = r.scalar<uint32_t>(t, kTensor_data_buffer_idx, 0);
  const size_t alloc = r.ref(t, kTensor_allocation_info);
  tv.has_allocation = alloc != 0;
  if (alloc != 0) {
    tv.memory_id = r.scalar<uint32_t>(alloc, kAllocationDetails_memory_id, 0);
    tv.memory_offset = static_cast<uint64_t>(r.scalar<uint32_t>(alloc, kAllocationDetails_memory_offset_high, 0)) << 32 |
                       r.scalar<uint32_t>(alloc, kAllocationDetails_memory_offset_low, 0);
  }
  const size_t extra = r.ref(t, kTensor_extra_tensor_info);
  if (extra != 0) {
    tv.fqn = r.string(extra, kExtraTensorInfo_fully_qualified_name);
  }
  return tv;
}

PlanModel read_plan(const FbReader& r, size_t p) {
  PlanModel plan;
  plan.name = r.string(p, kExecutionPlan_name);
  size_t start;
  uint32_t n;
  r.vector(p, kExecutionPlan_values, 4, &start, &n);
  plan.values.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    const size_t ev = r.table_at(start, i);
    Value& v = plan.values[i];
    v.type = r.scalar<uint8_t>(ev, kEValue_val_type, 0);
    const size_t val = r.ref(ev, kEValue_val);
    if (val == 0) {
      continue;
    }
    if (v.type == kKernelTypes_Tensor) {
      v.tensor = static_cast<int>(plan.tensors.size());
      plan.tensors.push_back(read_tensor(r, val));
    } else if (v.type == kKernelTypes_Int) {
      v.int_val = r.scalar<int64_t>(val, kInt_int_val, 0);
    }
  }
  plan.inputs = read_int_vector(r, p, kExecutionPlan_inputs);
  plan.inputs_field = r.field(p, kExecutionPlan_inputs);
  plan.outputs = read_int_vector(r, p, kExecutionPlan_outputs);
  r.vector(p, kExecutionPlan_operators, 4, &start, &n);
  for (uint32_t i = 0; i < n; ++i) {
    const size_t op = r.table_at(start, i);
    plan.operators.emplace_back(r.string(op, kOperator_name), r.string(op, kOperator_overload));
  }
  size_t chains;
  uint32_t n_chains;
  r.vector(p, kExecutionPlan_chains, 4, &chains, &n_chains);
  for (uint32_t c = 0; c < n_chains; ++c) {
    const size_t chain = r.table_at(chains, c);
    size_t instrs;
    uint32_t n_instrs;
    r.vector(chain, kChain_instructions, 4, &instrs, &n_instrs);
    plan.instructions += n_instrs;
    for (uint32_t k = 0; k < n_instrs; ++k) {
      const size_t ins = r.table_at(instrs, k);
      if (r.scalar<uint8_t>(ins, kInstruction_instr_args_type, 0) != kInstructionArguments_KernelCall) {
        continue;
      }
      const size_t call = r.ref(ins, kInstruction_instr_args);
      if (call == 0) {
        continue;
      }
      KernelCall kc;
      kc.op = r.scalar<int32_t>(call, kKernelCall_op_index, 0);  // flatbuffers omit a default (0)
      kc.args = read_int_vector(r, call, kKernelCall_args);
      plan.kernels.push_back(std::move(kc));
    }
  }
  r.vector(p, kExecutionPlan_non_const_buffer_sizes, 8, &start, &n);
  for (uint32_t i = 0; i < n; ++i) {
    plan.non_const_buffer_sizes.push_back(r.read<int64_t>(start + 8 * static_cast<size_t>(i)));
  }
  return plan;
}

}  // namespace

ProgramModel parse_program(const uint8_t* buf, size_t size) {
  if (size < 8) {
    throw Corrupt("the program flatbuffer is " + std::to_string(size) + " bytes");
  }
  FbReader r(buf, size);
  const size_t root = r.root();
  ProgramModel m;
  size_t start;
  uint32_t n;
  r.vector(root, kProgram_execution_plan, 4, &start, &n);
  for (uint32_t i = 0; i < n; ++i) {
    m.plans.push_back(read_plan(r, r.table_at(start, i)));
  }
  r.vector(root, kProgram_segments, 4, &start, &n);
  for (uint32_t i = 0; i < n; ++i) {
    const size_t s = r.table_at(start, i);
    m.segments.push_back({r.scalar<uint64_t>(s, kDataSegment_offset, 0),
                          r.scalar<uint64_t>(s, kDataSegment_size, 0)});
  }
  r.vector(root, kProgram_named_data, 4, &start, &n);
  for (uint32_t i = 0; i < n; ++i) {
    const size_t nd = r.table_at(start, i);
    m.named_data.emplace_back(r.string(nd, kNamedData_key),
                              r.scalar<uint32_t>(nd, kNamedData_segment_index, 0));
  }
  return m;
}

}  // namespace fb
}  // namespace lazykv
