#include "training/evaluate.hpp"

#include <algorithm>
#include <cmath>

#include "core/log.hpp"
#include "model/checkpoint.hpp"
#include "model/text.hpp"

namespace hybrit {

EvalResult evaluate_checkpoint(Dispatcher& dispatcher, const std::string& checkpoint, const std::vector<std::string>& data, const EvalOptions& o) {
  if (o.batch < 1) fail_field("batch", "expected an integer >= 1, got ", o.batch);
  if (o.max_tokens < 0) fail_field("max_tokens", "expected an integer >= 0 (0: all), got ", o.max_tokens);
  CheckpointModel cm = load_checkpoint_model(dispatcher, checkpoint);
  const Corpus corpus = read_corpus(data, o.format);
  const TokenizedCorpus tokens = tokenize(corpus, *cm.tokenizer);
  const int64_t context = cm.config.model.context;
  EvalResult r;
  r.checkpoint = checkpoint, r.tokenizer = cm.tokenizer->kind(), r.read_as = corpus.describe(), r.step = cm.meta.step;
  r.records = tokens.records(), r.context = context;
  // Token i + 1 is scored from tokens up to i: `scored` targets in all.
  int64_t scored = int64_t(tokens.tokens.size()) - 1;
  if (o.max_tokens > 0) scored = std::min(scored, o.max_tokens);
  if (scored < 1) fail(ErrorKind::invalid_argument, "eval: the data gives ", tokens.tokens.size(), " tokens; at least 2 are needed. Read as: ", r.read_as);
  const int32_t* stream = tokens.tokens.data();
  const int64_t full = scored / context, tail = scored % context;
  double nats = 0;
  ProgressBar bar("eval", full + (tail > 0));
  std::vector<int32_t> inputs, targets;
  for (int64_t w = 0; w < full; w += o.batch) {
    const int64_t n = std::min(o.batch, full - w);
    inputs.assign(stream + w * context, stream + (w + n) * context);
    targets.assign(stream + w * context + 1, stream + (w + n) * context + 1);
    nats += cm.model->forward(inputs.data(), targets.data(), n, context) * double(n * context);
    bar.update(w + n);
  }
  if (tail > 0) {  // the last, shorter window
    inputs.assign(stream + full * context, stream + full * context + tail);
    targets.assign(stream + full * context + 1, stream + full * context + tail + 1);
    nats += cm.model->forward(inputs.data(), targets.data(), 1, tail) * double(tail);
    bar.update(full + 1);
  }
  bar.finish();
  r.windows = full + (tail > 0);
  r.tokens = scored;
  r.bytes = int64_t(cm.tokenizer->decode(stream + 1, size_t(scored)).size());
  r.loss = nats / double(scored);
  r.bits_per_token = r.loss / std::log(2.0);
  r.bits_per_byte = nats / std::log(2.0) / double(std::max<int64_t>(1, r.bytes));
  r.perplexity = std::exp(r.loss);
  return r;
}

nlohmann::json EvalResult::to_json() const {
  return {{"checkpoint", checkpoint}, {"step", step}, {"tokenizer", tokenizer}, {"read_as", read_as}, {"records", records},
          {"tokens", tokens}, {"bytes", bytes}, {"windows", windows}, {"context", context}, {"loss", loss},
          {"bits_per_token", bits_per_token}, {"bits_per_byte", bits_per_byte}, {"perplexity", perplexity}};
}

std::string EvalResult::to_text() const {
  char numbers[256];
  std::snprintf(numbers, sizeof numbers, "loss        %.4f nats per token\nbits        %.4f per token, %.4f per byte\nperplexity  %.3f\n", loss,
                bits_per_token, bits_per_byte, perplexity);
  return cat("checkpoint  ", checkpoint, " (step ", step, ", ", tokenizer, " tokens)\ndata        ", read_as, "\nscored      ", tokens, " tokens (",
             bytes, " bytes) in ", windows, windows == 1 ? " window" : " windows", " of up to ", context, "\n", numbers);
}

}  // namespace hybrit
