// The model, the optimizers and the data layer together: a short run on the fortunes corpus
// learns, and is bit-for-bit repeatable (what exact resume will rest on). Gradients themselves are
// checked against PyTorch in tests/python/test_model_torch.py.
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include "test_support.hpp"
#include "model/text.hpp"
#include "model/model.hpp"
#include "training/batches.hpp"
#include "training/optim.hpp"

namespace hybrit::test {
namespace {

std::vector<double> short_run(ModelConfig::Quant quant, const Split& split, int steps) {
  DispatcherOptions o;
  o.use_environment = false;
  Dispatcher d(o);
  ModelConfig cfg;
  cfg.dim = 64, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2, cfg.context = 32, cfg.quant = quant;
  Model model(cfg, d, 1234);
  OptimizerConfig opt;
  opt.schedule.kind = Schedule::Kind::constant;
  opt.schedule.total_steps = steps;
  opt.adamw.lr = 3e-3;
  opt.muon.lr = 0.02;
  const int batch = 8, context = 32;
  std::vector<int32_t> in(batch * context), tg(batch * context);
  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    draw_batch(split.train, step, batch, context, 7, in.data(), tg.data());
    model.params().zero_grads();
    losses.push_back(model.forward(in.data(), tg.data(), batch, context));
    model.backward();
    optimizer_step(d, model.params(), opt, step);
  }
  return losses;
}

TEST(Training, ShortRunsOnFortunesLearnAndRepeatExactly) {
  if (!std::filesystem::is_directory(kDefaultCorpus)) GTEST_SKIP() << kDefaultCorpus << " is missing: apt-get install fortunes";
  const Corpus corpus = read_corpus({kDefaultCorpus});
  const Split split = split_by_record(tokenize(corpus), 0.05, 1);
  for (auto quant : {ModelConfig::Quant::none, ModelConfig::Quant::ternary}) {
    SCOPED_TRACE(quant == ModelConfig::Quant::none ? "quant none" : "quant ternary");
    const std::vector<double> a = short_run(quant, split, 40), b = short_run(quant, split, 40);
    SCOPED_TRACE(cat("losses: first ", a[0], ", step 10 ", a[10], ", step 20 ", a[20], ", last ", a[39]));
    EXPECT_EQ(a, b);  // bit for bit: same seed, same batches, deterministic kernels
    // From ln(257) = 5.55 at the start; byte-level English drops below 3.6 within 40 steps.
    EXPECT_NEAR(a.front(), 5.55, 0.3);
    double late = 0;
    for (int i = 30; i < 40; ++i) late += a[size_t(i)] / 10;
    EXPECT_LT(late, 3.6) << "mean loss of steps 30-39";
  }
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t stream) {
  Rng rng(run_seed(), stream);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = int32_t(rng.below(uint64_t(vocab)));
  return t;
}

// One batch of 12 against 4 micro-batches of 3 whose gradients are summed at loss scale 1/4.
TEST(Training, GradientAccumulationEqualsOneLargeBatch) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  DispatcherOptions o;
  o.use_environment = false;
  Dispatcher d(o);
  for (auto quant : {ModelConfig::Quant::none, ModelConfig::Quant::ternary}) {
    SCOPED_TRACE(quant == ModelConfig::Quant::none ? "quant none" : "quant ternary");
    ModelConfig cfg;
    cfg.dim = 64, cfg.n_layers = 2, cfg.n_heads = 4, cfg.n_kv_heads = 2, cfg.context = 40, cfg.quant = quant;
    Model model(cfg, d, 99);
    const int64_t batch = 12, seq = 40, micro = 3;
    const std::vector<int32_t> in = random_tokens(batch * seq, cfg.vocab_size, 1), tg = random_tokens(batch * seq, cfg.vocab_size, 2);
    model.params().zero_grads();
    const double whole = model.forward(in.data(), tg.data(), batch, seq);
    model.backward();
    const std::vector<float> g_whole(model.params().grads().data<float>(), model.params().grads().data<float>() + model.params().grads().numel());
    model.params().zero_grads();
    double summed = 0;
    for (int64_t i = 0; i < batch / micro; ++i) {
      summed += model.forward(in.data() + i * micro * seq, tg.data() + i * micro * seq, micro, seq) / double(batch / micro);
      model.backward(1.0f / float(batch / micro));
    }
    EXPECT_NEAR(summed, whole, 1e-6 * whole);
    // Full precision: only the summation order differs. Ternary: a last-bit difference before an
    // int8 activation quantizer can move a value by one quantization step (1/127 of its row's
    // largest), and the straight-through gradient carries that on; over 150 seeds the largest
    // per-parameter difference was 3e-3 of the largest gradient and the relative L2 error 1.1e-3.
    // A wrong micro-batch scale or a lost micro-batch is off by 25% or more.
    const bool ternary = quant == ModelConfig::Quant::ternary;
    const double max_tolerance = ternary ? 2e-2 : 1e-4, l2_tolerance = ternary ? 1e-2 : 1e-4;
    const float* g = model.params().grads().data<float>();
    for (const auto& slice : model.params().slices()) {
      double worst = 0, scale = 1e-12, diff_sq = 0, norm_sq = 1e-30;
      for (int64_t i = slice.offset; i < slice.offset + slice.numel; ++i) {
        const double diff = double(g[i]) - g_whole[size_t(i)];
        worst = std::max(worst, std::abs(diff));
        scale = std::max(scale, std::abs(double(g_whole[size_t(i)])));
        diff_sq += diff * diff, norm_sq += double(g_whole[size_t(i)]) * g_whole[size_t(i)];
      }
      EXPECT_LE(worst, max_tolerance * scale) << slice.name << ": largest difference " << worst << " against a largest gradient of " << scale;
      EXPECT_LE(std::sqrt(diff_sq / norm_sq), l2_tolerance) << slice.name << ": relative L2 difference";
    }
  }
}

// Data-parallel training sums each range of the gradient buffer as soon as backward() hands it
// over: the ranges must cover the buffer once, arrive in gradient_ranges() order, and hold their
// final values at that moment (nothing later in the backward may add to them).
TEST(Training, BackwardHandsOverEachGradientRangeOnceItIsFinal) {
  SCOPED_TRACE(cat("seed ", run_seed()));
  DispatcherOptions o;
  o.use_environment = false;
  Dispatcher d(o);
  for (const bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied embeddings" : "separate head");
    ModelConfig cfg;
    cfg.dim = 64, cfg.n_layers = 3, cfg.n_heads = 4, cfg.context = 16, cfg.tied_embeddings = tied;
    Model model(cfg, d, 7);
    const std::vector<int32_t> in = random_tokens(2 * 16, cfg.vocab_size, 5), tg = random_tokens(2 * 16, cfg.vocab_size, 6);
    model.params().zero_grads();
    model.forward(in.data(), tg.data(), 2, 16);
    std::vector<std::pair<int64_t, int64_t>> seen;
    std::vector<std::vector<float>> at_hand_over;
    const float* g = model.params().grads().data<float>();
    model.backward(1.0f, [&](int64_t offset, int64_t n) {
      seen.push_back({offset, n});
      at_hand_over.emplace_back(g + offset, g + offset + n);
    });
    EXPECT_EQ(seen, model.gradient_ranges());
    std::vector<int> covered(size_t(model.params().numel()), 0);
    for (size_t i = 0; i < seen.size(); ++i) {
      for (int64_t j = 0; j < seen[i].second; ++j) ++covered[size_t(seen[i].first + j)];
      EXPECT_EQ(std::memcmp(at_hand_over[i].data(), g + seen[i].first, size_t(seen[i].second) * sizeof(float)), 0)
          << "range at " << seen[i].first << " changed after it was handed over";
    }
    EXPECT_EQ(std::count(covered.begin(), covered.end(), 1), int64_t(covered.size())) << "every gradient in exactly one range";
    EXPECT_EQ(seen.size(), size_t(cfg.n_layers) + 2);  // the tail (final norm, head), each block, the embedding
  }
}

// Resets the peak resident memory (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); -1
// when this kernel does not offer it.
int64_t reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return clear ? 0 : -1;
}
// A field of /proc/self/status in bytes (VmHWM: the peak since the reset; VmRSS: now); -1 if absent.
int64_t status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1)) * 1024;
  return -1;
}

// A training step at context 2048 never holds a (batch, heads, T, T) probability tensor: its
// peak memory grows by less than one layer's such tensor would take (64 MiB here, two layers).
TEST(Training, LongContextStepNeverAllocatesTheAttentionMatrix) {
  if (reset_peak_rss() < 0 || status_bytes("VmRSS") < 0) GTEST_SKIP() << "/proc/self/clear_refs is not writable here: peak RSS cannot be reset";
  DispatcherOptions o;
  o.use_environment = false;
  Dispatcher d(o);
  ModelConfig cfg;
  cfg.dim = 64, cfg.n_layers = 2, cfg.n_heads = 4, cfg.context = 2048;
  Model model(cfg, d, 5);
  const int64_t T = 2048, batch = 1;
  const std::vector<int32_t> in = random_tokens(T, cfg.vocab_size, 3), tg = random_tokens(T, cfg.vocab_size, 4);
  model.params().zero_grads();
  reset_peak_rss();
  const int64_t before = status_bytes("VmRSS");
  const double loss = model.forward(in.data(), tg.data(), batch, T);
  model.backward();
  const int64_t growth = status_bytes("VmHWM") - before;
  const int64_t probability_tensor = batch * cfg.n_heads * T * T * int64_t(sizeof(float));
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_LT(growth, probability_tensor) << "peak memory grew by " << growth << " bytes in one step";
}

}  // namespace
}  // namespace hybrit::test
