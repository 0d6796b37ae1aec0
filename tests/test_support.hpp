// Shared helpers for the C++ tests: fresh random inputs every run (the seed is printed on
// failure), and backend construction that skips with a reason where a backend cannot run.
#pragma once
#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "backends/backend.hpp"
#include "core/rng.hpp"

namespace hybrit::test {

// A new seed per process, so every run draws new inputs; reported by SCOPED_TRACE in tests.
// HYBRIT_TEST_SEED=<the reported seed> draws a failed run's inputs again.
inline uint64_t run_seed() {
  static const uint64_t seed = [] {
    if (const char* pinned = std::getenv("HYBRIT_TEST_SEED"); pinned && *pinned) return uint64_t(std::strtoull(pinned, nullptr, 10));
    return uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  }();
  return seed;
}

inline Tensor random_f32(Shape shape, uint64_t stream, float scale = 1.0f) {
  Tensor t = Tensor::empty(std::move(shape), DType::f32);
  Rng rng(run_seed(), stream);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = scale * rng.normal();
  return t;
}

inline Tensor random_ternary(Shape shape, uint64_t stream) {
  Tensor t = Tensor::empty(std::move(shape), DType::i8);
  Rng rng(run_seed(), stream);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int8_t>()[i] = int8_t(int(rng.below(3)) - 1);
  return t;
}

// A fresh folder under the system's temporary folder, removed with everything in it at scope end.
struct TempDir {
  std::filesystem::path path = [] {
    static std::atomic<int> count{0};
    return std::filesystem::temp_directory_path() / cat("hybrit-test-", getpid(), "-", run_seed() % 100000, "-", count.fetch_add(1));
  }();
  TempDir() { std::filesystem::create_directories(path); }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
  // Writes `content` to `name` (folders made as needed); returns its path.
  std::string write(const std::string& name, const std::string& content) const {
    const std::filesystem::path p = path / name;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << content;
    return p.string();
  }
};

// Backends under test, by name: c_scalar, c_avx2, c_avx512, tbb, tbb_1thread, cuda.
// Returns nullptr and sets *why when this machine cannot run it.
inline std::unique_ptr<Backend> make_named_backend(const std::string& name, std::string* why) {
  const SimdLevel best = cpu_hardware().best_simd();
  auto need = [&](SimdLevel level) {
    if (int(level) > int(best)) {
      *why = cat("this CPU lacks ", to_string(level), " (best: ", to_string(best), ")");
      return false;
    }
    return true;
  };
  if (name == "c_scalar") return make_c_backend(SimdLevel::scalar);
  if (name == "c_avx2") return need(SimdLevel::avx2) ? make_c_backend(SimdLevel::avx2) : nullptr;
  if (name == "c_avx512") return need(SimdLevel::avx512) ? make_c_backend(SimdLevel::avx512) : nullptr;
  if (name == "tbb") return make_tbb_backend(best);
  if (name == "tbb_scalar") return make_tbb_backend(SimdLevel::scalar);
  if (name == "tbb_1thread") return make_tbb_backend(best, 1);
  if (name == "cuda") {
    auto b = make_cuda_backend(why);
    if (!b) *why = "no CUDA backend here: " + *why;
    return b;
  }
  *why = "unknown backend " + name;
  return nullptr;
}

inline std::string bytes_of(const Tensor& t) { return std::string(static_cast<const char*>(t.raw()), t.nbytes()); }

}  // namespace hybrit::test
