// Every backend against the C scalar reference, on fresh random inputs, at sizes 0, 1, 7, 1023,
// 4097 and large. Quantizers and packing must agree bit for bit; matmul and k-means within the
// stated floating-point tolerances (and the CPU backends exactly where they share kernels).
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "backends/c/hybrit_c.h"
#include "test_support.hpp"

namespace hybrit::test {
namespace {

const int64_t kSizes[] = {0, 1, 7, 1023, 4097, 1 << 22};

class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    backend_ = make_named_backend(GetParam(), &why);
    if (!backend_) GTEST_SKIP() << GetParam() << " skipped: " << why;
    ref_ = make_c_backend(SimdLevel::scalar);
  }
  bool is_cuda() const { return GetParam() == "cuda"; }
  // CPU backends built on the same kernels as the C backend agree with it exactly.
  bool exact_kmeans() const { return !is_cuda(); }  // kmeans_assign: tbb runs the C kernels

  std::unique_ptr<Backend> backend_, ref_;
};

// The bit-for-bit comparisons with the C scalar reference: every backend but c_scalar itself (the
// QuantizeReference and KernelTables tests check the reference against the formulas).
class AgainstScalarTest : public BackendTest {};

TEST_P(AgainstScalarTest, QuantizeTernaryMatchesReferenceBitForBit) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  for (int64_t n : kSizes) {
    SCOPED_TRACE(cat("n = ", n));
    // Weights of a trained layer are small; draw the scale too, so thresholds move every run.
    Rng rng(run_seed(), 100 + n);
    Tensor w = random_f32({n}, 1000 + n, 0.001f + 0.1f * rng.uniform());
    Tensor q = Tensor::empty({n}, DType::i8), q_ref = Tensor::empty({n}, DType::i8);
    const float s = backend_->quantize_ternary(w, q), s_ref = ref_->quantize_ternary(w, q_ref);
    EXPECT_EQ(std::memcmp(&s, &s_ref, sizeof s), 0) << s << " vs " << s_ref;
    EXPECT_EQ(bytes_of(q), bytes_of(q_ref));
  }
}

// The reference itself against the formula, computed independently in double: the scale to float
// rounding, and every q that is not within a hair of a rounding boundary.
TEST(QuantizeReference, TernaryMatchesFormula) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  auto ref = make_c_backend(SimdLevel::scalar);
  for (int64_t n : {1, 7, 1023, 4097, 100000}) {
    Tensor w = random_f32({n}, 7 + n, 0.05f);
    Tensor q = Tensor::empty({n}, DType::i8);
    const float s = ref->quantize_ternary(w, q);
    double mean = 0;
    for (int64_t i = 0; i < n; ++i) mean += std::fabs(double(w.data<float>()[i]));
    mean = std::max(mean / n, 1e-5);
    EXPECT_NEAR(s, mean, 1e-6 * mean);
    for (int64_t i = 0; i < n; ++i) {
      const double r = w.data<float>()[i] / mean;
      if (std::fabs(std::fabs(r) - 0.5) < 1e-4) continue;
      const int expect = r > 0.5 ? 1 : (r < -0.5 ? -1 : 0);
      ASSERT_EQ(q.data<int8_t>()[i], expect) << "w = " << w.data<float>()[i] << ", s = " << s;
    }
  }
  // All zeros: the scale floor applies and every weight quantizes to 0.
  Tensor zeros = Tensor::zeros({5}, DType::f32), q = Tensor::empty({5}, DType::i8);
  EXPECT_EQ(ref->quantize_ternary(zeros, q), 1e-5f);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(q.data<int8_t>()[i], 0);
}

// Rounding is half to even: exactly at w = 0.5 s the weight is 0, at 1.5 s it is clamped to 1,
// and the SIMD variants' comparison against the threshold must reproduce division at every float
// around the edge.
TEST(QuantizeReference, TernaryThresholdEdgesAgreeAcrossIsaVariants) {
  Rng rng(run_seed(), 5);
  int compared = 0;
  for (int trial = 0; trial < 50; ++trial) {
    const float s = 1e-4f + rng.uniform() * 2.0f;
    const float t = hybrit_c_ternary_threshold(s);
    ASSERT_GE(std::rint(t / s), 1.0f);
    ASSERT_LT(std::rint(std::nextafter(t, 0.0f) / s), 1.0f);
    std::vector<float> w;
    for (float center : {t, -t, 0.5f * s, -0.5f * s, 1.5f * s, -1.5f * s, 2.5f * s}) {
      float v = center;
      for (int k = 0; k < 40; ++k) v = std::nextafter(v, -INFINITY);
      for (int k = 0; k < 80; ++k, v = std::nextafter(v, INFINITY)) w.push_back(v);
    }
    std::vector<int8_t> ref(w.size()), got(w.size());
    hybrit_c_kernels_for(HYBRIT_ISA_SCALAR)->ternary_pass(w.data(), int64_t(w.size()), s, t, ref.data());
    for (hybrit_isa isa : {HYBRIT_ISA_AVX2, HYBRIT_ISA_AVX512}) {
      if (int(isa) > int(cpu_hardware().best_simd())) continue;
      hybrit_c_kernels_for(isa)->ternary_pass(w.data(), int64_t(w.size()), s, t, got.data());
      ASSERT_EQ(ref, got) << "isa " << int(isa) << " s = " << s;
      ++compared;
    }
  }
  // Half to even at the boundary itself.
  int8_t q = 9;
  const float half = 0.5f;
  hybrit_c_kernels_for(HYBRIT_ISA_SCALAR)->ternary_pass(&half, 1, 1.0f, hybrit_c_ternary_threshold(1.0f), &q);
  EXPECT_EQ(q, 0);
  if (compared == 0) GTEST_SKIP() << "this CPU has no AVX2: only the scalar kernel ran, nothing to compare it with";
}

// The SIMD argmin of kmeans_assign against the scalar one, with exact ties planted (the first index
// must win) and a running best carried across calls, as the assign driver uses it.
TEST(KernelTables, ArgminUpdateAgreesAcrossIsaVariants) {
  Rng rng(run_seed(), 21);
  int compared = 0;
  for (int64_t n : {1, 7, 16, 33, 1024, 1031}) {
    std::vector<float> dots(n), cn(n);
    for (int64_t j = 0; j < n; ++j) dots[j] = rng.normal(), cn[j] = 1.0f + rng.uniform();
    for (int t = 0; t < 3 && n > 4; ++t) {  // ties: copies of one centroid at later indices
      const int64_t from = int64_t(rng.below(uint64_t(n / 2))), to = n / 2 + int64_t(rng.below(uint64_t(n - n / 2)));
      dots[to] = dots[from], cn[to] = cn[from];
    }
    const float xn = 2.0f * rng.uniform();
    float best_ref = 0.5f;  // a running best from an earlier tile, sometimes unbeaten
    int32_t arg_ref = 7;
    hybrit_c_kernels_for(HYBRIT_ISA_SCALAR)->argmin_update(dots.data(), cn.data(), xn, n, 100, &best_ref, &arg_ref);
    for (hybrit_isa isa : {HYBRIT_ISA_AVX2, HYBRIT_ISA_AVX512}) {
      if (int(isa) > int(cpu_hardware().best_simd())) continue;
      float best = 0.5f;
      int32_t arg = 7;
      hybrit_c_kernels_for(isa)->argmin_update(dots.data(), cn.data(), xn, n, 100, &best, &arg);
      EXPECT_EQ(arg, arg_ref) << "isa " << int(isa) << ", n = " << n;
      EXPECT_EQ(best, best_ref);
      ++compared;
    }
  }
  if (compared == 0) GTEST_SKIP() << "this CPU has no AVX2: only the scalar kernel ran, nothing to compare it with";
}

// The ternary dot of every ISA variant against the scalar one, exactly (integer arithmetic), with
// the AVX-512BW kernel run even on a CPU whose table picks VNNI.
TEST(KernelTables, TernaryDotAgreesAcrossIsaVariantsWithAndWithoutVnni) {
  const int64_t m = 7, n = 5, k = 3001;
  Rng rng(run_seed(), 23);
  std::vector<int8_t> xq(size_t(m * k)), q(size_t(n * k));
  for (auto& v : xq) v = int8_t(int(rng.below(256)) - 128);
  for (auto& v : q) v = int8_t(int(rng.below(3)) - 1);
  std::vector<uint8_t> packed(size_t(n * hybrit_packed_cols(k)));
  int64_t bad = -1;
  ASSERT_EQ(hybrit_c_pack_ternary(q.data(), n, k, packed.data(), &bad), HYBRIT_C_OK);
  std::vector<int8_t> blocked(size_t(m * hybrit_ternary_padded(k)));
  std::vector<int64_t> sums(static_cast<size_t>(m));
  hybrit_c_ternary_prepare(xq.data(), m, k, blocked.data(), sums.data());
  std::vector<float> scales(size_t(m), 3.0f);
  auto run = [&](const hybrit_c_kernels* kr) {
    std::vector<float> y(size_t(m * n));
    hybrit_c_ternary_rows(kr, blocked.data(), sums.data(), scales.data(), m, k, packed.data(), 0.5f, 0, n, y.data(), n);
    return y;
  };
  const std::vector<float> ref = run(hybrit_c_kernels_for(HYBRIT_ISA_SCALAR));
  std::vector<std::pair<const char*, const hybrit_c_kernels*>> variants;
  if (int(cpu_hardware().best_simd()) >= int(SimdLevel::avx2)) variants.push_back({"avx2", hybrit_c_kernels_for(HYBRIT_ISA_AVX2)});
  if (int(cpu_hardware().best_simd()) >= int(SimdLevel::avx512)) {
    variants.push_back({"avx512bw", hybrit_c_kernels_avx512_variant(0)});
    if (const hybrit_c_kernels* vnni = hybrit_c_kernels_avx512_variant(1)) variants.push_back({"avx512vnni", vnni});
  }
  for (const auto& [name, kr] : variants) EXPECT_EQ(run(kr), ref) << name;
  if (variants.empty()) GTEST_SKIP() << "this CPU has no AVX2: only the scalar kernel ran, nothing to compare it with";
}

// matmul_ternary on AMX tiles against the same product through the VNNI kernels (AMX turned off)
// and the scalar table, bit for bit: activation rows in whole and partial tiles of 16, weight rows
// in whole and partial panels of 32, widths ending in a partial block, both AMX paths.
TEST(KernelTables, AmxTilesGiveTheBitsOfTheOtherKernels) {
  if (!hybrit_c_amx_usable()) GTEST_SKIP() << "no AMX-INT8 here (or Linux did not grant the tile state): the AMX path cannot run";
  const hybrit_c_kernels* vnni = hybrit_c_kernels_avx512_variant(1);
  ASSERT_NE(vnni, nullptr) << "a CPU with AMX has AVX-512 VNNI";
  // Up to 32 rows: the streaming path (a weight block decoded right before it is used); more: panels.
  const int64_t shapes[][3] = {{HYBRIT_AMX_MIN_ROWS, 1, 1}, {HYBRIT_AMX_MIN_ROWS, 40, 300}, {20, 33, 4099}, {32, 17, 256},
                               {40, 70, 1000},           {33, 35, 257},                {64, 33, 4099}, {100, 96, 256}};
  for (const auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    SCOPED_TRACE(cat("m, n, k = ", m, ", ", n, ", ", k));
    Rng rng(run_seed(), 31 + m * 7 + k);
    std::vector<int8_t> xq(size_t(m * k)), q(size_t(n * k));
    for (auto& v : xq) v = int8_t(int(rng.below(256)) - 128);
    for (auto& v : q) v = int8_t(int(rng.below(3)) - 1);
    std::vector<float> scales(static_cast<size_t>(m));
    for (auto& v : scales) v = 0.5f + 200.0f * rng.uniform();
    std::vector<uint8_t> packed(size_t(n * hybrit_packed_cols(k)));
    int64_t bad = -1;
    ASSERT_EQ(hybrit_c_pack_ternary(q.data(), n, k, packed.data(), &bad), HYBRIT_C_OK);
    auto run = [&](const hybrit_c_kernels* kr, bool amx) {
      hybrit_c_set_amx(amx);
      std::vector<float> y(size_t(m * n));
      EXPECT_EQ(hybrit_c_matmul_ternary(kr, xq.data(), scales.data(), m, k, packed.data(), n, 0.7f, y.data()), HYBRIT_C_OK);
      hybrit_c_set_amx(1);
      return y;
    };
    const std::vector<float> tiles = run(vnni, true);
    EXPECT_EQ(tiles, run(vnni, false));
    EXPECT_EQ(tiles, run(hybrit_c_kernels_for(HYBRIT_ISA_SCALAR), true));
  }
}

TEST_P(AgainstScalarTest, QuantizeInt8RowsMatchesReferenceBitForBit) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  const std::pair<int64_t, int64_t> shapes[] = {{0, 5}, {3, 0}, {1, 1}, {7, 7}, {1, 1023}, {4097, 7}, {5, 4097}, {1024, 4096}};
  for (auto [rows, cols] : shapes) {
    SCOPED_TRACE(cat("shape ", rows, "x", cols));
    Tensor x = random_f32({rows, cols}, 2000 + rows * 7 + cols, 3.0f);
    Tensor q = Tensor::empty({rows, cols}, DType::i8), q_ref = Tensor::empty({rows, cols}, DType::i8);
    Tensor s = Tensor::empty({rows}, DType::f32), s_ref = Tensor::empty({rows}, DType::f32);
    backend_->quantize_int8_rows(x, q, s);
    ref_->quantize_int8_rows(x, q_ref, s_ref);
    EXPECT_EQ(bytes_of(q), bytes_of(q_ref));
    EXPECT_EQ(bytes_of(s), bytes_of(s_ref));
    // And the formula itself, row by row.
    for (int64_t r = 0; r < std::min<int64_t>(rows, 8); ++r) {
      float amax = 0;
      for (int64_t j = 0; j < cols; ++j) amax = std::max(amax, std::fabs(x.data<float>()[r * cols + j]));
      const float scale = 127.0f / std::max(amax, 1e-5f);
      ASSERT_EQ(s.data<float>()[r], scale);
      for (int64_t j = 0; j < cols; ++j) {
        const float v = std::clamp(std::nearbyint(x.data<float>()[r * cols + j] * scale), -128.0f, 127.0f);
        ASSERT_EQ(q.data<int8_t>()[r * cols + j], int8_t(v));
      }
    }
  }
}

TEST_P(BackendTest, PackUnpackRoundTripsAndMatchesReference) {  // the round trip and the layout hold for c_scalar too
  SCOPED_TRACE(cat("seed ", run_seed()));
  const std::pair<int64_t, int64_t> shapes[] = {{0, 4}, {1, 0}, {1, 1}, {1, 7}, {3, 1023}, {4097, 5}, {1, 4097}, {2, 1 << 21}};
  for (auto [rows, cols] : shapes) {
    SCOPED_TRACE(cat("shape ", rows, "x", cols));
    Tensor q = random_ternary({rows, cols}, 3000 + rows + cols);
    const int64_t pc = hybrit_packed_cols(cols);
    Tensor p = Tensor::zeros({rows, pc}, DType::ternary2), p_ref = Tensor::zeros({rows, pc}, DType::ternary2);
    backend_->pack_ternary(q, p);
    ref_->pack_ternary(q, p_ref);
    EXPECT_EQ(bytes_of(p), bytes_of(p_ref));
    Tensor back = Tensor::empty({rows, cols}, DType::i8);
    backend_->unpack_ternary(p, back);
    EXPECT_EQ(bytes_of(back), bytes_of(q));
  }
  // The code layout is part of the file format: -1, 0, +1, 0 -> codes 0, 1, 2, 1 in bits 0-7.
  Tensor q = Tensor::empty({1, 5}, DType::i8);
  const int8_t vals[5] = {-1, 0, 1, 0, 1};
  std::memcpy(q.raw(), vals, 5);
  Tensor p = Tensor::zeros({1, 2}, DType::ternary2);
  backend_->pack_ternary(q, p);
  EXPECT_EQ(p.data<uint8_t>()[0], 0b01100100);
  EXPECT_EQ(p.data<uint8_t>()[1], 0b01010110);  // +1, then padding codes of 0
}

TEST_P(BackendTest, PackRejectsNonTernaryAndUnpackRejectsInvalidCode) {
  for (int64_t cols : {5, 4096 * 40 + 3}) {
    Tensor q = random_ternary({3, cols}, 4000 + cols);
    q.data<int8_t>()[2 * cols + cols - 2] = 2;
    Tensor p = Tensor::zeros({3, hybrit_packed_cols(cols)}, DType::ternary2);
    try {
      backend_->pack_ternary(q, p);
      FAIL() << "packing a 2 must fail";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find(cat("element ", 3 * cols - 2, " ")), std::string::npos) << e.what();
    }
    Tensor good = random_ternary({3, cols}, 5000 + cols);
    backend_->pack_ternary(good, p);
    p.data<uint8_t>()[hybrit_packed_cols(cols)] |= 0b11000000;  // weight 3 of row 1
    Tensor back = Tensor::empty({3, cols}, DType::i8);
    try {
      backend_->unpack_ternary(p, back);
      FAIL() << "code 0b11 must be refused";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::corrupt_data);
      EXPECT_NE(std::string(e.what()).find(cat("weight ", cols + 3, " ")), std::string::npos) << e.what();
    }
  }
}

// c = alpha * op(a) op(b) + beta * c against a double-precision loop; the bound is the standard
// K * eps * sum|a||b| of a float dot product (with a margin of 2).
void check_matmul(Backend& be, int64_t m, int64_t n, int64_t k, bool ta, bool tb, float alpha, float beta) {
  SCOPED_TRACE(cat("m n k = ", m, " ", n, " ", k, ", ta ", ta, ", tb ", tb, ", alpha ", alpha, ", beta ", beta));
  const uint64_t stream = uint64_t(m * 1000003 + n * 1009 + k * 7 + ta * 2 + tb);
  Tensor a = random_f32(ta ? Shape{k, m} : Shape{m, k}, stream);
  Tensor b = random_f32(tb ? Shape{n, k} : Shape{k, n}, stream + 1);
  Tensor c = random_f32({m, n}, stream + 2);
  if (beta == 0.0f)  // BLAS semantics: with beta = 0, c is not read, so NaN there must not leak
    for (int64_t i = 0; i < c.numel(); ++i) c.data<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  Tensor c0 = c.clone();
  be.matmul(a, b, c, {ta, tb, alpha, beta});
  const float* A = a.data<float>();
  const float* B = b.data<float>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0, mag = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double x = ta ? A[p * m + i] : A[i * k + p], y = tb ? B[j * k + p] : B[p * n + j];
        acc += x * y;
        mag += std::fabs(x * y);
      }
      const double expect = alpha * acc + (beta == 0.0f ? 0.0 : beta * double(c0.data<float>()[i * n + j]));
      const double old = beta == 0.0f ? 0.0 : std::fabs(beta * c0.data<float>()[i * n + j]);
      const double tol = 2.0 * (k + 2) * 1.2e-7 * (std::fabs(alpha) * mag + old) + 1e-30;
      ASSERT_NEAR(c.data<float>()[i * n + j], expect, tol) << "at (" << i << ", " << j << ")";
    }
}

TEST_P(BackendTest, MatmulMatchesDoublePrecisionReference) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  const int64_t shapes[][3] = {{0, 3, 4}, {3, 0, 4}, {3, 4, 0}, {1, 1, 1}, {7, 7, 7}, {1023, 3, 5}, {2, 4097, 3},
                               {5, 3, 4097}, {65, 129, 300}, {257, 255, 256}};
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t) check_matmul(*backend_, s[0], s[1], s[2], t & 1, t & 2, 1.0f, 0.0f);
  check_matmul(*backend_, 33, 47, 61, false, false, 0.75f, 0.5f);
  check_matmul(*backend_, 33, 47, 61, true, true, -2.0f, 1.0f);
  check_matmul(*backend_, 700, 300, 200, false, true, 1.0f, 0.25f);  // several blocks in every backend
}

// matmul_ternary against an independent reference: the exact integer dot, then the one f64
// rounding the kernels promise, dot * (w_scale / x_scale). Widths that end in a partial block
// (the SIMD kernels' zero-padded last block) and batches that are not a multiple of 4.
TEST_P(BackendTest, MatmulTernaryMatchesTheIntegerReferenceExactly) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  // {40, 70, 1000} and {33, 35, 257}: enough activation rows for the AMX tiles where the CPU has them.
  const int64_t shapes[][3] = {{1, 1, 1}, {1, 7, 3}, {3, 5, 255}, {4, 9, 256}, {5, 17, 257}, {8, 33, 704}, {13, 64, 1000}, {2, 3, 4099},
                               {40, 70, 1000}, {33, 35, 257}, {70000, 3, 9}};  // more rows than a CUDA grid dimension holds (65,535)
  for (const auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    SCOPED_TRACE(cat("m, n, k = ", m, ", ", n, ", ", k));
    Rng rng(run_seed(), 7000 + m * 100000 + k);
    Tensor xq = Tensor::empty({m, k}, DType::i8), scales = Tensor::empty({m}, DType::f32);
    for (int64_t i = 0; i < m * k; ++i) xq.data<int8_t>()[i] = int8_t(int(rng.below(256)) - 128);
    for (int64_t i = 0; i < m; ++i) scales.data<float>()[i] = 0.5f + 200.0f * rng.uniform();
    const float w_scale = 0.01f + 2.0f * rng.uniform();
    const Tensor q = random_ternary({n, k}, 8000 + k);
    Tensor packed = Tensor::empty({n, hybrit_packed_cols(k)}, DType::ternary2);
    ref_->pack_ternary(q, packed);
    Tensor y = Tensor::empty({m, n}, DType::f32);
    backend_->matmul_ternary(xq, scales, packed, w_scale, y);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        int64_t dot = 0;
        for (int64_t c = 0; c < k; ++c) dot += int64_t(xq.data<int8_t>()[i * k + c]) * q.data<int8_t>()[j * k + c];
        const float expect = float(double(dot) * (double(w_scale) / double(scales.data<float>()[i])));
        ASSERT_EQ(y.data<float>()[i * n + j], expect) << "at (" << i << ", " << j << ")";
      }
  }
}

TEST_P(BackendTest, MatmulPropagatesNaNFromInputs) {
  Tensor a = random_f32({4, 3}, 11), b = random_f32({3, 5}, 12), c = Tensor::zeros({4, 5}, DType::f32);
  a.data<float>()[1 * 3 + 2] = std::numeric_limits<float>::quiet_NaN();
  backend_->matmul(a, b, c, {});
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 5; ++j) EXPECT_EQ(std::isnan(c.data<float>()[i * 5 + j]), i == 1) << i << "," << j;
}

// The label each backend picks must be a nearest centroid by an exact (double) distance, up to
// float rounding of the GEMM form; its reported distance must match that distance.
TEST_P(BackendTest, KmeansAssignFindsNearestCentroid) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  const int64_t cases[][3] = {{0, 3, 4}, {1, 1, 1}, {7, 7, 3}, {1023, 17, 5}, {4097, 300, 64}, {1 << 17, 64, 16}};
  for (const auto& cs : cases) {
    const int64_t n = cs[0], k = cs[1], d = cs[2];
    SCOPED_TRACE(cat("n k d = ", n, " ", k, " ", d));
    Tensor x = random_f32({n, d}, 6000 + n), c = random_f32({k, d}, 7000 + k);
    Tensor labels = Tensor::empty({n}, DType::i32), dist = Tensor::empty({n}, DType::f32);
    backend_->kmeans_assign(x, c, labels, dist);
    Tensor ref_labels = Tensor::empty({n}, DType::i32), ref_dist = Tensor::empty({n}, DType::f32);
    ref_->kmeans_assign(x, c, ref_labels, ref_dist);
    const int64_t checked = std::min<int64_t>(n, 3000);
    for (int64_t i = 0; i < checked; ++i) {
      const float* xi = x.data<float>() + i * d;
      double best = INFINITY, norm = 0;
      std::vector<double> dd(k);
      for (int64_t j = 0; j < k; ++j) {
        double s = 0, cn = 0;
        for (int64_t t = 0; t < d; ++t) {
          const double diff = double(xi[t]) - c.data<float>()[j * d + t];
          s += diff * diff;
          cn += double(c.data<float>()[j * d + t]) * c.data<float>()[j * d + t];
        }
        dd[j] = s;
        best = std::min(best, s);
        norm = std::max(norm, cn);
      }
      for (int64_t t = 0; t < d; ++t) norm += double(xi[t]) * xi[t];
      const double tol = 8 * (d + 2) * 1.2e-7 * norm + 1e-6;
      const int32_t l = labels.data<int32_t>()[i];
      ASSERT_TRUE(l >= 0 && l < k) << "label " << l;
      ASSERT_LE(dd[l], best + tol) << "point " << i << " got centroid " << l;
      ASSERT_NEAR(dist.data<float>()[i], dd[l], tol) << "point " << i;
    }
    if (exact_kmeans() && GetParam().rfind("tbb", 0) == 0) {
      // Same kernels as the C backend at the same ISA level: identical bits.
      auto c_same = make_c_backend(GetParam() == "tbb_scalar" ? SimdLevel::scalar : cpu_hardware().best_simd());
      Tensor l2 = Tensor::empty({n}, DType::i32), d2 = Tensor::empty({n}, DType::f32);
      c_same->kmeans_assign(x, c, l2, d2);
      EXPECT_EQ(bytes_of(labels), bytes_of(l2));
      EXPECT_EQ(bytes_of(dist), bytes_of(d2));
    }
  }
}

TEST_P(BackendTest, KmeansAssignBreaksTiesTowardLowestIndex) {
  Tensor x = Tensor::zeros({2, 2}, DType::f32), c = Tensor::zeros({3, 2}, DType::f32);
  const float cv[6] = {1, 0, 0, 1, -1, 0};  // all three at distance 1 from the origin
  std::memcpy(c.raw(), cv, sizeof cv);
  Tensor labels = Tensor::empty({2}, DType::i32), dist = Tensor::empty({2}, DType::f32);
  backend_->kmeans_assign(x, c, labels, dist);
  EXPECT_EQ(labels.data<int32_t>()[0], 0);
  EXPECT_EQ(dist.data<float>()[0], 1.0f);
}

TEST_P(BackendTest, KmeansUpdateMatchesReference) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  const int64_t cases[][3] = {{0, 3, 4}, {1, 1, 1}, {7, 3, 7}, {1023, 17, 5}, {4097, 300, 64}, {1 << 18, 256, 32}};
  for (const auto& cs : cases) {
    const int64_t n = cs[0], k = cs[1], d = cs[2];
    SCOPED_TRACE(cat("n k d = ", n, " ", k, " ", d));
    Tensor x = random_f32({n, d}, 8000 + n);
    Tensor labels = Tensor::empty({n}, DType::i32);
    Rng rng(run_seed(), 9000 + n);
    for (int64_t i = 0; i < n; ++i) labels.data<int32_t>()[i] = int32_t(rng.below(uint64_t(k)));
    Tensor sums = Tensor::empty({k, d}, DType::f64), counts = Tensor::empty({k}, DType::i64);
    Tensor rs = Tensor::empty({k, d}, DType::f64), rc = Tensor::empty({k}, DType::i64);
    backend_->kmeans_update(x, labels, sums, counts);
    ref_->kmeans_update(x, labels, rs, rc);
    EXPECT_EQ(bytes_of(counts), bytes_of(rc));
    // The C backends and tbb's in-order paths sum each cluster in point order: the same bits.
    // tbb's partitioned path (n >= 8192 with small k x d) and CUDA's atomics add in another order.
    const bool same_order = GetParam().rfind("c_", 0) == 0 || (GetParam().rfind("tbb", 0) == 0 && n < 8192);
    if (same_order) {
      EXPECT_EQ(bytes_of(sums), bytes_of(rs));
    } else {
      for (int64_t i = 0; i < k * d; ++i) ASSERT_NEAR(sums.data<double>()[i], rs.data<double>()[i], 1e-9 * (1 + std::fabs(rs.data<double>()[i])));
    }
    int64_t total = 0;
    for (int64_t c = 0; c < k; ++c) total += counts.data<int64_t>()[c];
    EXPECT_EQ(total, n);
  }
}

// NaN and Inf: the quantizers and k-means refuse them with an error naming where; matmul
// propagates them as IEEE arithmetic does (tested above).
TEST_P(BackendTest, NonFiniteInputIsRefusedWithItsPosition) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
    const std::string name = std::isnan(bad) ? "NaN" : "Inf";
    for (int64_t n : {1, 4097, 1 << 20}) {
      Tensor w = random_f32({n}, 10), q = Tensor::empty({n}, DType::i8);
      w.data<float>()[n - 1] = bad;
      try {
        backend_->quantize_ternary(w, q);
        FAIL() << "quantize_ternary accepted " << name;
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
        EXPECT_NE(std::string(e.what()).find(cat("element ", n - 1, " is ", name)), std::string::npos) << e.what();
      }
    }
    Tensor x = random_f32({9, 33}, 11), q = Tensor::empty({9, 33}, DType::i8), s = Tensor::empty({9}, DType::f32);
    x.data<float>()[6 * 33 + 32] = bad;
    try {
      backend_->quantize_int8_rows(x, q, s);
      FAIL() << "quantize_int8_rows accepted " << name;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("row 6 contains NaN or Inf"), std::string::npos) << e.what();
    }
    Tensor pts = random_f32({2000, 4}, 12), cen = random_f32({5, 4}, 13);
    Tensor labels = Tensor::empty({2000}, DType::i32), dist = Tensor::empty({2000}, DType::f32);
    pts.data<float>()[1500 * 4 + 1] = bad;
    try {
      backend_->kmeans_assign(pts, cen, labels, dist);
      FAIL() << "kmeans_assign accepted " << name;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("point 1500 "), std::string::npos) << e.what();
    }
    Tensor pts_ok = random_f32({20, 4}, 14), cen_bad = random_f32({5, 4}, 15);
    cen_bad.data<float>()[3 * 4] = bad;
    Tensor l20 = Tensor::empty({20}, DType::i32), d20 = Tensor::empty({20}, DType::f32);
    try {
      backend_->kmeans_assign(pts_ok, cen_bad, l20, d20);
      FAIL() << "kmeans_assign accepted a centroid with " << name;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("centroid 3 "), std::string::npos) << e.what();
    }
    Tensor sums = Tensor::empty({5, 4}, DType::f64), counts = Tensor::empty({5}, DType::i64);
    for (int64_t i = 0; i < 2000; ++i) labels.data<int32_t>()[i] = int32_t(i % 5);
    try {
      backend_->kmeans_update(pts, labels, sums, counts);
      FAIL() << "kmeans_update accepted " << name;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("point 1500 "), std::string::npos) << e.what();
    }
  }
}

TEST_P(BackendTest, BadShapesAndLabelsGiveClearErrors) {
  auto expect_error = [](auto&& fn, const std::string& fragment) {
    try {
      fn();
      FAIL() << "expected an error containing '" << fragment << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  Tensor a = random_f32({3, 4}, 1), b = random_f32({5, 2}, 2), c = Tensor::empty({3, 2}, DType::f32);
  expect_error([&] { backend_->matmul(a, b, c, {}); }, "inner dimensions differ: op(a) is 3 x 4, op(b) is 5 x 2");
  Tensor wrong = Tensor::empty({3}, DType::i32);
  expect_error([&] { backend_->quantize_ternary(wrong, c); }, "weights must be f32, got i32 (3,)");
  Tensor x = random_f32({4, 3}, 3), labels = Tensor::empty({4}, DType::i32);
  Tensor sums = Tensor::empty({2, 3}, DType::f64), counts = Tensor::empty({2}, DType::i64);
  const int32_t lv[4] = {0, 1, 2, 0};
  std::memcpy(labels.raw(), lv, sizeof lv);
  expect_error([&] { backend_->kmeans_update(x, labels, sums, counts); }, "label of point 2 is outside [0, k)");
  Tensor no_centroids = Tensor::empty({0, 3}, DType::f32), dist = Tensor::empty({4}, DType::f32);
  expect_error([&] { backend_->kmeans_assign(x, no_centroids, labels, dist); }, "need at least one centroid");
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BackendTest,
                         ::testing::Values("c_scalar", "c_avx2", "c_avx512", "tbb", "tbb_scalar", "tbb_1thread", "cuda"),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(AllButTheReference, AgainstScalarTest, ::testing::Values("c_avx2", "c_avx512", "tbb", "tbb_scalar", "tbb_1thread", "cuda"),
                         [](const auto& info) { return info.param; });

// Device-resident tensors on the CUDA backend: the same results as from host tensors.
TEST(CudaDeviceTensors, OpsOnDeviceDataMatchHostData) {
  std::string why;
  auto cuda = make_cuda_backend(&why);
  if (!cuda) GTEST_SKIP() << "no CUDA backend here: " << why;
  Tensor w = random_f32({100003}, 1, 0.02f), q_host = Tensor::empty({100003}, DType::i8);
  const float s_host = cuda->quantize_ternary(w, q_host);
  Tensor w_dev = w.to(Device::cuda(0)), q_dev = Tensor::empty({100003}, DType::i8, Device::cuda(0));
  EXPECT_EQ(cuda->quantize_ternary(w_dev, q_dev), s_host);
  EXPECT_EQ(bytes_of(q_dev.to(Device::cpu())), bytes_of(q_host));
  Tensor a = random_f32({300, 200}, 2), b = random_f32({200, 100}, 3);
  Tensor c_host = Tensor::empty({300, 100}, DType::f32), c_dev = Tensor::empty({300, 100}, DType::f32, Device::cuda(0));
  cuda->matmul(a, b, c_host, {});
  cuda->matmul(a.to(Device::cuda(0)), b.to(Device::cuda(0)), c_dev, {});
  EXPECT_EQ(bytes_of(c_dev.to(Device::cpu())), bytes_of(c_host));
}

// The tbb backend's reductions do not depend on the thread count at all.
TEST(TbbDeterminism, ThreadCountDoesNotChangeReductions) {
  auto one = make_tbb_backend(cpu_hardware().best_simd(), 1), many = make_tbb_backend(cpu_hardware().best_simd(), 4);
  Tensor w = random_f32({3'000'001}, 77, 0.03f), q1 = Tensor::empty({3'000'001}, DType::i8), q2 = Tensor::empty({3'000'001}, DType::i8);
  const float s1 = one->quantize_ternary(w, q1), s2 = many->quantize_ternary(w, q2);
  EXPECT_EQ(std::memcmp(&s1, &s2, 4), 0);
  EXPECT_EQ(bytes_of(q1), bytes_of(q2));
  // kmeans_update on both of its paths: partitioned partials (small k x d) and column slices
  // (partials too large for the budget).
  for (int64_t k : {64, 40000}) {
    Tensor x = random_f32({50000, 32}, 80), labels = Tensor::empty({50000}, DType::i32);
    Rng rng(run_seed(), 81);
    for (int64_t i = 0; i < 50000; ++i) labels.data<int32_t>()[i] = int32_t(rng.below(uint64_t(k)));
    Tensor s1 = Tensor::empty({k, 32}, DType::f64), s2 = Tensor::empty({k, 32}, DType::f64);
    Tensor c1 = Tensor::empty({k}, DType::i64), c2 = Tensor::empty({k}, DType::i64);
    one->kmeans_update(x, labels, s1, c1);
    many->kmeans_update(x, labels, s2, c2);
    EXPECT_EQ(bytes_of(s1), bytes_of(s2)) << "k = " << k;
  }
  // matmul at a plain shape and at one long enough in k to take the split-k path (the weight
  // gradient's shape): one thread and four give the same bits.
  for (const auto& [m, n, kk] : {std::tuple<int64_t, int64_t, int64_t>{513, 129, 257}, {96, 96, 16384}}) {
    Tensor a = random_f32({m, kk}, 78), b = random_f32({kk, n}, 79);
    Tensor c1 = Tensor::empty({m, n}, DType::f32), c2 = Tensor::empty({m, n}, DType::f32);
    one->matmul(a, b, c1, {});
    many->matmul(a, b, c2, {});
    EXPECT_EQ(bytes_of(c1), bytes_of(c2)) << m << "x" << n << "x" << kk;
  }
}

}  // namespace
}  // namespace hybrit::test
