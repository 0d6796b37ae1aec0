// The serving engine: requests queue up, are admitted while KV blocks are free, and every step
// batches all running sequences (continuous batching: sequences join and leave between steps),
// prefilling long prompts in chunks. When blocks run out, the newest running sequence is
// preempted (its blocks freed) and later recomputed from its tokens. Sequences stop at the
// end-of-record token, max_tokens, a stop string, the model's context, or cancellation; tokens
// stream out through a callback as they are made.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

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
  uint64_t seed = 0;
  void validate() const;    // one line naming the field, for any out-of-range value
};
// The next token from one row of logits; `history` is the prompt plus the output so far.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params, const std::vector<int32_t>& history, int64_t index);

enum class FinishReason { none, eos, length, stop, context, cancelled };
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
  KvCache::Stats kv;
};

class Engine {
 public:
  Engine(InferenceModel& model, const EngineOptions& options = {});

  // Queues a request; returns its id. Errors: empty prompt, a prompt longer than the context,
  // bad sampling values, a full queue (ErrorKind::unsupported, so servers can answer 429).
  int64_t submit(GenerationRequest request);
  // Ends a request at the next step (its final event says cancelled). Unknown ids are ignored.
  void cancel(int64_t request);
  // One step: admission, one forward pass over every running sequence, sampling, events.
  // Returns false when nothing is left to do.
  bool step();
  void run();  // steps until every request has finished
  bool idle() const { return running_.empty() && waiting_.empty(); }

  EngineStats stats() const;
  InferenceModel& model() { return model_; }

 private:
  struct Sequence {
    int64_t id = 0;
    GenerationRequest request;
    std::vector<int32_t> tokens;  // prompt then output
    int64_t prompt_len = 0, computed = 0;  // tokens whose K and V are in the cache
    std::vector<int32_t> blocks;
    std::vector<uint64_t> block_hashes;  // chained hash of the tokens up to each full block
    std::string text;              // output decoded so far
    size_t text_sent = 0;          // bytes of `text` already streamed
    bool cancelled = false;
  };
  bool admit(Sequence& s);
  bool ensure_blocks(Sequence& s, int64_t upto);
  void release(Sequence& s);
  void preempt_newest();
  void finish(Sequence& s, FinishReason why, int32_t token);
  void emit(Sequence& s, int32_t token, FinishReason why);

  InferenceModel& model_;
  EngineOptions options_;
  KvCache cache_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // admission order: the last is the newest
  int64_t next_id_ = 1;
  EngineStats stats_;
};

}  // namespace hybrit
