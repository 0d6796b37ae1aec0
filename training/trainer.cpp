#include "training/trainer.hpp"

#include <atomic>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "core/log.hpp"
#include "core/rng.hpp"

namespace hybrit {

namespace fs = std::filesystem;

namespace {
constexpr uint64_t kEvalStream = 0x4556414c;    // "EVAL": validation batches, fixed for the run
constexpr uint64_t kSampleStream = 0x53414d50;  // "SAMP"

Overrides dispatch_overrides(const TrainConfig& c) {
  Overrides o = c.dispatch;
  o.merge(overrides_from_env());  // the environment still wins over the file
  return o;
}

ModelConfig with_vocab(ModelConfig m, int64_t vocab) {
  m.vocab_size = vocab;
  return m;
}
}  // namespace

// The tokenizer (a BPE one trained on the corpus, kept in cache_dir as tokenizer.model when there
// is one), the corpus tokenized through the cache, and the split by record.
Trainer::Data Trainer::prepare(const TrainConfig& c, const std::string& cache_dir) {
  const Corpus corpus = read_corpus(c.data.sources, c.data.format);
  Data data;
  if (c.data.tokenizer == "bpe") {
    const bool temporary = cache_dir.empty();
    const fs::path dir = temporary ? fs::temp_directory_path() / cat("hybrit-bpe-", ::getpid(), "-", reinterpret_cast<uintptr_t>(&data)) : fs::path(cache_dir);
    fs::create_directories(dir);
    log_info("training a BPE tokenizer of ", c.data.vocab_size, " tokens on ", corpus.records.size(), " records");
    data.tokenizer = train_bpe_tokenizer(corpus, int32_t(c.data.vocab_size), (dir / "tokenizer.model").string());
    if (temporary) fs::remove_all(dir);
  } else {
    data.tokenizer = std::make_unique<ByteTokenizer>();
  }
  const TokenizedCorpus tokens = cache_dir.empty() ? tokenize(corpus, *data.tokenizer)
                                                   : tokenize_cached(corpus, (fs::path(cache_dir) / "tokens.bin").string(), nullptr, *data.tokenizer);
  data.split = split_by_record(tokens, c.data.val_fraction, c.seed);
  const int64_t need = c.model.context + 1;
  if (int64_t(data.split.train.size()) < need || int64_t(data.split.val.size()) < need)
    fail(ErrorKind::invalid_argument, "data: the corpus splits into ", data.split.train.size(), " training and ", data.split.val.size(),
         " validation tokens; each needs at least model.context + 1 = ", need, " (more data, or a larger data.val_fraction)");
  return data;
}

Trainer::Trainer(const TrainConfig& config, const std::string& cache_dir)
    : config_(config),
      dispatcher_([&] {
        DispatcherOptions o;
        o.overrides = dispatch_overrides(config);
        o.use_environment = false;
        return o;
      }()),
      data_(prepare(config, cache_dir)),
      model_(with_vocab(config.model, data_.tokenizer->vocab_size()), dispatcher_, config.seed) {
  config_.model.vocab_size = data_.tokenizer->vocab_size();
  inputs_.resize(size_t(config_.train.batch * config_.model.context));
  targets_.resize(inputs_.size());
}

void Trainer::batch(int64_t step, int32_t* inputs, int32_t* targets) const {
  draw_batch(data_.split.train, step, int(config_.train.batch), int(config_.model.context), config_.seed, inputs, targets);
}

StepMetrics Trainer::step() {
  const TrainLoopConfig& t = config_.train;
  const int64_t context = config_.model.context;
  StepMetrics m;
  m.step = step_ + 1;
  Timer timer;
  batch(step_, inputs_.data(), targets_.data());
  model_.params().zero_grads();
  const Schedule::Multipliers mult = config_.optim.schedule.at(step_);
  m.lr = config_.optim.muon.lr * mult.lr;
  std::string failure;
  try {
    // Activations that overflowed are refused by the quantizers; say which step it was.
    m.loss = model_.forward(inputs_.data(), targets_.data(), t.batch, context);
    if (!std::isfinite(m.loss)) failure = cat("the loss is ", std::isnan(m.loss) ? "NaN" : "Inf");
    else model_.backward();
  } catch (const Error& e) {
    failure = cat("the forward or backward pass failed (", e.what(), ")");
  }
  if (!failure.empty()) {
    if (t.on_nonfinite == "stop")
      fail(ErrorKind::corrupt_data, "step ", m.step, ": ", failure, "; stopping before any update (train.on_nonfinite: skip would skip such steps)");
    m.skipped = true;
  } else {
    try {
      const StepReport r = optimizer_step(dispatcher_, model_.params(), config_.optim, step_);
      m.grad_norm = r.grad_norm;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::corrupt_data || t.on_nonfinite == "stop") throw;
      m.skipped = true;
    }
  }
  ++step_;
  m.tokens_per_s = double(t.batch * context) / timer.seconds();
  return m;
}

double Trainer::evaluate() {
  const TrainLoopConfig& t = config_.train;
  const int64_t context = config_.model.context;
  double sum = 0;
  for (int64_t i = 0; i < t.eval_batches; ++i) {
    draw_batch(data_.split.val, i, int(t.batch), int(context), config_.seed ^ kEvalStream, inputs_.data(), targets_.data());
    sum += model_.forward(inputs_.data(), targets_.data(), t.batch, context);
  }
  return sum / double(t.eval_batches);
}

std::string Trainer::sample(int64_t n, const std::string& prompt, double temperature, uint64_t seed) {
  const Tokenizer& tok = *data_.tokenizer;
  std::vector<int32_t> tokens;
  tok.encode(prompt, tokens);
  if (tokens.empty()) tokens.push_back(tok.end_of_record());  // "a record starts here"
  const int64_t V = config_.model.vocab_size, context = config_.model.context;
  Rng rng(seed, kSampleStream);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = std::min<int64_t>(int64_t(tokens.size()), context);
    std::vector<int32_t> window(tokens.end() - len, tokens.end()), dummy(size_t(len), 0);
    model_.forward(window.data(), dummy.data(), 1, len);
    const float* logits = model_.logits().data<float>() + (len - 1) * V;
    int32_t next = 0;
    if (temperature <= 0) {
      next = int32_t(std::max_element(logits, logits + V) - logits);
    } else {
      const float top = *std::max_element(logits, logits + V);
      std::vector<double> p(static_cast<size_t>(V));
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) sum += p[size_t(j)] = std::exp(double(logits[j] - top) / temperature);
      double u = double(rng.uniform()) * sum;
      next = int32_t(V - 1);
      for (int64_t j = 0; j < V; ++j)
        if ((u -= p[size_t(j)]) < 0) {
          next = int32_t(j);
          break;
        }
    }
    tokens.push_back(next);
  }
  // The prompt's own text and then what the model wrote.
  const size_t skip = prompt.empty() ? 1 : 0;
  return tok.decode(tokens.data() + skip, tokens.size() - skip);
}

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }

std::string human_rate(double tokens_per_s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, tokens_per_s >= 1000 ? "%.1fk" : "%.0f", tokens_per_s >= 1000 ? tokens_per_s / 1000 : tokens_per_s);
  return buf;
}
}  // namespace

RunResult run_training(const TrainConfig& config, const std::string& run_dir) {
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) fail(ErrorKind::io, run_dir, ": cannot create the run folder (", ec.message(), ")");
  if (fs::exists(fs::path(run_dir) / "metrics.jsonl"))
    fail(ErrorKind::invalid_argument, run_dir, ": already holds a run (metrics.jsonl); choose another --out");
  Trainer trainer(config, run_dir);
  std::ofstream(fs::path(run_dir) / "config.yaml") << "# resolved from " << config.source << "\n" << trainer.config().to_yaml();
  nlohmann::json tok = {{"kind", trainer.tokenizer().kind()}, {"vocab_size", trainer.tokenizer().vocab_size()},
                        {"end_of_record", trainer.tokenizer().end_of_record()}};
  if (trainer.tokenizer().kind() == "bpe") tok["model"] = "tokenizer.model";
  std::ofstream(fs::path(run_dir) / "tokenizer.json") << tok.dump(1) << "\n";
  const TrainLoopConfig& t = config.train;
  int64_t n_params = 0;
  for (const auto& s : trainer.model().params().slices()) n_params += s.numel;
  log_info("run ", run_dir, ": ", n_params, " parameters (", config.model.quant == ModelConfig::Quant::ternary ? "ternary" : "full precision",
           "), ", trainer.split().train_records, " training and ", trainer.split().val_records, " validation records (", trainer.split().train.size(),
           " and ", trainer.split().val.size(), " tokens), ", t.steps, " steps of ", t.batch, " x ", config.model.context, " tokens");

  std::ofstream metrics(fs::path(run_dir) / "metrics.jsonl");
  g_stop = false;
  auto old_int = std::signal(SIGINT, on_signal), old_term = std::signal(SIGTERM, on_signal);
  RunResult result;
  ProgressBar bar("train", t.steps);
  Timer total;
  try {
    while (trainer.steps_done() < t.steps && !g_stop) {
      StepMetrics m = trainer.step();
      const bool last = m.step == t.steps;
      if ((t.eval_every > 0 && m.step % t.eval_every == 0) || last) m.val_loss = trainer.evaluate();
      nlohmann::json line = {{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"grad_norm", m.grad_norm}, {"tokens_per_s", m.tokens_per_s},
                             {"elapsed_s", total.seconds()}};
      if (m.skipped) line["skipped"] = true;
      if (m.val_loss) line["val_loss"] = *m.val_loss;
      metrics << line.dump() << "\n" << std::flush;
      result.last_loss = m.loss;
      if (m.val_loss) result.val_loss = m.val_loss;
      const std::string note = cat("loss ", std::to_string(m.loss).substr(0, 6), result.val_loss ? cat(" val ", std::to_string(*result.val_loss).substr(0, 6)) : "",
                                   " ", human_rate(m.tokens_per_s), " tok/s");
      bar.update(m.step, note);
      if (!bar.drawing() && (m.step % t.log_every == 0 || m.val_loss || m.step == 1))
        log_info("step ", m.step, "/", t.steps, " ", note, m.skipped ? " (skipped: not finite)" : "");
    }
  } catch (...) {
    bar.finish();
    std::signal(SIGINT, old_int);
    std::signal(SIGTERM, old_term);
    throw;
  }
  bar.finish();
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  result.steps_done = trainer.steps_done();
  result.interrupted = trainer.steps_done() < t.steps;
  if (result.interrupted) log_info("interrupted after step ", result.steps_done, "; metrics are in ", (fs::path(run_dir) / "metrics.jsonl").string());
  if (t.sample_tokens > 0) {
    result.sample = printable_utf8(trainer.sample(t.sample_tokens, t.sample_prompt, t.sample_temperature, config.seed));
    std::ofstream(fs::path(run_dir) / "sample.txt") << result.sample << "\n";
  }
  return result;
}

}  // namespace hybrit
