// The attention ops on every backend against a plain double-precision softmax attention written
// here (the textbook formulas, a T x T matrix per head), on fresh random inputs: grouped-query
// heads, sequences shorter than, equal to and longer than a tile, T = 1. The tbb backend runs the
// C kernels on fixed units, so it must match the C backend of its ISA bit for bit on any thread
// count.
#include <cmath>
#include <cstring>
#include <vector>

#include "backends/c/hybrit_c.h"
#include "test_support.hpp"

namespace hybrit::test {
namespace {

struct Case {
  AttentionShape shape;
  std::string name() const {
    return cat("B", shape.batch, " T", shape.seq, " H", shape.heads, " KV", shape.kv_heads, " d", shape.head_dim);
  }
};

AttentionShape make_shape(int64_t b, int64_t t, int64_t h, int64_t kv, int64_t d) {
  return {b, t, h, kv, d, float(1.0 / std::sqrt(double(d)))};
}

// T below, at and past the tile (96), past two tiles, and T = 1.
std::vector<Case> cases() {
  const int64_t tile = HYBRIT_ATTENTION_TILE;
  return {{make_shape(1, 1, 1, 1, 8)},          {make_shape(2, 7, 4, 2, 16)},        {make_shape(1, tile, 2, 1, 32)},
          {make_shape(2, tile + 1, 3, 3, 24)},  {make_shape(1, 2 * tile + 17, 4, 1, 64)}, {make_shape(3, 50, 6, 2, 64)}};
}

struct Grads {
  std::vector<double> out, lse, dq, dk, dv;
};

Grads reference(const AttentionShape& s, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout) {
  const int64_t T = s.seq, H = s.heads, KV = s.kv_heads, d = s.head_dim, group = H / KV, ldq = H * d, ldk = KV * d;
  Grads g;
  g.out.assign(size_t(s.batch * T * ldq), 0.0);
  g.lse.assign(size_t(s.batch * H * T), 0.0);
  g.dq.assign(g.out.size(), 0.0);
  g.dk.assign(size_t(s.batch * T * ldk), 0.0);
  g.dv.assign(g.dk.size(), 0.0);
  const float *Q = q.data<float>(), *K = k.data<float>(), *V = v.data<float>(), *dO = dout.data<float>();
  std::vector<double> p(static_cast<size_t>(T)), dp(static_cast<size_t>(T));
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / group;
      for (int64_t t = 0; t < T; ++t) {
        const float* qt = Q + (b * T + t) * ldq + h * d;
        double mx = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += double(qt[c]) * K[(b * T + j) * ldk + kh * d + c];
          p[size_t(j)] = dot * s.scale;
          mx = std::max(mx, p[size_t(j)]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= t; ++j) sum += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
        g.lse[size_t((b * H + h) * T + t)] = mx + std::log(sum);
        double* o = &g.out[size_t((b * T + t) * ldq + h * d)];
        for (int64_t j = 0; j <= t; ++j) {
          p[size_t(j)] /= sum;
          for (int64_t c = 0; c < d; ++c) o[c] += p[size_t(j)] * V[(b * T + j) * ldk + kh * d + c];
        }
        const float* dot = dO + (b * T + t) * ldq + h * d;
        double row = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double acc = 0;
          for (int64_t c = 0; c < d; ++c) acc += double(dot[c]) * V[(b * T + j) * ldk + kh * d + c];
          dp[size_t(j)] = acc;
          row += p[size_t(j)] * acc;
        }
        for (int64_t j = 0; j <= t; ++j) {
          const double ds = p[size_t(j)] * (dp[size_t(j)] - row) * s.scale;
          for (int64_t c = 0; c < d; ++c) {
            g.dq[size_t((b * T + t) * ldq + h * d + c)] += ds * K[(b * T + j) * ldk + kh * d + c];
            g.dk[size_t((b * T + j) * ldk + kh * d + c)] += ds * qt[c];
            g.dv[size_t((b * T + j) * ldk + kh * d + c)] += p[size_t(j)] * dot[c];
          }
        }
      }
    }
  return g;
}

// Worst |got - want| relative to the largest |want|, floored at 0.1: with T = 1 the true dq and dk
// are exactly 0 (one key, probability 1) and only rounding is left.
// Errors relative to the largest reference value, never to less than `floor`: f32 rounding in a sum
// follows the size of its terms, not of the result, so a result near zero needs the floor.
void expect_close(const Tensor& got, const std::vector<double>& want, double rtol, const char* what, double floor = 0.1) {
  double scale = floor;
  for (double w : want) scale = std::max(scale, std::abs(w));
  double worst = 0;
  int64_t where = 0;
  const float* g = got.data<float>();
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(double(g[i]) - want[i]) / (1e-30 + scale);
    if (err > worst) worst = err, where = int64_t(i);
  }
  EXPECT_LE(worst, rtol) << what << ": element " << where << " is " << g[where] << ", reference " << want[size_t(where)] << " (scale " << scale << ")";
}

struct Result {
  Tensor out, lse, dq, dk, dv;
};

Result run(Backend& be, const AttentionShape& s, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout) {
  const int64_t rows = s.batch * s.seq;
  Result r{Tensor::empty({rows, s.heads * s.head_dim}, DType::f32), Tensor::empty({s.batch, s.heads, s.seq}, DType::f32),
           Tensor::empty({rows, s.heads * s.head_dim}, DType::f32), Tensor::empty({rows, s.kv_heads * s.head_dim}, DType::f32),
           Tensor::empty({rows, s.kv_heads * s.head_dim}, DType::f32)};
  // Outputs start as NaN: every element must be written, none accumulated into.
  for (Tensor* t : {&r.out, &r.lse, &r.dq, &r.dk, &r.dv})
    for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  be.attention_forward(q, k, v, s, r.out, r.lse);
  be.attention_backward(q, k, v, r.out, dout, r.lse, s, r.dq, r.dk, r.dv);
  return r;
}

struct Inputs {
  Tensor q, k, v, dout;
};
Inputs inputs(const AttentionShape& s, uint64_t stream) {
  const int64_t rows = s.batch * s.seq;
  // Scores of a few units: a peaked but not one-hot softmax, as in a trained model.
  return {random_f32({rows, s.heads * s.head_dim}, stream, 1.5f), random_f32({rows, s.kv_heads * s.head_dim}, stream + 1, 1.5f),
          random_f32({rows, s.kv_heads * s.head_dim}, stream + 2), random_f32({rows, s.heads * s.head_dim}, stream + 3)};
}

class AttentionTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    backend_ = make_named_backend(GetParam(), &why);
    if (!backend_) GTEST_SKIP() << GetParam() << " skipped: " << why;
    if (!backend_->supports(Op::attention_forward)) GTEST_SKIP() << GetParam() << " has no attention kernel (the dispatcher never routes attention there)";
  }
  std::unique_ptr<Backend> backend_;
};

TEST_P(AttentionTest, ForwardAndBackwardMatchTheTextbookFormulas) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  uint64_t stream = 1;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name());
    const AttentionShape& s = c.shape;
    const Inputs in = inputs(s, stream += 10);
    const Result r = run(*backend_, s, in.q, in.k, in.v, in.dout);
    const Grads want = reference(s, in.q, in.k, in.v, in.dout);
    expect_close(r.out, want.out, 2e-5, "out");
    // A row with few keys has lse = its score(s): a dot of head_dim terms of size ~1 that can cancel
    // to ~0.07 (seed 245500000: 3e-7 off, well within f32 rounding of the terms), so lse's floor is
    // the terms' size, 1, not 0.1.
    expect_close(r.lse, want.lse, 2e-6, "lse", 1.0);
    expect_close(r.dq, want.dq, 5e-5, "dq");
    expect_close(r.dk, want.dk, 5e-5, "dk");
    expect_close(r.dv, want.dv, 5e-5, "dv");
  }
}

TEST_P(AttentionTest, RefusesMismatchedShapes) {
  const AttentionShape s = make_shape(2, 5, 4, 2, 8);
  const Inputs in = inputs(s, 900);
  Tensor out = Tensor::empty({10, 32}, DType::f32), lse = Tensor::empty({2, 4, 5}, DType::f32);
  Tensor bad_k = Tensor::empty({10, 32}, DType::f32);  // 4 kv heads' worth, shape says 2
  try {
    backend_->attention_forward(in.q, bad_k, in.v, s, out, lse);
    ADD_FAILURE() << "accepted k of the wrong width";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("k must be f32 (10, 16)"), std::string::npos) << e.what();
  }
  AttentionShape odd = s;
  odd.kv_heads = 3;
  EXPECT_THROW(backend_->attention_forward(in.q, in.k, in.v, odd, out, lse), Error);
  Tensor short_lse = Tensor::empty({2, 4}, DType::f32);
  EXPECT_THROW(backend_->attention_forward(in.q, in.k, in.v, s, out, short_lse), Error);
}

// The tbb backend against the C backend of the same ISA (the same units, the same tiles), and
// on 1 thread against 3: the results must not depend on the split.
TEST(AttentionCpu, TbbMatchesCOfItsIsaBitForBitOnAnyThreadCount) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  const SimdLevel best = cpu_hardware().best_simd();
  struct Pair {
    std::unique_ptr<Backend> a, b;
    const char* what;
  };
  Pair pairs[] = {{make_tbb_backend(SimdLevel::scalar), make_c_backend(SimdLevel::scalar), "tbb scalar vs c scalar"},
                  {make_tbb_backend(best), make_c_backend(best), "tbb vs c at the best ISA"},
                  {make_tbb_backend(best, 1), make_tbb_backend(best, 3), "tbb on 1 vs 3 threads"}};
  uint64_t stream = 500;
  for (auto& p : pairs)
    for (const Case& cs : cases()) {
      SCOPED_TRACE(cat(p.what, ", ", cs.name()));
      const Inputs in = inputs(cs.shape, stream += 10);
      const Result x = run(*p.a, cs.shape, in.q, in.k, in.v, in.dout), y = run(*p.b, cs.shape, in.q, in.k, in.v, in.dout);
      EXPECT_EQ(bytes_of(x.out), bytes_of(y.out));
      EXPECT_EQ(bytes_of(x.lse), bytes_of(y.lse));
      EXPECT_EQ(bytes_of(x.dq), bytes_of(y.dq));
      EXPECT_EQ(bytes_of(x.dk), bytes_of(y.dk));
      EXPECT_EQ(bytes_of(x.dv), bytes_of(y.dv));
    }
}

INSTANTIATE_TEST_SUITE_P(AllBackends, AttentionTest,
                         ::testing::Values("c_scalar", "c_avx2", "c_avx512", "tbb", "tbb_scalar", "tbb_1thread", "cuda"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace hybrit::test
