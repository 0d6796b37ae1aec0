// FNV-1a, 64 bits: short, stable across runs and compilers. Used for the hardware fingerprint,
// cache keys, tokenizer identities and the checksum of every checkpoint dataset.
#pragma once
#include <cstddef>
#include <cstdint>

namespace hybrit {

inline constexpr uint64_t kFnv1aOffset = 1469598103934665603ull;

// Continues from `h`, so a hash can run over several pieces.
inline uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnv1aOffset) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

}  // namespace hybrit
