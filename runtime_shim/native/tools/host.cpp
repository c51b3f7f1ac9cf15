#include "host.h"

#include <dlfcn.h>

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

}  // namespace host
}  // namespace lazykv
