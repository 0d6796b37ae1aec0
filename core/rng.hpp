// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011). A value is a pure function of
// (seed, stream, counter), so any step's randomness can be re-derived after a resume by storing
// three integers instead of a generator's internal state.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>

namespace hybrit {

using Philox4x32Counter = std::array<uint32_t, 4>;
using Philox4x32Key = std::array<uint32_t, 2>;

inline Philox4x32Counter philox4x32_10(Philox4x32Counter ctr, Philox4x32Key key) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(M0) * ctr[0], p1 = uint64_t(M1) * ctr[2];
    ctr = {uint32_t(p1 >> 32) ^ ctr[1] ^ key[0], uint32_t(p1), uint32_t(p0 >> 32) ^ ctr[3] ^ key[1], uint32_t(p0)};
    key[0] += W0;
    key[1] += W1;
  }
  return ctr;
}

struct RngState {
  uint64_t seed = 0;
  uint64_t stream = 0;
  uint64_t counter = 0;  // number of 4x32-bit blocks consumed
};

class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t stream = 0, uint64_t counter = 0) : state_{seed, stream, counter} {}
  explicit Rng(const RngState& state) : state_(state) {}

  const RngState& state() const { return state_; }

  // One block of four 32-bit values; the key is the seed, the counter holds (counter, stream).
  Philox4x32Counter block(uint64_t counter) const {
    return philox4x32_10({uint32_t(counter), uint32_t(counter >> 32), uint32_t(state_.stream), uint32_t(state_.stream >> 32)},
                         {uint32_t(state_.seed), uint32_t(state_.seed >> 32)});
  }

  uint32_t next_u32() {
    if (buffered_ == 0) {
      buffer_ = block(state_.counter++);
      buffered_ = 4;
    }
    return buffer_[4 - buffered_--];
  }
  uint64_t next_u64() { return (uint64_t(next_u32()) << 32) | next_u32(); }
  // Uniform in [0, 1) with 24 random bits: every value is exactly representable as a float.
  float uniform() { return float(next_u32() >> 8) * 0x1p-24f; }
  // Uniform in [lo, hi).
  float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal by Box-Muller; uses 2 draws per value (the second is discarded for simplicity).
  float normal() {
    const double u1 = (double(next_u32()) + 1.0) * 0x1p-32, u2 = double(next_u32()) * 0x1p-32;
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
  // Uniform integer in [0, n) (n > 0), by Lemire's multiply-shift; the tiny bias is irrelevant here.
  uint64_t below(uint64_t n) { return uint64_t((unsigned __int128)next_u64() * n >> 64); }

 private:
  RngState state_;
  Philox4x32Counter buffer_{};
  int buffered_ = 0;
};

}  // namespace hybrit
