#include "inference/engine.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/hash.hpp"

namespace hybrit {

void SamplingParams::validate() const {
  if (!(temperature >= 0) || !std::isfinite(temperature)) fail_field("temperature", "expected a number >= 0, got ", temperature);
  if (top_k < 0) fail_field("top_k", "expected an integer >= 0 (0: off), got ", top_k);
  if (!(top_p > 0 && top_p <= 1)) fail_field("top_p", "expected a number in (0, 1], got ", top_p);
  if (!(min_p >= 0 && min_p <= 1)) fail_field("min_p", "expected a number in [0, 1], got ", min_p);
  if (!(repetition_penalty > 0) || !std::isfinite(repetition_penalty))
    fail_field("repetition_penalty", "expected a number > 0 (1: off), got ", repetition_penalty);
}

uint64_t fresh_seed() {
  std::random_device device;
  return (uint64_t(device()) << 32) ^ uint64_t(device());
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, const std::vector<int32_t>& history, int64_t index) {
  std::vector<double> l(logits, logits + vocab);
  if (p.repetition_penalty != 1.0) {
    std::vector<char> seen(size_t(vocab), 0);
    for (int32_t t : history)
      if (t >= 0 && t < vocab && !seen[size_t(t)]) {
        seen[size_t(t)] = 1;
        l[size_t(t)] = l[size_t(t)] > 0 ? l[size_t(t)] / p.repetition_penalty : l[size_t(t)] * p.repetition_penalty;
      }
  }
  if (p.temperature == 0) return int32_t(std::max_element(l.begin(), l.end()) - l.begin());  // the first of equal maxima
  const double top = *std::max_element(l.begin(), l.end());
  std::vector<std::pair<double, int32_t>> probs(static_cast<size_t>(vocab));
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += (probs[size_t(i)] = {std::exp((l[size_t(i)] - top) / p.temperature), int32_t(i)}).first;
  for (auto& pr : probs) pr.first /= sum;
  std::stable_sort(probs.begin(), probs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  size_t keep = probs.size();
  if (p.top_k > 0) keep = std::min(keep, size_t(p.top_k));
  if (p.top_p < 1) {
    double cum = 0;
    size_t i = 0;
    while (i < keep && cum < p.top_p) cum += probs[i++].first;
    keep = std::max<size_t>(1, i);
  }
  if (p.min_p > 0) {
    const double floor = p.min_p * probs[0].first;
    size_t i = 1;
    while (i < keep && probs[i].first >= floor) ++i;
    keep = i;
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += probs[i].first;
  Rng rng(p.seed, 0x73616d706c65ull, uint64_t(index));  // one counter per output position
  const double u = (double(rng.next_u32() >> 5) * 67108864.0 + double(rng.next_u32() >> 6)) * 0x1p-53 * total;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i)
    if ((cum += probs[i].first) > u) return probs[i].second;
  return probs[keep - 1].second;
}

const char* to_string(FinishReason r) { return size_t(r) < std::size(kFinishReasonNames) ? kFinishReasonNames[size_t(r)] : "?"; }

namespace {

// Bytes of `s` that end on a whole UTF-8 character: an incomplete trailing sequence is held back
// for the next token (a byte-level model writes characters a byte at a time).
size_t complete_utf8_prefix(const std::string& s) {
  size_t n = s.size(), back = 0;
  while (back < 4 && back < n && (static_cast<unsigned char>(s[n - 1 - back]) & 0xC0) == 0x80) ++back;
  if (back >= n) return n;
  const unsigned char lead = static_cast<unsigned char>(s[n - 1 - back]);
  const size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
  if (need == 1 || need <= back + 1) return n;  // ASCII, a complete sequence, or invalid bytes (sent as they are)
  return n - 1 - back;
}

}  // namespace

Engine::Engine(InferenceModel& model, const EngineOptions& o)
    : model_(model),
      options_(o),
      cache_(o.kv_blocks > 0 ? o.kv_blocks : std::max<int64_t>(1, o.max_running) * ((model.config().context + kKvBlockTokens) / kKvBlockTokens),
             model.config().n_layers, model.config().kv_heads(), model.config().head_dim()) {
  if (o.max_running < 1) fail(ErrorKind::invalid_argument, "max_running: expected >= 1, got ", o.max_running);
  if (o.prefill_chunk < 1) fail(ErrorKind::invalid_argument, "prefill_chunk: expected >= 1, got ", o.prefill_chunk);
  const int64_t one_sequence = (model.config().context + kKvBlockTokens) / kKvBlockTokens;
  if (cache_.blocks() < one_sequence)
    fail(ErrorKind::invalid_argument, "kv_blocks: ", cache_.blocks(), " blocks cannot hold one sequence of the full context (", model.config().context,
         " tokens need ", one_sequence, ")");
}

int64_t Engine::submit(GenerationRequest r) {
  const int64_t context = model_.config().context, vocab = model_.config().vocab_size;
  if (r.prompt.empty()) fail_field("prompt", "empty (give at least one token)");
  for (int32_t t : r.prompt)
    if (t < 0 || t >= vocab) fail_field("prompt", "token ", t, " is outside [0, ", vocab, ")");
  if (r.max_tokens < 1) fail_field("max_tokens", "expected >= 1, got ", r.max_tokens);
  r.sampling.validate();
  for (const auto& s : r.stop)
    if (s.empty()) fail_field("stop", "an empty stop string would end every output at once");
  if (int64_t(waiting_.size()) >= options_.max_waiting)
    fail(ErrorKind::unsupported, "queue full: ", waiting_.size(), " requests are waiting (max_waiting ", options_.max_waiting, ")");
  auto s = std::make_unique<Sequence>();
  s->id = next_id_++;
  s->tokens = r.prompt;
  s->prompt_len = int64_t(r.prompt.size());
  if (s->prompt_len > context) {
    s->window_start = s->prompt_len - window_kept(context);
    log_warn("request ", s->id, ": the prompt's ", s->prompt_len, " tokens exceed the model's context of ", context, "; it keeps its last ",
             s->prompt_len - s->window_start, " tokens");
  }
  s->request = std::move(r);
  const int64_t id = s->id;
  waiting_.push_back(std::move(s));
  return id;
}

void Engine::cancel(int64_t id) {
  for (auto& s : waiting_)
    if (s->id == id) s->cancelled = true;
  for (auto& s : running_)
    if (s->id == id) s->cancelled = true;
}

// Reuses cached blocks for the longest registered prefix of the window (whole blocks before the
// last token, which is always recomputed for its logits).
void Engine::reuse_cached_prefix(Sequence& s) {
  uint64_t h = kFnv1aOffset;
  const int64_t reusable = (s.window_len() - 1) / kKvBlockTokens;
  for (int64_t b = 0; b < reusable; ++b) {
    h = fnv1a64(s.window() + b * kKvBlockTokens, kKvBlockTokens * sizeof(int32_t), h);
    const int32_t block = cache_.lookup(h);
    if (block < 0) break;
    s.blocks.push_back(block);
    s.block_hashes.push_back(h);
  }
  s.computed = int64_t(s.blocks.size()) * kKvBlockTokens;
}

// The cached prefix, then a check that the rest fits.
bool Engine::admit(Sequence& s) {
  reuse_cached_prefix(s);
  const int64_t need = (s.window_len() + kKvBlockTokens) / kKvBlockTokens - int64_t(s.blocks.size());
  if (cache_.available() < need) {
    release(s);
    return false;
  }
  stats_.prompt_tokens_cached += s.computed;
  return true;
}

bool Engine::ensure_blocks(Sequence& s, int64_t upto) {
  while (int64_t(s.blocks.size()) * kKvBlockTokens < upto) {
    const int32_t b = cache_.allocate();
    if (b < 0) return false;
    s.blocks.push_back(b);
  }
  return true;
}

void Engine::release(Sequence& s) {
  for (int32_t b : s.blocks) cache_.release(b);
  s.blocks.clear();
  s.block_hashes.clear();
  s.computed = 0;
}

void Engine::preempt_newest() {
  std::unique_ptr<Sequence> s = std::move(running_.back());
  running_.pop_back();
  release(*s);  // recomputed from its tokens (prompt and output so far) when admitted again
  ++stats_.preemptions;
  waiting_.push_front(std::move(s));
}

// The window is full: keep its last context - shift tokens, recomputed from position 0 (RoPE
// positions past the context were never trained). Cached blocks of that suffix, if any, are reused
// by the prefix lookup as for any prompt.
void Engine::slide(Sequence& s) {
  const int64_t context = model_.config().context;
  release(s);
  s.window_start = int64_t(s.tokens.size()) - window_kept(context);
  ++stats_.window_slides;
  reuse_cached_prefix(s);
}

void Engine::emit(Sequence& s, int32_t token, FinishReason why) {
  size_t upto = s.text.size();
  if (why == FinishReason::none) {
    upto = complete_utf8_prefix(s.text);
    // Text that may be the start of a stop string waits until it is known not to be one.
    for (const auto& stop : s.request.stop)
      for (size_t len = std::min(stop.size() - 1, upto); len > 0; --len)
        if (s.text.compare(upto - len, len, stop, 0, len) == 0) {
          upto = std::min(upto, std::max(s.text_sent, upto - len));
          break;
        }
  }
  GenerationEvent e;
  e.request = s.id, e.token = token, e.finished = why;
  if (upto > s.text_sent) e.text = s.text.substr(s.text_sent, upto - s.text_sent), s.text_sent = upto;
  if (s.request.on_event && (token >= 0 || !e.text.empty() || why != FinishReason::none)) s.request.on_event(e);
}

void Engine::finish(Sequence& s, FinishReason why, int32_t token) {
  emit(s, token, why);
  release(s);
  ++stats_.finished;
}

bool Engine::step() {
  // Cancelled requests leave first.
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if ((*it)->cancelled) {
      finish(**it, FinishReason::cancelled, -1);
      it = waiting_.erase(it);
    } else {
      ++it;
    }
  }
  for (size_t i = 0; i < running_.size();) {
    if (running_[i]->cancelled) {
      finish(*running_[i], FinishReason::cancelled, -1);
      running_.erase(running_.begin() + int64_t(i));
    } else {
      ++i;
    }
  }
  while (!waiting_.empty() && int64_t(running_.size()) < options_.max_running && admit(*waiting_.front())) {
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  if (running_.empty()) return !waiting_.empty();

  // The plan: every decoding sequence adds its one token; prompts are computed in chunks that
  // share the prefill budget, oldest first. Blocks that cannot be found preempt the newest.
  std::vector<ForwardSlice> slices;
  std::vector<Sequence*> owners;
  int64_t budget = options_.prefill_chunk;
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& s = *running_[i];
    const int64_t remaining = s.window_len() - s.computed;
    const int64_t count = remaining == 1 ? 1 : std::min(remaining, budget);
    if (count < 1) continue;
    bool fits = ensure_blocks(s, s.computed + count);
    while (!fits && running_.back().get() != &s) {
      preempt_newest();
      fits = ensure_blocks(s, s.computed + count);
    }
    if (!fits) {  // this sequence is the newest: it waits for blocks
      preempt_newest();
      break;
    }
    if (remaining > 1) budget -= count;
    ForwardSlice sl;
    sl.tokens = s.window() + s.computed;
    sl.start = s.computed, sl.count = count, sl.block_table = &s.blocks;
    sl.want_logits = s.computed + count == s.window_len();
    slices.push_back(sl);
    owners.push_back(&s);
  }
  if (slices.empty()) return true;
  const Tensor logits = model_.forward(slices, cache_);
  ++stats_.steps;

  const int64_t vocab = model_.config().vocab_size, context = model_.config().context;
  const int32_t eos = model_.tokenizer().end_of_record();
  int64_t row = 0;
  std::vector<Sequence*> done;
  for (size_t i = 0; i < slices.size(); ++i) {
    Sequence& s = *owners[i];
    const int64_t at = s.window_start + s.computed;  // where in the history this slice began
    if (at < s.prompt_len) stats_.prompt_tokens_computed += std::min(slices[i].count, s.prompt_len - at);
    s.computed += slices[i].count;
    // Full blocks become shareable under the chained hash of every token up to their end.
    while (int64_t(s.block_hashes.size()) < s.computed / kKvBlockTokens) {
      const size_t b = s.block_hashes.size();
      const uint64_t prev = b == 0 ? kFnv1aOffset : s.block_hashes[b - 1];
      s.block_hashes.push_back(fnv1a64(s.window() + int64_t(b) * kKvBlockTokens, kKvBlockTokens * sizeof(int32_t), prev));
      cache_.register_block(s.block_hashes.back(), s.blocks[b]);
    }
    if (!slices[i].want_logits) continue;
    const int64_t index = int64_t(s.tokens.size()) - s.prompt_len;
    const int32_t token = sample_token(logits.data<float>() + row++ * vocab, vocab, s.request.sampling, s.tokens, index);
    s.tokens.push_back(token);
    ++stats_.tokens_generated;
    FinishReason why = FinishReason::none;
    if (token == eos) {
      why = FinishReason::eos;
    } else {
      s.text += model_.tokenizer().decode(&token, 1);  // both tokenizers decode token by token
      for (const auto& stop : s.request.stop) {
        // Text that could begin a stop string is never sent, so a match starts at text_sent or later.
        const size_t at = s.text.find(stop, s.text_sent);
        if (at != std::string::npos) {
          s.text.resize(at);
          why = FinishReason::stop;
        }
      }
    }
    if (why == FinishReason::none && index + 1 >= s.request.max_tokens) why = FinishReason::length;
    if (why == FinishReason::none) {
      if (s.window_len() > context) slide(s);
      emit(s, token, why);
    } else {
      finish(s, why, token);
      done.push_back(&s);
    }
  }
  if (!done.empty())
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [&](const auto& s) { return std::find(done.begin(), done.end(), s.get()) != done.end(); }),
                   running_.end());
  return !idle();
}

void Engine::run() {
  while (step()) {
  }
}

void Engine::finish_all(FinishReason why) {
  for (auto& s : running_) finish(*s, why, -1);
  for (auto& s : waiting_) finish(*s, why, -1);
  running_.clear();
  waiting_.clear();
}

EngineStats Engine::stats() const {
  EngineStats s = stats_;
  s.running = int64_t(running_.size());
  s.waiting = int64_t(waiting_.size());
  s.kv = cache_.stats();
  for (const auto& q : running_) s.wasted_slots += int64_t(q->blocks.size()) * kKvBlockTokens - q->computed;
  return s;
}

BackgroundEngine::BackgroundEngine(InferenceModel& model, const EngineOptions& options) : engine_(model, options) {
  thread_ = std::thread([this] { loop(); });
}

BackgroundEngine::~BackgroundEngine() { shutdown(); }

BackgroundEngine::Turn BackgroundEngine::take_turn() {
  callers_.fetch_add(1);
  std::unique_lock<std::mutex> lock(mutex_);
  callers_.fetch_sub(1);
  return Turn{std::move(lock), &wake_};
}

int64_t BackgroundEngine::submit(GenerationRequest request) {
  Turn turn = take_turn();
  if (stopping_) fail(ErrorKind::unsupported, "the engine is shutting down");
  return engine_.submit(std::move(request));
}

void BackgroundEngine::cancel(int64_t request) {
  Turn turn = take_turn();
  engine_.cancel(request);
}

void BackgroundEngine::shutdown() {
  {
    Turn turn = take_turn();
    if (!stopping_.exchange(true)) engine_.finish_all(FinishReason::cancelled);
  }
  if (thread_.joinable()) thread_.join();
}

BackgroundEngine::Snapshot BackgroundEngine::snapshot() {
  Turn turn = take_turn();
  Snapshot s;
  s.engine = engine_.stats();
  s.uptime_seconds = clock_.seconds();
  forget_before(s.uptime_seconds - kRateWindowSeconds);
  int64_t tokens = 0;
  for (const auto& r : recent_) tokens += r.second;
  s.tokens_per_second = double(tokens) / std::max(1e-3, std::min(kRateWindowSeconds, s.uptime_seconds));
  return s;
}

void BackgroundEngine::forget_before(double seconds) {
  while (!recent_.empty() && recent_.front().first < seconds) recent_.pop_front();
}

void BackgroundEngine::loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return stopping_ || (!engine_.idle() && callers_.load() == 0); });
    if (stopping_) return;
    const int64_t before = engine_.tokens_generated();
    try {
      engine_.step();
    } catch (const std::exception& e) {
      log_line(LogLevel::error, cat("engine step failed, ending every request: ", e.what()));
      engine_.finish_all(FinishReason::error);
    }
    const double now = clock_.seconds();
    if (const int64_t made = engine_.tokens_generated() - before; made > 0) recent_.emplace_back(now, made);
    forget_before(now - kRateWindowSeconds);  // bounded even if nobody reads the metrics
  }
}

}  // namespace hybrit
