// What a host (Linux, this repository) executable does before loading a program: make
// the llama custom-op kernels available. On a device they are compiled into the app's
// ExecuTorch build and none of this is needed.
#pragma once

#include <string>

namespace lazykv {
namespace host {

/// dlopen (RTLD_GLOBAL) the custom-op library named by $LAZYKV_CUSTOM_OPS, else the one
/// found at build time. Returns "" on success (or when there is none to load), else
/// the dlopen error.
std::string load_custom_ops();

}  // namespace host
}  // namespace lazykv
