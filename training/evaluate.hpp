// Held-out evaluation of a checkpoint on text it did not train on (`hybrit eval`,
// hybrit.evaluate): the data is read as training reads it (records, each followed by the
// end-of-record token, concatenated), cut into non-overlapping windows of the model's context, and
// every token after the first is scored once by the model with the context its window gives it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dispatch/dispatcher.hpp"

namespace hybrit {

struct EvalOptions {
  std::string format = "auto";  // as data.format
  int64_t batch = 8;            // windows per forward pass
  int64_t max_tokens = 0;       // score at most this many tokens, from the start (0: all)
};

struct EvalResult {
  std::string checkpoint, tokenizer, read_as;  // read_as: how each data file was read (Corpus::describe)
  int64_t step = 0;                            // the checkpoint's training step
  int64_t records = 0, tokens = 0, bytes = 0, windows = 0, context = 0;  // tokens scored and the bytes they stand for
  double loss = 0;            // mean cross-entropy, nats per token
  double bits_per_token = 0;  // loss / ln 2
  double bits_per_byte = 0;   // total bits / bytes: comparable across tokenizers
  double perplexity = 0;      // exp(loss)
  nlohmann::json to_json() const;
  std::string to_text() const;  // the lines `hybrit eval` prints
};

EvalResult evaluate_checkpoint(Dispatcher& dispatcher, const std::string& checkpoint, const std::vector<std::string>& data, const EvalOptions& options = {});

}  // namespace hybrit
