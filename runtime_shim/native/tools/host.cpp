#include "host.h"

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>

namespace lazykv {
namespace host {

std::string load_custom_ops() {
  const char* path = std::getenv("LAZYKV_CUSTOM_OPS");
#ifdef LAZYKV_CUSTOM_OPS_LIBRARY
  if (path == nullptr || *path == '\0') path = LAZYKV_CUSTOM_OPS_LIBRARY;
#endif
  if (path == nullptr || *path == '\0' || std::string(path) == "none") return "";
  // RTLD_GLOBAL: its kernels register into the one ExecuTorch runtime of the process.
  if (dlopen(path, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* err = dlerror();
    return std::string(path) + ": " + (err ? err : "dlopen failed");
  }
  return "";
}

std::vector<float> last_logits(const executorch::runtime::EValue& output) {
  const auto& t = output.toTensor();
  const int64_t vocab = t.size(t.dim() - 1);
  const float* p = t.const_data_ptr<float>() + (t.numel() - vocab);
  return std::vector<float>(p, p + vocab);
}

int64_t argmax(const std::vector<float>& values) {
  size_t best = 0;
  for (size_t i = 1; i < values.size() && !std::isnan(values[best]); ++i) {
    if (values[i] > values[best] || std::isnan(values[i])) best = i;
  }
  return static_cast<int64_t>(best);
}

}  // namespace host
}  // namespace lazykv
