// Training batches from token streams: a deterministic train/validation split by record, and
// batches that are a pure function of (seed, step), so a resumed run sees the same batches as one
// that never stopped.
#pragma once
#include <cstdint>
#include <vector>

#include "model/text.hpp"

namespace hybrit {

// Record r goes to validation when a uniform draw keyed by (seed, r) falls below val_fraction:
// the split depends on nothing else, so it is stable when records are appended. With
// val_fraction > 0 and at least two records, both sides get at least one record.
struct Split {
  std::vector<int32_t> train, val;  // token streams, records concatenated
  int64_t train_records = 0, val_records = 0;
};
Split split_by_record(const TokenizedCorpus& corpus, double val_fraction, uint64_t seed);

// Batch `step`: `batch` windows of context + 1 tokens at offsets drawn from (seed, step, row);
// inputs are the first `context` tokens of each window, targets the next-token shift.
// inputs and targets hold batch * context values each.
void draw_batch(const std::vector<int32_t>& stream, int64_t step, int batch, int context, uint64_t seed, int32_t* inputs,
                int32_t* targets);

}  // namespace hybrit
