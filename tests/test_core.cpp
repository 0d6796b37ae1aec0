#include <unistd.h>

#include <cmath>
#include <cstring>
#include <set>

#include "core/hardware.hpp"
#include "core/log.hpp"
#include "test_support.hpp"

namespace hybrit::test {
namespace {

// Known-answer vectors from Random123's tests/kat_vectors (the three philox4x32 10 lines).
TEST(Philox, MatchesRandom123KnownAnswers) {
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}), (Philox4x32Counter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32_10({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (Philox4x32Counter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (Philox4x32Counter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Rng, AnyStepCanBeRederivedFromItsState) {
  Rng a(run_seed(), 3);
  for (int i = 0; i < 37; ++i) a.next_u32();
  // After whole blocks, (seed, stream, counter) is all the state there is.
  for (int i = 0; i < 3; ++i) a.next_u32();
  Rng b(a.state());
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.next_u32(), b.next_u32());
  Rng other_stream(run_seed(), 4);
  Rng same_stream(run_seed(), 3);
  EXPECT_NE(other_stream.next_u64(), same_stream.next_u64());
}

TEST(Rng, DistributionsHaveTheRightMoments) {
  Rng rng(run_seed(), 9);
  const int n = 200000;
  double su = 0, sn = 0, sn2 = 0;
  float lo = 1, hi = 0;
  for (int i = 0; i < n; ++i) {
    const float u = rng.uniform();
    lo = std::min(lo, u), hi = std::max(hi, u);
    su += u;
    const double z = rng.normal();
    sn += z, sn2 += z * z;
  }
  EXPECT_GE(lo, 0.0f);
  EXPECT_LT(hi, 1.0f);
  EXPECT_NEAR(su / n, 0.5, 0.005);        // sd of the mean: 0.29 / sqrt(n) = 0.00065
  EXPECT_NEAR(sn / n, 0.0, 0.015);
  EXPECT_NEAR(sn2 / n, 1.0, 0.02);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(rng.below(7), 7u);
}

TEST(Tensor, ShapesViewsAndCopies) {
  Tensor t = Tensor::zeros({4, 3}, DType::f32);
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.nbytes(), 48u);
  for (int i = 0; i < 12; ++i) t.data<float>()[i] = float(i);
  Tensor rows = t.rows(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(rows.data<float>()[0], 3.0f);
  rows.data<float>()[0] = 42;  // a view: writes reach the parent
  EXPECT_EQ(t.data<float>()[3], 42.0f);
  Tensor copy = t.clone();
  copy.data<float>()[0] = -1;
  EXPECT_EQ(t.data<float>()[0], 0.0f);
  EXPECT_EQ(t.reshape({12}).shape(), (Shape{12}));
  EXPECT_EQ(shape_str({5}), "(5,)");
  EXPECT_EQ(Tensor::empty({0, 7}, DType::i8).numel(), 0);
}

TEST(Tensor, MisuseIsAnErrorNotACrash) {
  Tensor t = Tensor::zeros({4, 3}, DType::f32);
  EXPECT_THROW(t.reshape({5}), Error);
  EXPECT_THROW(t.rows(2, 5), Error);
  EXPECT_THROW(t.data<int8_t>(), Error);
  EXPECT_THROW(t.dim(2), Error);
  EXPECT_THROW(Tensor::empty({-1}, DType::f32), Error);
  if (!cuda_memory_registered()) {
    try {
      Tensor::empty({4}, DType::f32, Device::cuda(0));
      FAIL();
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::unsupported);
    }
  }
}

TEST(Tensor, WrapKeepsTheOwnerAlive) {
  auto owner = std::make_shared<std::vector<float>>(6, 2.5f);
  std::weak_ptr<std::vector<float>> watch = owner;
  Tensor t = Tensor::wrap(owner->data(), {2, 3}, DType::f32, owner);
  owner.reset();
  EXPECT_FALSE(watch.expired());
  EXPECT_EQ(t.data<float>()[5], 2.5f);
  t = Tensor();
  EXPECT_TRUE(watch.expired());
}

TEST(Hardware, ProbeIsSane) {
  const HardwareInfo& hw = cpu_hardware();
  EXPECT_FALSE(hw.cpu_model.empty());
  EXPECT_GE(hw.granted_cpus, 1);
  EXPECT_LE(hw.granted_cpus, std::max(hw.logical_cpus, 1));
  EXPECT_GT(hw.memory_total_bytes, 0u);
  EXPECT_EQ(hw.fingerprint().size(), 16u);
  EXPECT_EQ(hw.fingerprint(), cpu_hardware().fingerprint());
  // The chosen level never exceeds what the flags allow.
  if (hw.best_simd() == SimdLevel::avx512) {
    EXPECT_TRUE(hw.avx512f && hw.avx512bw && hw.avx512vl && hw.avx512dq);
  }
  if (hw.best_simd() >= SimdLevel::avx2) {
    EXPECT_TRUE(hw.avx2 && hw.fma);
  }
  EXPECT_EQ(sysconf(_SC_NPROCESSORS_ONLN) >= hw.granted_cpus, true);
  HardwareInfo other = hw;
  other.granted_cpus += 1;
  EXPECT_NE(other.fingerprint(), hw.fingerprint());
  EXPECT_THROW(parse_simd_level("sse9", "HYBRIT_SIMD"), Error);
  EXPECT_FALSE(hardware().cuda_status.empty());
}

std::vector<std::string> g_lines;
void capture(LogLevel, const std::string& line) { g_lines.push_back(line); }

TEST(Log, LevelsAndSink) {
  set_log_sink(capture);
  g_lines.clear();
  log_warn("disk ", 3, " is ", "full");
  log_debug("hidden");  // default level is info
  set_log_sink(nullptr);
  ASSERT_EQ(g_lines.size(), 1u);
  EXPECT_EQ(g_lines[0], "disk 3 is full");
}

TEST(ProgressBar, DrawsOnlyOnATerminal) {
  ProgressBar bar("work", 10);
  EXPECT_EQ(bar.drawing(), isatty(STDERR_FILENO) == 1);
  bar.update(5, "half");
  bar.finish();
}

TEST(Names, ErrorKindsHaveOneDistinctNameEach) {
  std::set<std::string> seen;
  for (int k = 0; k < int(ErrorKind::count); ++k) {
    const std::string name = to_string(ErrorKind(k));
    EXPECT_FALSE(name.empty());
    EXPECT_TRUE(seen.insert(name).second) << name;
  }
  EXPECT_EQ(std::string(to_string(ErrorKind::io)), "I/O error");
  EXPECT_EQ(std::string(to_string(ErrorKind::count)), "error");  // past the table: a generic word, never out of bounds
}

}  // namespace
}  // namespace hybrit::test
