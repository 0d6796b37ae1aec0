#include "clustering/embed.hpp"


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "core/hash.hpp"
#include "core/log.hpp"
#include "model/checkpoint.hpp"

namespace hybrit {

namespace {

constexpr uint64_t kCharTag = 0x63686172ull, kWordTag = 0x776f7264ull;  // keeps "ab" the word and "ab" the characters apart

bool is_word_byte(unsigned char c) { return c >= 0x80 || std::isalnum(c); }
char lower(unsigned char c) { return c < 0x80 ? char(std::tolower(c)) : char(c); }

// The buckets of one record's n-grams (with repeats), into `out`.
void ngram_buckets(const std::string& record, const NgramEmbeddingOptions& o, std::vector<uint32_t>& out, std::string& text,
                   std::vector<std::string_view>& words) {
  out.clear();
  auto add = [&](const char* p, size_t n, uint64_t tag) {
    const uint64_t h = fnv1a64(p, n, kFnv1aOffset ^ tag);
    out.push_back(uint32_t((h ^ (h >> 32)) % uint64_t(o.dim)));
  };
  // Lower-cased, whitespace runs folded, padded with a space on each side so n-grams see word edges.
  text.assign(1, ' ');
  for (unsigned char c : record) {
    if (std::isspace(c)) {
      if (text.back() != ' ') text += ' ';
    } else {
      text += lower(c);
    }
  }
  if (text.back() != ' ') text += ' ';
  if (o.char_max > 0)
    for (int n = o.char_min; n <= o.char_max; ++n)
      for (size_t i = 0; i + size_t(n) <= text.size(); ++i) add(text.data() + i, size_t(n), kCharTag);
  if (o.word_max > 0) {
    words.clear();
    for (size_t i = 0; i < text.size();) {
      if (!is_word_byte(static_cast<unsigned char>(text[i]))) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < text.size() && is_word_byte(static_cast<unsigned char>(text[j]))) ++j;
      words.emplace_back(text.data() + i, j - i);
      i = j;
    }
    std::string gram;
    for (int n = o.word_min; n <= o.word_max; ++n)
      for (size_t i = 0; i + size_t(n) <= words.size(); ++i) {
        gram.clear();
        for (int w = 0; w < n; ++w) (gram += words[i + size_t(w)]) += ' ';
        add(gram.data(), gram.size(), kWordTag);
      }
  }
  std::sort(out.begin(), out.end());
}

// Records in blocks, each block in parallel, the progress bar between blocks (drawn by one thread).
template <class Body>
void for_records_with_progress(Dispatcher& d, const char* label, int64_t n, const Body& body) {
  ProgressBar bar(label, n);
  constexpr int64_t kBlock = 2048, kPiece = 16;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    d.parallel_for(end - start, kPiece, [&](int64_t r0, int64_t r1) {
      for (int64_t r = start + r0; r < start + r1; ++r) body(r);
    });
    bar.update(end);
  }
  bar.finish();
}

}  // namespace

void l2_normalise(float* row, int64_t d) {
  double ss = 0;
  for (int64_t j = 0; j < d; ++j) ss += double(row[j]) * row[j];
  if (ss <= 0) return;
  const float inv = float(1.0 / std::sqrt(ss));
  for (int64_t j = 0; j < d; ++j) row[j] *= inv;
}

Tensor embed_ngrams(Dispatcher& dispatcher, std::span<const std::string> records, const NgramEmbeddingOptions& o, Comm* comm) {
  if (comm && !comm->distributed()) comm = nullptr;
  if (records.empty() && !comm) fail(ErrorKind::invalid_argument, "embedding: no records");
  if (o.dim < 1 || o.dim > (int64_t(1) << 24)) fail(ErrorKind::invalid_argument, "embedding.dim: expected 1 to 16777216, got ", o.dim);
  auto check_range = [](const char* key, int lo, int hi) {
    if (lo == 0 && hi == 0) return;
    if (lo < 1 || hi < lo || hi > 16) fail(ErrorKind::invalid_argument, "embedding.", key, ": expected [min, max] with 1 <= min <= max <= 16 (or [0, 0] for none), got [", lo, ", ", hi, "]");
  };
  check_range("char_ngrams", o.char_min, o.char_max);
  check_range("word_ngrams", o.word_min, o.word_max);
  if (o.char_max == 0 && o.word_max == 0) fail(ErrorKind::invalid_argument, "embedding: char_ngrams and word_ngrams are both off: no features");

  const int64_t n = int64_t(records.size()), d = o.dim;
  struct Scratch {
    std::vector<uint32_t> buckets;
    std::string text;
    std::vector<std::string_view> words;
  };
  // Pass 1: document frequencies. Integer counts, so the sum is the same in any order.
  std::vector<std::atomic<int64_t>> df(static_cast<size_t>(d));
  for_records_with_progress(dispatcher, "n-gram df", n, [&](int64_t r) {
    thread_local Scratch s;
    ngram_buckets(records[size_t(r)], o, s.buckets, s.text, s.words);
    for (size_t i = 0; i < s.buckets.size(); ++i)
      if (i == 0 || s.buckets[i] != s.buckets[i - 1]) df[s.buckets[i]].fetch_add(1, std::memory_order_relaxed);
  });
  // Over ranks, the whole corpus's frequencies and record count.
  std::vector<int64_t> df_all(static_cast<size_t>(d) + 1);
  for (int64_t j = 0; j < d; ++j) df_all[size_t(j)] = df[size_t(j)].load();
  df_all[size_t(d)] = n;
  if (comm) comm->allreduce_sum(df_all.data(), d + 1);
  const int64_t records_all = df_all[size_t(d)];
  if (records_all == 0) fail(ErrorKind::invalid_argument, "embedding: no records");
  std::vector<float> idf(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) idf[size_t(j)] = float(std::log((1.0 + double(records_all)) / (1.0 + double(df_all[size_t(j)]))) + 1.0);

  // Pass 2: the rows (hashing again costs less than keeping every record's n-grams).
  Tensor out = Tensor::zeros({n, d}, DType::f32);
  float* base = out.data<float>();
  for_records_with_progress(dispatcher, "n-gram embed", n, [&](int64_t r) {
    thread_local Scratch s;
    ngram_buckets(records[size_t(r)], o, s.buckets, s.text, s.words);
    float* row = base + r * d;
    for (size_t i = 0; i < s.buckets.size();) {
      size_t j = i;
      while (j < s.buckets.size() && s.buckets[j] == s.buckets[i]) ++j;
      row[s.buckets[i]] = float(1.0 + std::log(double(j - i))) * idf[s.buckets[i]];
      i = j;
    }
    l2_normalise(row, d);
  });
  return out;
}

Tensor embed_with_model(Dispatcher& dispatcher, std::span<const std::string> records, const ModelEmbeddingOptions& o) {
  if (records.empty()) fail(ErrorKind::invalid_argument, "embedding: no records");
  if (o.checkpoint.empty()) fail(ErrorKind::invalid_argument, "embedding.checkpoint: the model embedding needs a training checkpoint (.h5)");
  if (o.max_tokens < 0) fail(ErrorKind::invalid_argument, "embedding.max_tokens: expected >= 0, got ", o.max_tokens);
  if (o.batch < 1) fail(ErrorKind::invalid_argument, "embedding.batch: expected >= 1, got ", o.batch);
  CheckpointModel cm = load_checkpoint_model(dispatcher, o.checkpoint);
  Model& model = *cm.model;
  const int64_t n = int64_t(records.size()), D = model.config().dim, context = model.config().context;

  // Every record's windows: consecutive pieces of at most `context` tokens. Windows of equal
  // length share a forward pass (most are full length), so no padding enters any state.
  struct Window {
    int64_t record;
    std::vector<int32_t> tokens;
  };
  std::vector<Window> windows;
  std::vector<int64_t> tokens_of(static_cast<size_t>(n), 0);
  std::vector<int32_t> ids;
  for (int64_t r = 0; r < n; ++r) {
    ids.clear();
    cm.tokenizer->encode(records[size_t(r)], ids);
    if (o.max_tokens > 0 && int64_t(ids.size()) > o.max_tokens) ids.resize(size_t(o.max_tokens));
    if (ids.empty()) ids.push_back(cm.tokenizer->end_of_record());  // an empty record still gets a vector
    tokens_of[size_t(r)] = int64_t(ids.size());
    for (size_t at = 0; at < ids.size(); at += size_t(context))
      windows.push_back({r, std::vector<int32_t>(ids.begin() + int64_t(at), ids.begin() + int64_t(std::min(ids.size(), at + size_t(context))))});
  }
  std::stable_sort(windows.begin(), windows.end(), [](const Window& a, const Window& b) { return a.tokens.size() > b.tokens.size(); });

  std::vector<double> sums(static_cast<size_t>(n * D), 0.0);
  ProgressBar bar("model embed", int64_t(windows.size()));
  std::vector<int32_t> batch_tokens;
  for (size_t start = 0; start < windows.size();) {
    const size_t len = windows[start].tokens.size();
    size_t end = start;
    while (end < windows.size() && end - start < size_t(o.batch) && windows[end].tokens.size() == len) ++end;
    batch_tokens.clear();
    for (size_t w = start; w < end; ++w) batch_tokens.insert(batch_tokens.end(), windows[w].tokens.begin(), windows[w].tokens.end());
    model.forward(batch_tokens.data(), batch_tokens.data(), int64_t(end - start), int64_t(len));  // targets unused: any valid ids
    const float* h = model.final_hidden().data<float>();
    for (size_t w = start; w < end; ++w) {
      double* sum = sums.data() + windows[w].record * D;
      for (size_t t = 0; t < len; ++t) {
        const float* row = h + ((w - start) * len + t) * size_t(D);
        for (int64_t j = 0; j < D; ++j) sum[j] += row[j];
      }
    }
    start = end;
    bar.update(int64_t(end));
  }
  bar.finish();
  Tensor out = Tensor::empty({n, D}, DType::f32);
  for (int64_t r = 0; r < n; ++r) {
    float* row = out.data<float>() + r * D;
    for (int64_t j = 0; j < D; ++j) row[j] = float(sums[size_t(r * D + j)] / double(tokens_of[size_t(r)]));
    l2_normalise(row, D);
  }
  return out;
}

}  // namespace hybrit
