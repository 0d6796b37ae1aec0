#include "training/trainer.hpp"
#include "core/file.hpp"

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "core/hash.hpp"
#include "core/log.hpp"
#include "training/plot.hpp"
#include "core/rng.hpp"

namespace hybrit {

namespace fs = std::filesystem;

namespace {
constexpr uint64_t kEvalStream = 0x4556414c;    // "EVAL": validation batches, fixed for the run
constexpr uint64_t kSampleStream = 0x53414d50;  // "SAMP"

DispatcherOptions dispatcher_options(const TrainConfig& c) {
  DispatcherOptions o = c.dispatch_sources;
  o.config_section = c.dispatch;
  return o;
}

ModelConfig with_vocab(ModelConfig m, int64_t vocab) {
  m.vocab_size = vocab;
  return m;
}
}  // namespace

// The tokenizer (a BPE one trained on the corpus, kept in cache_dir as tokenizer.model when there
// is one), the corpus tokenized through the cache, and the split by record.
Trainer::Data Trainer::prepare(const TrainConfig& c, const std::string& cache_dir, const std::string& tokenizer_model) {
  const Corpus corpus = read_corpus(c.data.sources, c.data.format);
  const bool fixed_val = !c.data.val_sources.empty();
  const Corpus val_corpus = fixed_val ? read_corpus(c.data.val_sources, c.data.format) : Corpus{};
  Data data;
  if (c.data.tokenizer == "bpe" && !tokenizer_model.empty()) {
    data.tokenizer = load_bpe_tokenizer(tokenizer_model);
  } else if (c.data.tokenizer == "bpe") {
    const bool temporary = cache_dir.empty();
    const fs::path dir = temporary ? fs::temp_directory_path() / cat("hybrit-bpe-", ::getpid(), "-", reinterpret_cast<uintptr_t>(&data)) : fs::path(cache_dir);
    fs::create_directories(dir);
    log_info("training a BPE tokenizer of ", c.data.vocab_size, " tokens on ", corpus.records.size(), " records");
    // The tokenizer keeps its model's bytes (model_bytes()): without a cache folder (Python's
    // Trainer) the file goes with the temporary folder, and every checkpoint still carries it.
    data.tokenizer = train_bpe_tokenizer(corpus, int32_t(c.data.vocab_size), (dir / "tokenizer.model").string());
    if (temporary) fs::remove_all(dir);
  } else {
    data.tokenizer = std::make_unique<ByteTokenizer>();
  }
  auto tokens_of = [&](const Corpus& k, const char* cache_name) {
    return cache_dir.empty() ? tokenize(k, *data.tokenizer) : tokenize_cached(k, (fs::path(cache_dir) / cache_name).string(), nullptr, *data.tokenizer);
  };
  const TokenizedCorpus tokens = tokens_of(corpus, "tokens.bin");
  if (fixed_val) {
    data.split = split_by_record(tokens, 0.0, c.seed);  // every record trains
    const Split val = split_by_record(tokens_of(val_corpus, "tokens-val.bin"), 0.0, c.seed);
    data.split.val = val.train;
    data.split.val_records = val.train_records;
  } else {
    data.split = split_by_record(tokens, c.data.val_fraction, c.seed);
  }
  const int64_t need = c.model.context + 1;
  if (int64_t(data.split.train.size()) < need || int64_t(data.split.val.size()) < need) {
    const bool short_train = int64_t(data.split.train.size()) < need;
    const Corpus& blamed = short_train || !fixed_val ? corpus : val_corpus;
    const std::string fix = fixed_val ? (short_train ? "more data in data.sources" : "more data in data.val_sources")
                            : blamed.records.size() < 2 ? "the whole corpus is one record, so there is nothing to hold out: check data.format"
                                                        : "more data, or a larger data.val_fraction";
    fail(ErrorKind::invalid_argument, "data: the corpus splits into ", data.split.train.size(), " training tokens (", data.split.train_records,
         " records) and ", data.split.val.size(), " validation tokens (", data.split.val_records, " records); each needs at least model.context + 1 = ",
         need, " (", fix, "). Read as: ", blamed.describe());
  }
  return data;
}

namespace {
// The memory check runs before any member allocates (a huge batch or model would otherwise end in
// bad_alloc, or in the OOM killer, before the one-line error).
const TrainConfig& memory_checked(const TrainConfig& config) {
  check_step_memory(config);
  return config;
}
}  // namespace

Trainer::Trainer(const TrainConfig& config, const std::string& cache_dir, const std::string& tokenizer_model)
    : comm_(Comm::world()),
      config_(memory_checked(config)),
      dispatcher_(dispatcher_options(config)),
      data_(prepare(config, cache_dir, tokenizer_model)),
      model_(with_vocab(config.model, data_.tokenizer->vocab_size()), dispatcher_, config.seed) {
  config_.model.vocab_size = data_.tokenizer->vocab_size();
  inputs_.resize(size_t(config_.train.batch * config_.model.context));
  targets_.resize(inputs_.size());
  model_.set_recompute(recompute_of(config_.train));
}

namespace {
std::string tokenizer_json(const Tokenizer& t) {
  nlohmann::json tok = {{"kind", t.kind()}, {"vocab_size", t.vocab_size()}, {"end_of_record", t.end_of_record()}};
  if (t.kind() == "bpe") tok["model"] = "tokenizer.model";
  return tok.dump(1);
}
}  // namespace

namespace {
// "1, 3": ranks for a message.
std::string rank_list(const std::vector<int>& ranks) {
  std::string text;
  for (int r : ranks) text += cat(text.empty() ? "" : ", ", r);
  return text;
}
}  // namespace

void Trainer::check_ranks_agree() {
  if (!comm_.distributed()) return;
  const Tensor& p = model_.params().params();
  uint64_t mine = fnv1a64(p.data<float>(), size_t(p.numel()) * sizeof(float)), root = mine;
  comm_.broadcast(&root, sizeof root, 0);
  if (const std::vector<int> differ = comm_.ranks_where(mine != root); !differ.empty())
    fail(ErrorKind::corrupt_data, "step ", step_, ": the parameters on rank ", rank_list(differ), " differ from rank 0's (the ranks diverged; nothing was saved)");
}

void Trainer::save(const std::string& path) {
  check_ranks_agree();
  if (!comm_.root()) return;  // rank 0 writes for the job
  CheckpointMeta meta;
  meta.step = step_;
  meta.tokens_seen = step_ * config_.train.batch * config_.model.context;
  meta.seed = config_.seed;
  meta.config_yaml = config_.to_yaml();
  meta.tokenizer_json = tokenizer_json(*data_.tokenizer);
  meta.tokenizer_model = data_.tokenizer->model_bytes();
  save_checkpoint(path, model_.params(), meta, config_.optim.matrices);
}

namespace {
// Refuses (ErrorKind::invalid_argument) a resume whose config changes what the run is: the model,
// the data and how it is split and drawn. `then` is the checkpoint's config, `now` the run's.
void check_resumable(const TrainConfig& now, const TrainConfig& then, const std::string& path) {
  const ModelConfig &a = then.model, &b = now.model;
  std::vector<std::pair<std::string, std::pair<std::string, std::string>>> fields = {
      {"model.dim", {cat(a.dim), cat(b.dim)}}, {"model.n_layers", {cat(a.n_layers), cat(b.n_layers)}},
      {"model.n_heads", {cat(a.n_heads), cat(b.n_heads)}}, {"model.n_kv_heads", {cat(a.kv_heads()), cat(b.kv_heads())}},
      {"model.ffn_hidden", {cat(a.hidden()), cat(b.hidden())}}, {"model.context", {cat(a.context), cat(b.context)}},
      {"model.rope_theta", {cat(a.rope_theta), cat(b.rope_theta)}}, {"model.norm_eps", {cat(a.norm_eps), cat(b.norm_eps)}},
      {"model.ffn", {cat(int(a.ffn)), cat(int(b.ffn))}}, {"model.quant", {cat(int(a.quant)), cat(int(b.quant))}},
      {"model.subln", {cat(a.subln), cat(b.subln)}}, {"model.tied_embeddings", {cat(a.tied_embeddings), cat(b.tied_embeddings)}},
      {"data.tokenizer", {then.data.tokenizer, now.data.tokenizer}}, {"data.format", {then.data.format, now.data.format}},
      {"data.val_fraction", {cat(then.data.val_fraction), cat(now.data.val_fraction)}}, {"seed", {cat(then.seed), cat(now.seed)}},
      {"train.batch", {cat(then.train.batch), cat(now.train.batch)}}};
  // The byte tokenizer's vocabulary is fixed; a BPE one is the checkpoint's own model, so the ask counts.
  if (then.data.tokenizer == "bpe") fields.push_back({"data.vocab_size", {cat(then.data.vocab_size), cat(now.data.vocab_size)}});
  for (const auto& [key, values] : fields)
    if (values.first != values.second)
      fail(ErrorKind::invalid_argument, "resume from ", path, ": ", key, " is ", values.first, " in the checkpoint but ", values.second, " in ",
           now.source, "; it cannot change when a run resumes");
  for (const auto& [key, lists] : {std::pair{"data.sources", std::pair{&then.data.sources, &now.data.sources}},
                                   std::pair{"data.val_sources", std::pair{&then.data.val_sources, &now.data.val_sources}}}) {
    if (*lists.first == *lists.second) continue;
    std::string was;
    for (const auto& s : *lists.first) was += (was.empty() ? "" : " ") + s;
    fail(ErrorKind::invalid_argument, "resume from ", path, ": ", key, " differ from the checkpoint's (", was.empty() ? "none" : was,
         "); they cannot change when a run resumes");
  }
}
}  // namespace

void Trainer::restore(const std::string& path) {
  const CheckpointMeta meta = inspect_checkpoint(path, nullptr);
  check_resumable(config_, checkpoint_config(meta, path), path);
  load_checkpoint(path, model_.params());
  step_ = meta.step;
}

void Trainer::batch(int64_t step, int32_t* inputs, int32_t* targets) const {
  draw_batch(data_.split.train, step, int(config_.train.batch), int(config_.model.context), config_.seed, inputs, targets);
}

namespace {
// Sums the gradient buffer over the ranks, a range at a time as the backward finalises it (the
// model's gradient_ranges, in that order), so the sums overlap the rest of the backward. A rank
// whose pass failed starts the ranges it did not reach at finish(), so every rank makes the same
// calls.
class GradientSum {
 public:
  GradientSum(Comm& comm, Model& model) : comm_(comm), model_(model), ranges_(model.gradient_ranges()) {}
  void ready(int64_t offset, int64_t numel) {  // backward hands over ranges_[next_]
    comm_.start_allreduce_sum(model_.params().grads().data<float>() + offset, numel);
    ++next_;
    comm_.progress();
  }
  void finish() {
    for (; next_ < ranges_.size(); ++next_) comm_.start_allreduce_sum(model_.params().grads().data<float>() + ranges_[next_].first, ranges_[next_].second);
    comm_.wait_all();
  }

 private:
  Comm& comm_;
  Model& model_;
  std::vector<std::pair<int64_t, int64_t>> ranges_;
  size_t next_ = 0;
};
}  // namespace

std::vector<std::pair<int64_t, int64_t>> Trainer::local_chunks() const {
  // This rank's rows of the global batch, [B r / N, B (r + 1) / N), in micro-batches of at most
  // train.batch / train.grad_accum rows (the memory a micro-batch takes does not depend on N).
  const Comm::Share rows = comm_.share(config_.train.batch);
  const int64_t micro = config_.train.batch / config_.train.grad_accum;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t row = rows.begin; row < rows.end; row += micro) chunks.push_back({row, std::min(micro, rows.end - row)});
  return chunks;
}

StepMetrics Trainer::step() {
  const TrainLoopConfig& t = config_.train;
  const int64_t context = config_.model.context;
  StepMetrics m;
  m.step = step_ + 1;
  Timer timer;
  batch(step_, inputs_.data(), targets_.data());  // the whole batch: a function of (seed, step)
  model_.params().zero_grads();
  const Schedule::Multipliers mult = config_.optim.schedule.at(step_);
  m.lr = config_.optim.muon.lr * mult.lr;
  std::string failure;
  const std::vector<std::pair<int64_t, int64_t>> chunks = local_chunks();
  GradientSum sum(comm_, model_);
  double loss = 0;
  try {
    // Activations that overflowed are refused by the quantizers; say which step it was.
    // Micro-batches are consecutive rows of the step's batch, so the step sees the same data for
    // any train.grad_accum and any number of ranks; each adds rows / batch of its mean loss's
    // gradient, so the sum over micro-batches and ranks is the gradient of the batch's mean loss.
    for (size_t i = 0; i < chunks.size() && failure.empty(); ++i) {
      const auto [row, rows] = chunks[i];
      const double weight = double(rows) / double(t.batch);
      const double chunk_loss = model_.forward(inputs_.data() + row * context, targets_.data() + row * context, rows, context);
      if (!std::isfinite(chunk_loss)) failure = cat("the loss is ", std::isnan(chunk_loss) ? "NaN" : "Inf");
      else if (comm_.distributed() && i + 1 == chunks.size()) model_.backward(float(weight), [&](int64_t offset, int64_t n) { sum.ready(offset, n); });
      else model_.backward(float(weight));
      loss += chunk_loss * weight;
    }
  } catch (const Error& e) {
    failure = cat("the forward or backward pass failed (", e.what(), ")");
  }
  if (comm_.distributed()) {
    // Every rank takes part in every sum, whatever its own pass did; then all know who failed.
    sum.finish();
    comm_.allreduce_sum(&loss, 1);
    const std::vector<int> failed = comm_.ranks_where(!failure.empty());
    if (failure.empty() && !failed.empty()) failure = cat("the pass failed on rank ", rank_list(failed), " (its message is in its log)");
  }
  m.loss = loss;
  if (!failure.empty()) {
    if (t.on_nonfinite == "stop")
      fail(ErrorKind::corrupt_data, "step ", m.step, ": ", failure, "; stopping before any update (train.on_nonfinite: skip would skip such steps)");
    m.skipped = true;
  } else {
    try {
      const StepReport r = optimizer_step(dispatcher_, model_.params(), config_.optim, step_, &comm_);
      m.grad_norm = r.grad_norm;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::corrupt_data || t.on_nonfinite == "stop") throw;
      m.skipped = true;
    }
  }
  ++step_;
  m.tokens_per_s = double(t.batch * context) / timer.seconds();
  m.peak_rss_bytes = peak_rss_bytes();
  return m;
}

double Trainer::evaluate() {
  const TrainLoopConfig& t = config_.train;
  const int64_t context = config_.model.context;
  double sum = 0;
  for (int64_t i = 0; i < t.eval_batches; ++i) {
    draw_batch(data_.split.val, i, int(t.batch), int(context), config_.seed ^ kEvalStream, inputs_.data(), targets_.data());
    for (const auto& [row, rows] : local_chunks())  // the training step's micro-batches and rows: the same memory
      sum += model_.forward(inputs_.data() + row * context, targets_.data() + row * context, rows, context) * (double(rows) / double(t.batch));
  }
  comm_.allreduce_sum(&sum, 1);
  return sum / double(t.eval_batches);
}

std::string Trainer::sample(int64_t n, const std::string& prompt, double temperature, uint64_t seed) {
  if (n < 0) fail(ErrorKind::invalid_argument, "sample: tokens: expected an integer >= 0, got ", n);
  if (!(temperature >= 0) || !std::isfinite(temperature)) fail(ErrorKind::invalid_argument, "sample: temperature: expected a number >= 0, got ", temperature);
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

namespace {
// ckpt-*.h5 in a run folder, newest first (the step in the name is zero-padded).
std::vector<std::string> checkpoints_newest_first(const std::string& run_dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("ckpt-", 0) == 0 && e.path().extension() == ".h5") found.push_back(e.path().string());
  }
  if (ec) fail(ErrorKind::io, run_dir, ": cannot list the run folder (", ec.message(), ")");
  std::sort(found.rbegin(), found.rend());
  return found;
}
}  // namespace

namespace {
std::string checkpoint_name(const std::string& run_dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "ckpt-%08lld.h5", static_cast<long long>(step));
  return (fs::path(run_dir) / name).string();
}

void prune_checkpoints(const std::string& run_dir, int64_t keep) {
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator(run_dir))
    if (e.path().filename().string().rfind("ckpt-", 0) == 0 && e.path().extension() == ".h5") found.push_back(e.path().string());
  std::sort(found.begin(), found.end());
  for (size_t i = 0; i + size_t(keep) < found.size(); ++i) fs::remove(found[i]);
}

// The lines of metrics.jsonl, each parsed. A line that is not JSON (the last one torn by a crash
// mid-write, or a damaged one) is left out with a warning naming its line.
std::vector<nlohmann::json> read_metrics(const fs::path& file) {
  std::ifstream in(file);
  std::vector<nlohmann::json> lines;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    try {
      nlohmann::json j = nlohmann::json::parse(line);
      if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) throw std::runtime_error("no integer step");
      lines.push_back(std::move(j));
    } catch (const std::exception&) {
      log_warn(file.string(), ":", number, ": not a metrics line (torn by a crash mid-write?); dropped");
    }
  }
  return lines;
}

// metrics.jsonl without the lines past `step` (or torn), rewritten atomically; returns the lines kept.
std::vector<nlohmann::json> truncate_metrics(const fs::path& file, int64_t step) {
  std::vector<nlohmann::json> kept;
  std::string text;
  for (auto& j : read_metrics(file))
    if (j["step"].get<int64_t>() <= step) text += j.dump() + "\n", kept.push_back(std::move(j));
  write_file_atomically(file.string(), text);
  return kept;
}
}  // namespace

Model::Recompute recompute_of(const TrainLoopConfig& t) {
  return t.recompute == "block" ? Model::Recompute::block : t.recompute == "attention" ? Model::Recompute::attention : Model::Recompute::none;
}

void check_step_memory(const TrainConfig& config) {
  const TrainLoopConfig& t = config.train;
  const int64_t micro = t.batch / t.grad_accum;
  ModelConfig model = config.model;
  if (config.data.tokenizer == "bpe") model.vocab_size = config.data.vocab_size;  // at most: BPE may settle on fewer
  const double params = double(Model::parameter_count(model)) * sizeof(float);
  // Parameters, gradients, AdamW's two moments or Muon's momentum plus its Newton-Schulz scratch,
  // and the quantized weights the forward multiplies by.
  const double state = params * (model.quant == ModelConfig::Quant::ternary ? 5 : 4);
  const double activations = Model::activation_bytes(model, recompute_of(t), micro, model.context);
  const double need = state + activations;
  const double available = double(hardware().memory_available_bytes);
  if (available > 0 && need > available)
    fail(ErrorKind::invalid_argument, "the model needs about ", format_bytes(need), " for a training step (parameters and optimizer state ",
         format_bytes(state), ", activations ", format_bytes(activations), " for micro-batches of ", micro, " sequences of ", model.context,
         " tokens) but ", format_bytes(available), " is available; raise train.grad_accum, ",
         t.recompute == "block" ? "" : "set train.recompute: block, ", "or lower train.batch or model.context");
}

RunResult run_training(const TrainConfig& config, const std::string& run_dir, const std::string& resume) {
  // Before the run folder is touched: the memory a step needs, and every dispatch source parsed
  // (a bad HYBRIT_THREADS is an error here, not after the folder exists).
  check_step_memory(config);
  resolve_overrides(dispatcher_options(config));
  // Several ranks (mpirun -np N): each checks what follows, rank 0 alone writes the run folder.
  Comm& comm = Comm::world();
  const bool root = comm.root();
  if (config.train.batch < comm.size())
    fail(ErrorKind::invalid_argument, "train.batch is ", config.train.batch, " but the job has ", comm.size(),
         " ranks, and each trains on its share of the batch's sequences: raise train.batch or run at most ", config.train.batch, " ranks");
  std::error_code ec;
  if (root) fs::create_directories(run_dir, ec);
  if (ec) fail(ErrorKind::io, run_dir, ": cannot create the run folder (", ec.message(), ")");
  const fs::path metrics_path = fs::path(run_dir) / "metrics.jsonl";
  // Resuming: `resume` names one checkpoint, or "auto" tries the run's newest first and falls back
  // to older ones when a file is damaged (saying so); a configuration that does not match is an
  // error either way, since an older checkpoint has the same architecture.
  const bool automatic = resume == "auto";
  std::vector<std::string> candidates;
  if (resume.empty()) {
    if (fs::exists(metrics_path)) fail(ErrorKind::invalid_argument, run_dir, ": already holds a run (metrics.jsonl); choose another --out or --resume auto");
  } else {
    candidates = automatic ? checkpoints_newest_first(run_dir) : std::vector<std::string>{resume};
    if (candidates.empty()) fail(ErrorKind::io, run_dir, ": no checkpoint to resume from");
  }
  // Every check that can refuse the resume runs before anything in the run folder is written:
  // the checkpoint is read whole (metadata and dataset checksums, the layout its config needs) and
  // its config compared with this one. A damaged file makes `auto` fall back to an older one; a
  // config that does not match is an error either way.
  std::string checkpoint;
  CheckpointMeta meta;
  for (const auto& candidate : candidates) {
    try {
      meta = verify_checkpoint(candidate);
    } catch (const Error& e) {
      if (!automatic) throw;
      log_warn("not resuming from ", candidate, ": ", e.what(), "; trying an older checkpoint");
      continue;
    }
    check_resumable(config, checkpoint_config(meta, candidate), candidate);
    checkpoint = candidate;
    break;
  }
  if (!candidates.empty() && checkpoint.empty()) fail(ErrorKind::io, run_dir, ": no valid checkpoint to resume from");
  comm.barrier();  // every rank has checked before rank 0 writes anything
  std::string tokenizer_model;  // the tokens must be the checkpoint's
  if (!meta.tokenizer_model.empty()) {
    tokenizer_model = (fs::path(run_dir) / "tokenizer.model").string();
    if (root) write_file_atomically(tokenizer_model, meta.tokenizer_model);
  }
  // Rank 0 tokenizes into the run folder's cache (and trains a BPE tokenizer there); the others
  // then read both.
  std::unique_ptr<Trainer> made;
  if (root) made = std::make_unique<Trainer>(config, run_dir, tokenizer_model);
  comm.barrier();
  if (!root) {
    if (config.data.tokenizer == "bpe" && tokenizer_model.empty()) tokenizer_model = (fs::path(run_dir) / "tokenizer.model").string();  // rank 0's
    made = std::make_unique<Trainer>(config, run_dir, tokenizer_model);
  }
  Trainer& trainer = *made;
  std::vector<nlohmann::json> earlier;  // a resumed run's metrics up to its checkpoint, read once
  if (!checkpoint.empty()) {
    trainer.restore(checkpoint);
    if (root && fs::exists(metrics_path)) earlier = truncate_metrics(metrics_path, trainer.steps_done());
    log_info("resumed from ", checkpoint, " at step ", trainer.steps_done());
  }
  if (root) {
    write_file_atomically((fs::path(run_dir) / "config.yaml").string(), cat("# resolved from ", config.source, "\n", trainer.config().to_yaml()));
    write_file_atomically((fs::path(run_dir) / "tokenizer.json").string(), tokenizer_json(trainer.tokenizer()) + "\n");
  }
  const TrainLoopConfig& t = config.train;
  int64_t n_params = 0;
  for (const auto& s : trainer.model().params().slices()) n_params += s.numel;
  log_info("run ", run_dir, ": ", n_params, " parameters (", config.model.quant == ModelConfig::Quant::ternary ? "ternary" : "full precision",
           "), ", trainer.split().train_records, " training and ", trainer.split().val_records, " validation records (", trainer.split().train.size(),
           " and ", trainer.split().val.size(), " tokens), ", t.steps, " steps of ", t.batch, " x ", config.model.context, " tokens",
           comm.distributed() ? cat(", data-parallel over ", comm.size(), " ranks (", Comm::library_version(), ")") : "");

  std::ofstream metrics;
  if (root) {
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) fail(ErrorKind::io, metrics_path.string(), ": cannot open for writing (", std::strerror(errno), ")");
  }
  int64_t last_saved = checkpoint.empty() ? -1 : trainer.steps_done();
  double best_val = INFINITY;
  if (t.keep_best && fs::exists(fs::path(run_dir) / "best.h5")) {  // a resumed run keeps beating its old best
    try {
      const CheckpointMeta best = inspect_checkpoint((fs::path(run_dir) / "best.h5").string(), nullptr);
      for (const auto& j : earlier)
        if (j["step"].get<int64_t>() == best.step && j.contains("val_loss") && j["val_loss"].is_number()) best_val = j["val_loss"].get<double>();
    } catch (const Error& e) {
      log_warn("best.h5: ", e.what(), "; the next evaluation replaces it");
    }
  }
  comm.broadcast(&best_val, sizeof best_val, 0);  // every rank decides alike when best.h5 is saved
  auto save = [&] {  // every rank calls it (trainer.save checks they agree); rank 0 writes
    trainer.save(checkpoint_name(run_dir, trainer.steps_done()));
    last_saved = trainer.steps_done();
    if (root) prune_checkpoints(run_dir, t.keep_checkpoints);
  };
  g_stop = false;
  auto old_int = std::signal(SIGINT, on_signal), old_term = std::signal(SIGTERM, on_signal);
  RunResult result;
  ProgressBar bar("train", t.steps);
  Timer total;
  // A resumed run's clock and token count go on from where the metrics stop.
  double elapsed_before = 0;
  const int64_t steps_before = trainer.steps_done();
  for (const auto& j : earlier)
    if (j.contains("elapsed_s") && j["elapsed_s"].is_number()) elapsed_before = std::max(elapsed_before, j["elapsed_s"].get<double>());
  const int64_t tokens_per_step = t.batch * config.model.context;
  try {
    // A signal on any rank stops every rank after the same step.
    while (trainer.steps_done() < t.steps && !comm.any(g_stop)) {
      StepMetrics m = trainer.step();
      const bool last = m.step == t.steps;
      if ((t.eval_every > 0 && m.step % t.eval_every == 0) || last) m.val_loss = trainer.evaluate();
      nlohmann::json line = {{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"grad_norm", m.grad_norm}, {"tokens", m.step * tokens_per_step},
                             {"tokens_per_s", m.tokens_per_s}, {"elapsed_s", elapsed_before + total.seconds()}, {"peak_rss_bytes", m.peak_rss_bytes}};
      if (m.skipped) line["skipped"] = true;
      if (m.val_loss) line["val_loss"] = *m.val_loss;
      if (root) {
        metrics << line.dump() << "\n" << std::flush;
        if (!metrics) fail(ErrorKind::io, metrics_path.string(), ": cannot write step ", m.step, " (disk full?); the last checkpoint is intact");
      }
      result.last_loss = m.loss;
      if (m.val_loss) result.val_loss = m.val_loss;
      if (m.val_loss && t.keep_best && *m.val_loss < best_val) {
        best_val = *m.val_loss;
        trainer.save((fs::path(run_dir) / "best.h5").string());
      }
      const std::string note = cat("loss ", std::to_string(m.loss).substr(0, 6), result.val_loss ? cat(" val ", std::to_string(*result.val_loss).substr(0, 6)) : "",
                                   " ", human_rate(m.tokens_per_s), " tok/s");
      bar.update(m.step, note);
      if (t.checkpoint_every > 0 && m.step % t.checkpoint_every == 0) save();
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
  if (last_saved != trainer.steps_done()) save();  // at the end, and on SIGINT/SIGTERM
  if (result.interrupted)
    log_info("interrupted after step ", result.steps_done, "; saved ", checkpoint_name(run_dir, result.steps_done), " (continue with --resume auto)");
  // Which backend ran what, and for how long (DESIGN: printed at the end of a run).
  log_info("dispatcher metrics (also in ", (fs::path(run_dir) / "dispatch_metrics.txt").string(), "):");
  const std::string table = trainer.dispatcher().metrics().table();
  if (root) write_file_atomically((fs::path(run_dir) / "dispatch_metrics.txt").string(), table);
  std::string line_buffer;
  for (std::istringstream lines(table); std::getline(lines, line_buffer);) log_info("  ", line_buffer);
  result.seconds = total.seconds();
  result.total_seconds = elapsed_before + result.seconds;
  if (result.seconds > 0) result.tokens_per_s = double((trainer.steps_done() - steps_before) * tokens_per_step) / result.seconds;
  log_info(trainer.steps_done() - steps_before, " steps in ", format_seconds(result.seconds), " (", human_rate(result.tokens_per_s), " tokens/s on average)",
           steps_before > 0 ? cat("; ", format_seconds(result.total_seconds), " for the whole run since step 0") : "");
  // loss.png: an extra, so a missing matplotlib is a note, not an error.
  if (!root) return result;  // the files and the sample are rank 0's
  std::string why_not;
  const std::string png = (fs::path(run_dir) / "loss.png").string();
  if (plot_runs({run_dir}, png, &why_not)) log_info("loss curves: ", png);
  else log_info("loss curves not drawn: ", why_not);
  if (t.sample_tokens > 0) {
    result.sample = printable_utf8(trainer.sample(t.sample_tokens, t.sample_prompt, t.sample_temperature, config.seed));
    write_file_atomically((fs::path(run_dir) / "sample.txt").string(), result.sample + "\n");
  }
  return result;
}

std::string find_checkpoint(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return path;  // a file (or nothing there: the reader says so)
  for (const auto& candidate : checkpoints_newest_first(path)) {
    try {
      verify_checkpoint(candidate);
      return candidate;
    } catch (const Error& e) {
      log_warn("skipping ", candidate, ": ", e.what());
    }
  }
  fail(ErrorKind::io, path, ": no valid checkpoint (ckpt-*.h5) in this folder");
}

std::string default_run_folder(const std::string& name) {
  const std::time_t now = std::time(nullptr);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  return cat("runs/", name, "-", stamp);
}

}  // namespace hybrit
