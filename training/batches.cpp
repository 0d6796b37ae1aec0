#include "training/batches.hpp"

#include <algorithm>

#include "core/error.hpp"
#include "core/rng.hpp"

namespace hybrit {

namespace {
// Streams of the counter-based generator, so the split and the batches never share draws.
constexpr uint64_t kSplitStream = 0x53504c4954ull;  // "SPLIT"
constexpr uint64_t kBatchStream = 0x4241544348ull;  // "BATCH"
}  // namespace

Split split_by_record(const TokenizedCorpus& corpus, double val_fraction, uint64_t seed) {
  if (!(val_fraction >= 0.0 && val_fraction < 1.0))
    fail(ErrorKind::invalid_argument, "val_fraction: expected a number in [0, 1), got ", val_fraction);
  const int64_t n = corpus.records();
  const Rng rng(seed, kSplitStream);
  std::vector<double> draw(static_cast<size_t>(n));
  std::vector<char> is_val(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    draw[r] = double(rng.block(uint64_t(r))[0]) * 0x1p-32;
    is_val[r] = draw[r] < val_fraction;
  }
  const int64_t val_count = std::count(is_val.begin(), is_val.end(), 1);
  if (val_fraction > 0 && n >= 2 && val_count == 0) is_val[std::min_element(draw.begin(), draw.end()) - draw.begin()] = 1;
  if (n >= 2 && val_count == n) is_val[std::max_element(draw.begin(), draw.end()) - draw.begin()] = 0;
  Split s;
  for (int64_t r = 0; r < n; ++r) {
    auto& stream = is_val[r] ? s.val : s.train;
    stream.insert(stream.end(), corpus.tokens.begin() + corpus.record_offsets[r], corpus.tokens.begin() + corpus.record_offsets[r + 1]);
    (is_val[r] ? s.val_records : s.train_records) += 1;
  }
  return s;
}

void draw_batch(const std::vector<int32_t>& stream, int64_t step, int batch, int context, uint64_t seed, int32_t* inputs,
                int32_t* targets) {
  if (batch <= 0 || context <= 0) fail(ErrorKind::invalid_argument, "draw_batch: batch and context must be positive, got ", batch, " and ", context);
  if (int64_t(stream.size()) < int64_t(context) + 1)
    fail(ErrorKind::invalid_argument, "the token stream holds ", stream.size(), " tokens, fewer than context + 1 = ", context + 1);
  const uint64_t starts = uint64_t(stream.size()) - uint64_t(context);  // offsets 0 .. size - context - 1
  const Rng rng(seed, kBatchStream);
  for (int row = 0; row < batch; ++row) {
    const auto b = rng.block(uint64_t(step) * uint64_t(batch) + uint64_t(row));
    const uint64_t r64 = (uint64_t(b[0]) << 32) | b[1];
    const uint64_t offset = uint64_t((unsigned __int128)r64 * starts >> 64);
    std::copy_n(stream.begin() + int64_t(offset), context, inputs + int64_t(row) * context);
    std::copy_n(stream.begin() + int64_t(offset) + 1, context, targets + int64_t(row) * context);
  }
}

}  // namespace hybrit
