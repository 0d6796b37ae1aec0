// Stands in for cuda_backend.cu when CMake found no nvcc (or HYBRIT_CUDA=OFF).
#include "backends/backend.hpp"

namespace hybrit {

static const char* kNotBuilt = "the CUDA backend is not built (CMake found no nvcc, or HYBRIT_CUDA=OFF)";

bool cuda_backend_built() { return false; }
void probe_cuda(HardwareInfo& hw) { hw.cuda_status = kNotBuilt; }
std::unique_ptr<Backend> make_cuda_backend(std::string* why_not) {
  if (why_not) *why_not = kNotBuilt;
  return nullptr;
}

}  // namespace hybrit
