// One vector per training record, for clustering: model-free (hashed character and word n-grams,
// TF-IDF weighted) or from a trained checkpoint (mean-pooled final hidden states). Both are
// L2-normalised, so squared distances and cosine similarities rank records alike.
#pragma once
#include <span>
#include <string>
#include <vector>

#include "core/comm.hpp"
#include "dispatch/dispatcher.hpp"

namespace hybrit {

// Scales a row of d values to unit length (a zero row stays zero).
void l2_normalise(float* row, int64_t d);

struct NgramEmbeddingOptions {
  int64_t dim = 1024;  // hashed feature buckets: the embedding's width
  // n-gram lengths, inclusive; a {0, 0} range turns that kind off. Character n-grams run over the
  // text lower-cased (ASCII) with whitespace runs folded to one space; words are runs of letters,
  // digits and non-ASCII bytes, lower-cased.
  int char_min = 3, char_max = 5;
  int word_min = 1, word_max = 2;
};

// (records, dim) f32. A bucket's value is (1 + ln count) * idf, idf = ln((1 + n) / (1 + df)) + 1
// with df the number of records in which the bucket occurs (scikit-learn's smooth idf); rows are
// L2-normalised (a record with no n-gram at all gets a zero row). The same records give the same
// rows on any thread count.
// The per-record loops run on `dispatcher`'s threads (Dispatcher::parallel_for).
// Over the ranks of a job (`comm` with several processes) `records` are this rank's share: the
// document frequencies are summed over the ranks (integers: exact), so each rank's rows are the
// rows one process gives those records, bit for bit.
Tensor embed_ngrams(Dispatcher& dispatcher, std::span<const std::string> records, const NgramEmbeddingOptions& options, Comm* comm = nullptr);

struct ModelEmbeddingOptions {
  std::string checkpoint;   // a training checkpoint (.h5)
  int64_t max_tokens = 512;  // tokens of a record that are embedded; the rest is cut (0: all)
  int64_t batch = 16;       // windows per forward pass
};

// (records, model dim) f32: each record is tokenized with the checkpoint's tokenizer, cut into
// windows of the model's context, run through the model (matmuls through `dispatcher`), and the
// final hidden states of all its tokens averaged, then L2-normalised.
// Each record's vector depends on that record alone, so ranks embed their shares independently.
Tensor embed_with_model(Dispatcher& dispatcher, std::span<const std::string> records, const ModelEmbeddingOptions& options);

}  // namespace hybrit
