// Reading the lazykv manifest and rebinding lazy KV buffers in the program flatbuffer.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <lazykv/lazykv.h>

#include "pte_format.h"

namespace lazykv {

/// The parsed manifest (`lazykv/manifest` named data).
struct Manifest {
  int version = 0;
  std::string producer;
  std::vector<LazyBuffer> buffers;
  std::vector<FillRule> fill_rules;
  std::string json;
  const FillRule* fill_rule(const std::string& method) const;
  const LazyBuffer* buffer(const std::string& fqn) const;
};

/// Named-data key of the manifest blob.
constexpr const char* kManifestKey = "lazykv/manifest";
/// Manifest schema versions this reader knows (refuses newer ones by name).
constexpr int kManifestVersion = 1;

/// Parse and check a manifest (Python's `Manifest.from_bytes` + `validate`).
Result<Manifest> parse_manifest(const std::string& bytes, const std::string& source);

/// manifest dtype name -> (executorch ScalarType code, element size); false if unknown.
bool dtype_info(const std::string& name, int* scalar_type, int64_t* element_size);
/// executorch ScalarType code -> manifest dtype name ("" if none).
const char* dtype_name(int scalar_type);

/// The program region with every lazy buffer rebound, and what was appended.
struct Rebound {
  std::vector<uint8_t> region;  ///< patched header + flatbuffer, padded to `segment_base`
  uint64_t segment_base = 0;    ///< new segment base offset (>= the old one)
  std::map<std::string, std::vector<std::string>> appended;  ///< method -> lazy FQNs
};

/// Rebind (fastpte.py's edit): each lazy tensor's shape_dynamism byte 2 -> 1, no
/// allocation_info (required), the plan's inputs vector replaced by a copy with the lazy
/// value indices appended (written after the flatbuffer's end). Checks every lazy tensor
/// against the manifest. `program` is the original region [0, program_size).
Result<Rebound> rebind(const uint8_t* program, size_t program_size, const fb::ExtendedHeader& header,
                       uint64_t file_size, const fb::ProgramModel& model, const Manifest& manifest,
                       const std::string& source);

/// Index checks ExecuTorch's Method::init does not make (an out-of-range operator index
/// becomes a call through a null kernel pointer): every instruction's operator and
/// argument value indices, and the plan's inputs and outputs, must be in range.
Status check_indices(const fb::PlanModel& plan, const std::string& source);

/// MethodInfo of a plan (user inputs before rebinding, token inputs, cache writes).
MethodInfo describe_method(const fb::PlanModel& plan);

}  // namespace lazykv
