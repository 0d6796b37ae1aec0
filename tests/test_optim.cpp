// Optimizers against independent double-precision references written plainly here, on fresh
// random inputs; schedules at their defining points; the parameter table's layout.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#include "test_support.hpp"
#include "model/model.hpp"
#include "training/optim.hpp"

namespace hybrit::test {
namespace {

using Mat = std::vector<std::vector<double>>;

Mat to_mat(const Tensor& t) {
  Mat m(size_t(t.dim(0)), std::vector<double>(size_t(t.dim(1))));
  for (int64_t i = 0; i < t.dim(0); ++i)
    for (int64_t j = 0; j < t.dim(1); ++j) m[i][j] = t.data<float>()[i * t.dim(1) + j];
  return m;
}
Mat mul(const Mat& a, const Mat& b) {
  Mat c(a.size(), std::vector<double>(b[0].size(), 0.0));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t k = 0; k < b.size(); ++k)
      for (size_t j = 0; j < b[0].size(); ++j) c[i][j] += a[i][k] * b[k][j];
  return c;
}
Mat transpose(const Mat& a) {
  Mat t(a[0].size(), std::vector<double>(a.size()));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[0].size(); ++j) t[j][i] = a[i][j];
  return t;
}
Mat axpby(double x, const Mat& a, double y, const Mat& b) {
  Mat c = a;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[0].size(); ++j) c[i][j] = x * a[i][j] + y * b[i][j];
  return c;
}
// The textbook iteration, in double, written without the library's helpers.
Mat reference_ns5(Mat g, int steps) {
  const bool tall = g.size() > g[0].size();
  if (tall) g = transpose(g);
  double norm = 0;
  for (const auto& row : g)
    for (double v : row) norm += v * v;
  norm = std::sqrt(norm) + 1e-7;
  for (auto& row : g)
    for (double& v : row) v /= norm;
  for (int s = 0; s < steps; ++s) {
    const Mat A = mul(g, transpose(g));
    const Mat B = axpby(-4.7750, A, 2.0315, mul(A, A));
    g = axpby(3.4445, g, 1.0, mul(B, g));
  }
  return tall ? transpose(g) : g;
}

Dispatcher& dispatcher() {
  static Dispatcher d([] {
    DispatcherOptions o;
    o.use_environment = false;
    return o;
  }());
  return d;
}

TEST(ParamTable, OneBufferWithNamedAlignedSlices) {
  ParamTable t;
  t.add("emb", {10, 8}, ParamGroup::embedding);
  t.add("w", {8, 3}, ParamGroup::block_matrix);
  t.add("g", {8}, ParamGroup::norm);
  EXPECT_THROW(t.add("w", {2, 2}, ParamGroup::block_matrix), Error);
  EXPECT_THROW(t.add("v", {2, 2, 2}, ParamGroup::block_matrix), Error);
  t.allocate();
  EXPECT_EQ(t.slice("emb").offset, 0);
  EXPECT_EQ(t.slice("w").offset, 80);
  EXPECT_EQ(t.slice("g").offset, 112);  // w: 24 floats, padded to 32 (64-byte boundaries)
  EXPECT_EQ(t.numel(), 128);
  Tensor w = t.param(t.slice("w"));
  EXPECT_EQ(w.shape(), (Shape{8, 3}));
  w.data<float>()[4] = 7.0f;
  EXPECT_EQ(t.params().data<float>()[84], 7.0f);  // a view into the one buffer
  t.grad(t.slice("g")).data<float>()[0] = 1.0f;
  t.zero_grads();
  EXPECT_EQ(t.grads().data<float>()[112], 0.0f);
  EXPECT_THROW(t.slice("nope"), Error);
}

TEST(Muon, NewtonSchulzMatchesTheTextbookIterationAndOrthogonalizes) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{48, 96}, {96, 48}, {33, 33}}) {
    Tensor g = random_f32({rows, cols}, 100 + rows);
    const Mat expect = reference_ns5(to_mat(g), 5);
    newton_schulz5(dispatcher(), g, 5);
    const Mat got = to_mat(g);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) ASSERT_NEAR(got[i][j], expect[i][j], 2e-4) << rows << "x" << cols << " at " << i << "," << j;
    // Near-orthogonal: on the small side X X^T has a diagonal near 1 (the quintic keeps singular
    // values roughly within [0.7, 1.2]).
    const Mat small = rows <= cols ? got : transpose(got);
    const Mat gram = mul(small, transpose(small));
    for (size_t i = 0; i < gram.size(); ++i) EXPECT_TRUE(gram[i][i] > 0.4 && gram[i][i] < 1.5) << gram[i][i];
  }
  EXPECT_DOUBLE_EQ(muon_scale(256, 64), 2.0);
  EXPECT_DOUBLE_EQ(muon_scale(64, 256), 1.0);
}

// Three optimizer steps on a table with one matrix (Muon) and one vector of each AdamW group.
TEST(Optimizer, StepsMatchReferenceMuonAndAdamW) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  ParamTable t;
  t.add("blocks.0.w", {16, 40}, ParamGroup::block_matrix);
  t.add("emb", {7, 5}, ParamGroup::embedding);
  t.add("norm", {5}, ParamGroup::norm);
  t.allocate();
  Rng rng(run_seed(), 7);
  for (int64_t i = 0; i < t.numel(); ++i) t.params().data<float>()[i] = rng.normal();
  OptimizerConfig cfg;
  cfg.grad_clip = 0;
  cfg.schedule.kind = Schedule::Kind::constant;
  cfg.adamw.weight_decay = 0.1;
  cfg.muon.weight_decay = 0.05;
  // The references, in double.
  const auto& ws = t.slice("blocks.0.w");
  Mat w = to_mat(t.param(ws)), mom(16, std::vector<double>(40, 0.0));
  std::vector<double> p_adam, m_adam, v_adam;
  std::vector<int64_t> adam_index;
  std::vector<bool> adam_decays;
  for (const char* name : {"emb", "norm"}) {
    const auto& s = t.slice(name);
    for (int64_t i = 0; i < s.numel; ++i) {
      adam_index.push_back(s.offset + i);
      p_adam.push_back(t.params().data<float>()[s.offset + i]);
      adam_decays.push_back(s.group != ParamGroup::norm);
    }
  }
  m_adam.assign(p_adam.size(), 0.0);
  v_adam.assign(p_adam.size(), 0.0);
  for (int step = 0; step < 3; ++step) {
    for (int64_t i = 0; i < t.numel(); ++i) t.grads().data<float>()[i] = rng.normal();
    // Muon reference: EMA momentum, Nesterov lerp, Newton-Schulz, shape scale, decoupled decay.
    const Mat g = to_mat(t.grad(ws));
    Mat u = g;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 40; ++j) {
        mom[i][j] = 0.95 * mom[i][j] + 0.05 * g[i][j];
        u[i][j] = 0.95 * mom[i][j] + 0.05 * g[i][j];
      }
    u = reference_ns5(u, 5);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 40; ++j) w[i][j] = w[i][j] * (1 - 0.02 * 0.05) - 0.02 * muon_scale(16, 40) * u[i][j];
    // AdamW reference (PyTorch's formula).
    const double bc1 = 1 - std::pow(0.9, step + 1), bc2 = 1 - std::pow(0.95, step + 1);
    for (size_t k = 0; k < p_adam.size(); ++k) {
      const double gk = t.grads().data<float>()[adam_index[k]];
      p_adam[k] *= 1 - 3e-3 * (adam_decays[k] ? 0.1 : 0.0);
      m_adam[k] = 0.9 * m_adam[k] + 0.1 * gk;
      v_adam[k] = 0.95 * v_adam[k] + 0.05 * gk * gk;
      p_adam[k] -= 3e-3 / bc1 * m_adam[k] / (std::sqrt(v_adam[k]) / std::sqrt(bc2) + 1e-8);
    }
    const StepReport r = optimizer_step(dispatcher(), t, cfg, step);
    EXPECT_FALSE(r.clipped);
    const Mat got = to_mat(t.param(ws));
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 40; ++j) ASSERT_NEAR(got[i][j], w[i][j], 1e-4 * (1 + std::fabs(w[i][j]))) << "step " << step;
    for (size_t k = 0; k < p_adam.size(); ++k) ASSERT_NEAR(t.params().data<float>()[adam_index[k]], p_adam[k], 1e-5 * (1 + std::fabs(p_adam[k])));
  }
}

TEST(Optimizer, AdamWGroupsTakeTheirOwnLearningRateAndDecay) {
  ParamTable t;
  t.add("emb", {4}, ParamGroup::embedding);
  t.add("head", {4}, ParamGroup::head);
  t.add("norm", {4}, ParamGroup::norm);
  t.allocate();
  for (int64_t i = 0; i < t.numel(); ++i) t.params().data<float>()[i] = 1.0f;
  OptimizerConfig cfg;
  cfg.grad_clip = 0;
  cfg.schedule.kind = Schedule::Kind::constant;
  cfg.adamw.lr = 0.1;
  cfg.adamw.weight_decay = 0.5;
  cfg.adamw.head_lr = 0.01;      // head: its own lr, the shared decay
  cfg.adamw.norm_weight_decay = 0.2;  // norm: the shared lr, its own decay
  // Zero gradients: only the decay moves a parameter, by lr * wd.
  optimizer_step(dispatcher(), t, cfg, 0);
  EXPECT_NEAR(t.param(t.slice("emb")).data<float>()[0], 1.0 - 0.1 * 0.5, 1e-6);
  EXPECT_NEAR(t.param(t.slice("head")).data<float>()[0], 1.0 - 0.01 * 0.5, 1e-6);
  EXPECT_NEAR(t.param(t.slice("norm")).data<float>()[0], 1.0 - 0.1 * 0.2, 1e-6);
}

// optim.matrices: adamw puts block matrices through AdamW at the shared lr and decay: the same
// update an embedding parameter with the same gradient gets.
TEST(Optimizer, BlockMatricesTakeAdamWWhenAsked) {
  ParamTable t;
  t.add("w", {2, 3}, ParamGroup::block_matrix);
  t.add("emb", {2, 3}, ParamGroup::embedding);
  t.allocate();
  Rng rng(run_seed(), 7);
  for (int64_t i = 0; i < 6; ++i) {
    t.params().data<float>()[i] = t.params().data<float>()[t.slice("emb").offset + i] = rng.normal();
    t.grads().data<float>()[i] = t.grads().data<float>()[t.slice("emb").offset + i] = rng.normal();
  }
  OptimizerConfig cfg;
  cfg.grad_clip = 0;
  cfg.schedule.kind = Schedule::Kind::constant;
  cfg.adamw.weight_decay = 0.1;
  cfg.matrices = OptimizerConfig::Matrices::adamw;
  optimizer_step(dispatcher(), t, cfg, 0);
  const float* p = t.params().data<float>();
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(p[i], p[t.slice("emb").offset + i]) << i;
  EXPECT_EQ(t.muon_momentum().data<float>()[0], 0.0f);  // Muon never ran
}

TEST(Optimizer, ClipsByGlobalNormAndRefusesNonFiniteGradients) {
  ParamTable t;
  t.add("a", {3}, ParamGroup::norm);
  t.add("b", {4}, ParamGroup::embedding);
  t.allocate();
  const float g[7] = {3, 0, 0, 0, 4, 0, 0};  // global norm 5
  std::memcpy(t.grads().data<float>(), g, 3 * 4);
  std::memcpy(t.grads().data<float>() + t.slice("b").offset, g + 3, 4 * 4);
  OptimizerConfig cfg;
  cfg.grad_clip = 1.0;
  const StepReport r = optimizer_step(dispatcher(), t, cfg, 0);
  EXPECT_NEAR(r.grad_norm, 5.0, 1e-12);
  EXPECT_TRUE(r.clipped);
  EXPECT_NEAR(t.grads().data<float>()[0], 0.6f, 1e-6);  // scaled to norm 1
  const Tensor before = t.params().clone();
  t.grads().data<float>()[t.slice("b").offset + 2] = std::numeric_limits<float>::quiet_NaN();
  try {
    optimizer_step(dispatcher(), t, cfg, 41);
    FAIL() << "a NaN gradient must stop the step";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "step 41: the gradient of b is not finite (element 2 is NaN); no parameter was changed");
  }
  EXPECT_EQ(bytes_of(before), bytes_of(t.params()));
}

// Distributed Muon: every matrix has exactly one owner, and no rank carries more than an even
// share plus one matrix of Newton-Schulz work, for any rank count.
TEST(Muon, OwnersSplitTheNewtonSchulzWorkEvenly) {
  ParamTable table;
  ModelConfig cfg;
  cfg.dim = 96, cfg.n_layers = 3, cfg.n_heads = 4, cfg.n_kv_heads = 2;
  Model::declare_parameters(cfg, table);
  auto cost = [](const ParamSlice& s) { return double(s.shape[0]) * double(s.shape[1]) * double(std::min(s.shape[0], s.shape[1])); };
  for (int ranks = 1; ranks <= 7; ++ranks) {
    SCOPED_TRACE(cat(ranks, " ranks"));
    const std::vector<int> owners = muon_owners(table, OptimizerConfig::Matrices::muon, ranks);
    ASSERT_EQ(owners.size(), table.slices().size());
    std::vector<double> load(size_t(ranks), 0.0);
    double total = 0, largest = 0;
    for (size_t i = 0; i < owners.size(); ++i) {
      const ParamSlice& s = table.slices()[i];
      if (s.group != ParamGroup::block_matrix) {
        EXPECT_EQ(owners[i], -1) << s.name;
        continue;
      }
      ASSERT_GE(owners[i], 0) << s.name;
      ASSERT_LT(owners[i], ranks) << s.name;
      load[size_t(owners[i])] += cost(s), total += cost(s), largest = std::max(largest, cost(s));
    }
    for (double l : load) EXPECT_LE(l, total / ranks + largest);
    EXPECT_EQ(muon_owners(table, OptimizerConfig::Matrices::adamw, ranks), std::vector<int>(owners.size(), -1));
  }
}

TEST(Schedule, DefiningPoints) {
  Schedule s;
  s.total_steps = 1000;
  s.warmup_steps = 100;
  s.min_lr_ratio = 0.1;
  s.kind = Schedule::Kind::constant;
  EXPECT_DOUBLE_EQ(s.at(0).lr, 0.01);
  EXPECT_DOUBLE_EQ(s.at(49).lr, 0.5);
  EXPECT_DOUBLE_EQ(s.at(500).lr, 1.0);
  s.kind = Schedule::Kind::cosine;
  EXPECT_DOUBLE_EQ(s.at(100).lr, 1.0);
  EXPECT_NEAR(s.at(550).lr, 0.55, 1e-12);   // halfway through the decay
  EXPECT_NEAR(s.at(1000).lr, 0.1, 1e-12);
  s.kind = Schedule::Kind::wsd;
  s.decay_fraction = 0.2;
  EXPECT_DOUBLE_EQ(s.at(799).lr, 1.0);
  EXPECT_NEAR(s.at(900).lr, 0.55, 1e-12);   // linear over the last 200 steps
  s.kind = Schedule::Kind::bitnet_two_stage;
  s.warmup_steps = 0;
  s.stage2_lr_ratio = 0.25;
  EXPECT_DOUBLE_EQ(s.at(0).lr, 1.0);
  EXPECT_DOUBLE_EQ(s.at(0).weight_decay, 1.0);
  const double before_drop = s.at(499).lr, after_drop = s.at(500).lr;
  EXPECT_GT(before_drop, 0.5);
  EXPECT_NEAR(after_drop, 0.25, 1e-12);     // the abrupt drop at mid-run
  EXPECT_EQ(s.at(500).weight_decay, 0.0);   // and no weight decay in the second stage
  // Between, the decay ramps down on a cosine over the first stage (not "on" throughout): half at
  // a quarter of the run, and strictly decreasing.
  EXPECT_NEAR(s.at(250).weight_decay, 0.5, 1e-12);
  EXPECT_NEAR(s.at(125).weight_decay, 0.5 * (1.0 + std::cos(std::numbers::pi * 0.25)), 1e-12);
  EXPECT_GT(s.at(100).weight_decay, s.at(300).weight_decay);
  EXPECT_EQ(s.at(999).weight_decay, 0.0);
  EXPECT_NEAR(s.at(1000).lr, 0.025, 1e-12);
  EXPECT_THROW(parse_schedule_kind("linear", "optim.schedule"), Error);
}

}  // namespace
}  // namespace hybrit::test
