// The few tables of ExecuTorch's program flatbuffer that lazykv reads and patches.
//
// No flatbuffers headers and no generated `program_generated.h`: the wheel ships
// neither, and only ~10 tables are needed. `FbReader` bounds-checks every read (a
// corrupt file throws `Corrupt`, turned into InvalidProgram at the API), and the slot
// numbers below are checked against the wheel's `executorch/schema/program.fbs` by
// tests/test_native.py (`test_slots_match_program_fbs`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lazykv {
namespace fb {

// vtable slot = 4 + 2 * field index (a union takes two fields: type, then value).
// SLOTS-BEGIN (parsed by tests/test_native.py; keep one `constexpr` per line)
constexpr uint16_t kProgram_execution_plan = 6;
constexpr uint16_t kProgram_segments = 12;
constexpr uint16_t kProgram_named_data = 18;
constexpr uint16_t kExecutionPlan_name = 4;
constexpr uint16_t kExecutionPlan_values = 8;
constexpr uint16_t kExecutionPlan_inputs = 10;
constexpr uint16_t kExecutionPlan_outputs = 12;
constexpr uint16_t kExecutionPlan_chains = 14;
constexpr uint16_t kExecutionPlan_operators = 16;
constexpr uint16_t kExecutionPlan_non_const_buffer_sizes = 20;
constexpr uint16_t kEValue_val_type = 4;
constexpr uint16_t kEValue_val = 6;
constexpr uint16_t kTensor_scalar_type = 4;
constexpr uint16_t kTensor_sizes = 8;
constexpr uint16_t kTensor_dim_order = 10;
constexpr uint16_t kTensor_data_buffer_idx = 14;
constexpr uint16_t kTensor_allocation_info = 16;
constexpr uint16_t kTensor_shape_dynamism = 20;
constexpr uint16_t kTensor_extra_tensor_info = 22;
constexpr uint16_t kExtraTensorInfo_fully_qualified_name = 6;
constexpr uint16_t kAllocationDetails_memory_id = 4;
constexpr uint16_t kAllocationDetails_memory_offset_low = 6;
constexpr uint16_t kAllocationDetails_memory_offset_high = 8;
constexpr uint16_t kInt_int_val = 4;
constexpr uint16_t kOperator_name = 4;
constexpr uint16_t kOperator_overload = 6;
constexpr uint16_t kChain_instructions = 8;
constexpr uint16_t kInstruction_instr_args_type = 4;
constexpr uint16_t kInstruction_instr_args = 6;
constexpr uint16_t kKernelCall_op_index = 4;
constexpr uint16_t kKernelCall_args = 6;
constexpr uint16_t kDataSegment_offset = 4;
constexpr uint16_t kDataSegment_size = 6;
constexpr uint16_t kNamedData_key = 4;
constexpr uint16_t kNamedData_segment_index = 6;
// SLOTS-END

// Union members (1-based, in declaration order of program.fbs).
constexpr uint8_t kKernelTypes_Int = 2;
constexpr uint8_t kKernelTypes_Bool = 3;
constexpr uint8_t kKernelTypes_Double = 4;
constexpr uint8_t kKernelTypes_Tensor = 5;
constexpr uint8_t kInstructionArguments_KernelCall = 1;
// TensorShapeDynamism.
constexpr uint8_t kStatic = 0;
constexpr uint8_t kDynamicBound = 1;
constexpr uint8_t kDynamicUnbound = 2;

/// A structural problem in the bytes; the message says where.
struct Corrupt : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Bounds-checked reads of a flatbuffer of `size` bytes.
class FbReader {
 public:
  FbReader(const uint8_t* buf, size_t size) : buf_(buf), size_(size) {}

  template <typename T>
  T read(size_t at) const;
  /// Absolute position of a table field, 0 if absent.
  size_t field(size_t table, uint16_t slot) const;
  template <typename T>
  T scalar(size_t table, uint16_t slot, T dflt) const {
    size_t at = field(table, slot);
    return at ? read<T>(at) : dflt;
  }
  /// Target of an offset field (table, vector or string), 0 if absent.
  size_t ref(size_t table, uint16_t slot) const;
  /// (start of elements, count) of a vector field; count 0 and start 0 if absent.
  void vector(size_t table, uint16_t slot, size_t elem, size_t* start, uint32_t* count) const;
  /// The i-th table of a vector of tables starting at `start`.
  size_t table_at(size_t start, uint32_t i) const;
  std::string string(size_t table, uint16_t slot, bool* present = nullptr) const;
  size_t root() const;
  size_t size() const { return size_; }

 private:
  const uint8_t* buf_;
  size_t size_;
};

/// One tensor value of a plan.
struct TensorValue {
  int scalar_type = -1;
  std::vector<int64_t> sizes;
  bool default_dim_order = true;
  uint8_t dynamism = kStatic;
  size_t dynamism_at = 0;       ///< absolute position of the stored shape_dynamism byte (0: default)
  bool has_allocation = false;
  uint32_t memory_id = 0;       ///< allocation_info, when has_allocation
  uint64_t memory_offset = 0;   ///< allocation_info: (high << 32) | low
  uint32_t data_buffer_idx = 0; ///< > 0: a constant (or mutable with an initial value)
  std::string fqn;
};

/// One value: its union type, and the tensor or int it holds.
struct Value {
  uint8_t type = 0;
  int64_t int_val = 0;
  int tensor = -1;  ///< index into PlanModel::tensors
};

struct KernelCall {
  int op = -1;
  std::vector<int32_t> args;
};

struct PlanModel {
  std::string name;
  std::vector<Value> values;
  std::vector<TensorValue> tensors;
  std::vector<int32_t> inputs;
  std::vector<int32_t> outputs;
  size_t inputs_field = 0;  ///< absolute position of the plan's `inputs` offset field (0: absent)
  std::vector<std::pair<std::string, std::string>> operators;
  std::vector<KernelCall> kernels;  ///< every KernelCall, in chain order
  size_t instructions = 0;          ///< every instruction of every chain (any kind)
  std::vector<int64_t> non_const_buffer_sizes;
  const TensorValue* tensor_of(int32_t value) const;
};

struct Segment {
  uint64_t offset = 0;
  uint64_t size = 0;
};

/// The parts of a program lazykv uses.
struct ProgramModel {
  std::vector<PlanModel> plans;
  std::vector<Segment> segments;
  std::vector<std::pair<std::string, uint32_t>> named_data;  ///< key, segment index
};

/// The extended header at bytes 8..40 (`schema/extended_header.h`).
struct ExtendedHeader {
  bool present = false;
  uint32_t length = 0;
  uint64_t program_size = 0;
  uint64_t segment_base_offset = 0;
  uint64_t segment_data_size = 0;
};

/// Read the header from the first bytes of a file (at least 40 bytes or `present=false`).
ExtendedHeader read_extended_header(const uint8_t* data, size_t size);
/// Parse the program flatbuffer (throws Corrupt).
ProgramModel parse_program(const uint8_t* buf, size_t size);

}  // namespace fb
}  // namespace lazykv
