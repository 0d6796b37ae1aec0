// The serving engine: requests queue up, are admitted while KV blocks are free, and every step
// batches all running sequences (continuous batching: sequences join and leave between steps),
// prefilling long prompts in chunks. When blocks run out, the newest running sequence is
// preempted (its blocks freed) and later recomputed from its tokens. Sequences stop at the
// end-of-record token, max_tokens, a stop string or cancellation; tokens stream out through a
// callback as they are made. A sequence that outgrows the model's context slides its window: it
// keeps its last window_kept(context) tokens, recomputed at positions from 0 (the
// positions the model was trained on), so max_tokens means what it says at any length.
#pragma once
#include <cstdint>
#include <iterator>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/log.hpp"
#include "core/rng.hpp"
#include "inference/model.hpp"

namespace hybrit {

// Applied in this order to the next-token logits: repetition penalty (a logit of a token already
// in the prompt or output is divided by the penalty when positive, multiplied when negative),
// temperature (0: greedy, the rest is skipped), top-k (keep the k largest), top-p (keep the
// smallest set of most likely tokens whose probability reaches p), min-p (drop tokens below
// min_p times the top probability), then one draw from what is left, renormalised. The draw for
// output token i is a function of (seed, i) alone, so the same seed gives the same text whatever
// the batch, preemption or thread count.
struct SamplingParams {
  double temperature = 1.0;
  int64_t top_k = 0;        // 0: off
  double top_p = 1.0;       // 1: off
  double min_p = 0.0;       // 0: off
  double repetition_penalty = 1.0;  // 1: off
  uint64_t seed = 0;        // front ends put fresh_seed() here when the caller gives none
  void validate() const;    // one line naming the field, for any out-of-range value
};
// The seed of a request that names none, in every front end (CLI, Python, server): a fresh draw,
// so unseeded runs differ; the CLI prints it and Python returns it, so any text can be made again.
uint64_t fresh_seed();

// The next token from one row of logits; `history` is the prompt plus the output so far.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params, const std::vector<int32_t>& history, int64_t index);

// error: the engine failed (the message went to the log); every request then in it ends so.
// context is no longer produced (windows slide); it stays so saved outputs still parse.
enum class FinishReason { none, eos, length, stop, context, cancelled, error, count };
inline constexpr const char* kFinishReasonNames[] = {"none", "eos", "length", "stop", "context", "cancelled", "error"};
static_assert(std::size(kFinishReasonNames) == size_t(FinishReason::count), "one name per FinishReason");
const char* to_string(FinishReason r);

struct GenerationEvent {
  int64_t request = 0;
  int32_t token = -1;       // -1 on the final event when no token came with it
  std::string text;         // new text (whole UTF-8 characters only; held back until complete)
  FinishReason finished = FinishReason::none;
};

struct GenerationRequest {
  std::vector<int32_t> prompt;  // tokens; must not be empty
  int64_t max_tokens = 128;
  SamplingParams sampling;
  std::vector<std::string> stop;  // the output ends before the first of these
  std::function<void(const GenerationEvent&)> on_event;  // called from step(), on its thread
};

// Tokens a full window drops when it slides: a quarter of the context (at least 1), so the
// recomputation costs about 3 prompt tokens per generated token past the context, batched.
inline int64_t context_shift(int64_t context) { return std::max<int64_t>(1, context / 4); }
// What a slid window (or a prompt longer than the context) keeps: its last this many tokens.
inline int64_t window_kept(int64_t context) { return context - context_shift(context); }

struct EngineOptions {
  int64_t kv_blocks = 0;         // 0: enough for max_running sequences of the full context
  int64_t max_running = 16;      // sequences batched per step
  int64_t prefill_chunk = 256;   // prompt tokens computed per step (over all sequences)
  int64_t max_waiting = 1024;    // submit() refuses beyond this many queued requests
};

struct EngineStats {
  int64_t running = 0, waiting = 0, finished = 0, preemptions = 0, steps = 0;
  int64_t tokens_generated = 0, prompt_tokens_computed = 0, prompt_tokens_cached = 0;
  int64_t wasted_slots = 0;  // reserved but unfilled KV positions of the running sequences
  int64_t window_slides = 0;  // times a sequence outgrew the context and was recomputed from its last tokens
  KvCache::Stats kv;
};

class Engine {
 public:
  Engine(InferenceModel& model, const EngineOptions& options = {});

  // Queues a request; returns its id. Errors: empty prompt, bad token ids, bad sampling values,
  // a full queue (ErrorKind::unsupported, so servers can answer 429). A prompt longer than the
  // context keeps its last window_kept(context) tokens, with a warning.
  int64_t submit(GenerationRequest request);
  // Ends a request at the next step (its final event says cancelled). Unknown ids are ignored.
  void cancel(int64_t request);
  // One step: admission, one forward pass over every running sequence, sampling, events.
  // Returns false when nothing is left to do.
  bool step();
  void run();  // steps until every request has finished
  // Ends every waiting and running request now, with this reason, and frees their blocks.
  void finish_all(FinishReason why);
  bool idle() const { return running_.empty() && waiting_.empty(); }

  EngineStats stats() const;
  int64_t tokens_generated() const { return stats_.tokens_generated; }
  InferenceModel& model() { return model_; }

 private:
  struct Sequence {
    int64_t id = 0;
    GenerationRequest request;
    std::vector<int32_t> tokens;  // prompt then output: the whole history (repetition penalty, stops)
    int64_t prompt_len = 0;
    int64_t window_start = 0;     // tokens[window_start..] is what the model sees, from position 0
    int64_t computed = 0;         // window tokens whose K and V are in the cache
    const int32_t* window() const { return tokens.data() + window_start; }
    int64_t window_len() const { return int64_t(tokens.size()) - window_start; }
    std::vector<int32_t> blocks;
    std::vector<uint64_t> block_hashes;  // chained hash of the tokens up to each full block
    std::string text;              // output decoded so far
    size_t text_sent = 0;          // bytes of `text` already streamed
    bool cancelled = false;
  };
  void reuse_cached_prefix(Sequence& s);
  bool admit(Sequence& s);
  bool ensure_blocks(Sequence& s, int64_t upto);
  void release(Sequence& s);
  void preempt_newest();
  void finish(Sequence& s, FinishReason why, int32_t token);
  void emit(Sequence& s, int32_t token, FinishReason why);
  void slide(Sequence& s);

  InferenceModel& model_;
  EngineOptions options_;
  KvCache cache_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // admission order: the last is the newest
  int64_t next_id_ = 1;
  EngineStats stats_;
};

// An Engine stepping on a thread of its own, for servers: submit, cancel and stats may be called
// from any thread; events arrive on the engine's thread (keep on_event short: hand the event
// over and return). Callers get the engine between two steps: a waiting caller makes the loop
// pause after the current step, so submissions never starve behind a busy batch.
class BackgroundEngine {
 public:
  BackgroundEngine(InferenceModel& model, const EngineOptions& options = {});
  ~BackgroundEngine();  // cancels what is left (its requests get their final events) and joins

  int64_t submit(GenerationRequest request);  // Engine::submit's errors, or `shutting down`
  void cancel(int64_t request);
  // Cancels everything, waits until the final events are out, and stops taking requests.
  void shutdown();
  bool stopping() const { return stopping_.load(); }

  static constexpr double kRateWindowSeconds = 10;
  struct Snapshot {
    EngineStats engine;
    double tokens_per_second = 0;  // generated, over the last kRateWindowSeconds
    double uptime_seconds = 0;
  };
  Snapshot snapshot();

 private:
  // The engine between two steps; letting go wakes the loop (also when the caller throws).
  struct Turn {
    std::unique_lock<std::mutex> lock;
    std::condition_variable* wake;
    ~Turn() {
      if (lock.owns_lock()) lock.unlock();
      wake->notify_all();
    }
  };
  Turn take_turn();
  void loop();
  void forget_before(double seconds);

  Engine engine_;
  std::mutex mutex_;
  std::condition_variable wake_;  // work arrived, a caller is done, or shutting down
  std::atomic<int> callers_{0};   // threads waiting for mutex_; the loop lets them in first
  std::atomic<bool> stopping_{false};
  std::deque<std::pair<double, int64_t>> recent_;  // (seconds since start, tokens made in that step), within the window
  Timer clock_;
  std::thread thread_;
};

}  // namespace hybrit
