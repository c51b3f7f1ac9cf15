// What a host (Linux, this repository) executable does before loading a program: make
// the llama custom-op kernels available. On a device they are compiled into the app's
// ExecuTorch build and none of this is needed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <executorch/runtime/core/evalue.h>

namespace lazykv {
namespace host {

/// The last position's logits of a float output [..., vocab] (a copy).
std::vector<float> last_logits(const executorch::runtime::EValue& output);
/// Index of the largest value, first on ties, NaN counting as largest (as torch.argmax).
int64_t argmax(const std::vector<float>& values);

/// dlopen (RTLD_GLOBAL) the custom-op library named by $LAZYKV_CUSTOM_OPS, else the one
/// found at build time. Returns "" on success (or when there is none to load), else
/// the dlopen error.
std::string load_custom_ops();

}  // namespace host
}  // namespace lazykv
