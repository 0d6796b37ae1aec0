#include "clustering/reduce.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <span>
#include <sstream>

#include "core/comm.hpp"
#include "core/log.hpp"
#include "core/rng.hpp"
#include "dispatch/report.hpp"
#include "model/text.hpp"
#include "core/file.hpp"
#include "core/names.hpp"
#include "core/yaml_schema.hpp"

namespace fs = std::filesystem;

namespace hybrit {

namespace {
const char* const kStrategyNames[] = {"nearest", "balanced", "semdedup", "hard", "random"};  // in enum order
static_assert(sizeof(kStrategyNames) / sizeof(kStrategyNames[0]) == kReduceStrategyCount, "one name per strategy");
}  // namespace

const char* to_string(ReduceStrategy s) { return kStrategyNames[int(s)]; }

ReduceStrategy parse_reduce_strategy(const std::string& name, const std::string& what) { return parse_name<ReduceStrategy>(kStrategyNames, name, what); }

int64_t default_cluster_count(int64_t records) { return std::max<int64_t>(1, std::llround(std::sqrt(double(records)))); }

namespace {

constexpr uint64_t kBalancedStream = 0x62616cull, kRandomStream = 0x726e64ull;

// The first `count` of `items` become a uniform random draw without replacement (a partial
// Fisher-Yates shuffle); the draw depends only on the rng and the items' order.
void draw_prefix(std::vector<int64_t>& items, int64_t count, Rng& rng) {
  const int64_t n = int64_t(items.size());
  for (int64_t i = 0; i < count; ++i) std::swap(items[size_t(i)], items[size_t(i + int64_t(rng.below(uint64_t(n - i))))]);
}

// The number of records a target asks for, checked.
int64_t target_count(const SelectOptions& o, int64_t n) {
  if (!(o.report_eps >= 0 && o.report_eps <= 2)) fail(ErrorKind::invalid_argument, "reduce.report_eps: expected a number in [0, 2], got ", o.report_eps);
  const int given = int(o.fraction.has_value()) + int(o.count.has_value()) + int(o.eps.has_value());
  if (given != 1)
    fail(ErrorKind::invalid_argument, "reduce: give exactly one of fraction, count", o.strategy == ReduceStrategy::semdedup ? " or eps" : "",
         given ? " (got several)" : " (got none)");
  if (o.eps && o.strategy != ReduceStrategy::semdedup)
    fail(ErrorKind::invalid_argument, "reduce.eps: only the semdedup strategy keeps by a threshold; ", to_string(o.strategy), " needs fraction or count");
  if (o.fraction) {
    if (!(*o.fraction > 0 && *o.fraction <= 1)) fail(ErrorKind::invalid_argument, "reduce.fraction: expected a number in (0, 1], got ", *o.fraction);
    return std::max<int64_t>(1, std::llround(*o.fraction * double(n)));
  }
  if (o.count) {
    if (*o.count < 1 || *o.count > n) fail(ErrorKind::invalid_argument, "reduce.count: expected 1 to ", n, " (the records there are), got ", *o.count);
    return *o.count;
  }
  if (!(*o.eps >= 0 && *o.eps <= 2)) fail(ErrorKind::invalid_argument, "reduce.eps: expected a number in [0, 2], got ", *o.eps);
  return -1;
}

// Each cluster's share of `target` in proportion to its size; the leftover records go to the
// largest remainders (ties to the lower cluster index).
std::vector<int64_t> proportional_quota(const std::vector<int64_t>& sizes, int64_t n, int64_t target) {
  std::vector<int64_t> quota(sizes.size());
  std::vector<std::pair<double, size_t>> remainders;
  int64_t given = 0;
  for (size_t c = 0; c < sizes.size(); ++c) {
    const double exact = double(target) * double(sizes[c]) / double(n);
    quota[c] = std::min<int64_t>(sizes[c], int64_t(std::floor(exact)));
    given += quota[c];
    remainders.push_back({exact - double(quota[c]), c});
  }
  std::stable_sort(remainders.begin(), remainders.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = 0; given < target; i = (i + 1) % remainders.size())
    if (quota[remainders[i].second] < sizes[remainders[i].second]) ++quota[remainders[i].second], ++given;
  return quota;
}

// The same quota for every cluster (water-filling: clusters smaller than the level give all they
// have); what is left after the level goes one each to the largest clusters.
std::vector<int64_t> balanced_quota(const std::vector<int64_t>& sizes, int64_t target) {
  std::vector<int64_t> quota(sizes.size(), 0);
  int64_t given = 0;
  // Raise the level one record at a time would be O(target); raise it to the next cluster size instead.
  std::vector<int64_t> sorted = sizes;
  std::sort(sorted.begin(), sorted.end());
  int64_t level = 0, below = 0;  // below: records in clusters smaller than the level
  size_t i = 0;
  for (;;) {
    while (i < sorted.size() && sorted[i] <= level) below += sorted[i++];
    const int64_t open = int64_t(sorted.size() - i);
    if (open == 0) break;
    const int64_t next = sorted[i];
    if (below + open * next >= target) {
      level = (target - below) / open;  // the full level every open cluster gets
      break;
    }
    level = next;
  }
  for (size_t c = 0; c < sizes.size(); ++c) given += (quota[c] = std::min(sizes[c], level));
  std::vector<size_t> order(sizes.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return sizes[a] > sizes[b]; });
  for (size_t j = 0; given < target; j = (j + 1) % order.size())
    if (quota[order[j]] < sizes[order[j]]) ++quota[order[j]], ++given;
  return quota;
}

}  // namespace

namespace {

// Which rank scores each cluster's near-duplicates: the largest pieces of work (size^2) first,
// each to the rank with the least so far (ties to the lower rank).
std::vector<int> duplicate_score_owners(const std::vector<std::vector<int64_t>>& members, int ranks) {
  std::vector<size_t> order(members.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return members[a].size() > members[b].size(); });
  std::vector<double> load(static_cast<size_t>(ranks), 0.0);
  std::vector<int> owner(members.size(), 0);
  for (size_t c : order) {
    const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
    owner[c] = r;
    load[size_t(r)] += double(members[c].size()) * double(members[c].size());
  }
  return owner;
}

}  // namespace

Selection select_records(Dispatcher& dispatcher, const Tensor& x, const KMeansResult& clusters, const SelectOptions& o, Comm* comm) {
  if (comm && !comm->distributed()) comm = nullptr;
  if (x.dtype() != DType::f32 || x.shape().size() != 2) fail(ErrorKind::invalid_argument, "select_records: embeddings must be a 2-d f32 array, got ", shape_str(x.shape()));
  const int ranks = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  const std::vector<int64_t> offsets = row_offsets(comm, x.shape()[0]);
  const int64_t n = offsets.back(), d = x.shape()[1], first = offsets[size_t(rank)], local = x.shape()[0];
  if (n < 1 || d < 1) fail(ErrorKind::invalid_argument, "select_records: no records or no features (", shape_str({n, d}), ")");
  const int64_t target = target_count(o, n);
  Selection s;
  s.cluster.assign(size_t(n), 0);
  s.distance.assign(size_t(n), 0.0f);
  s.dup_score.assign(size_t(n), -1.0f);

  if (o.strategy == ReduceStrategy::random) {
    std::vector<int64_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), int64_t(0));
    Rng rng(o.seed, kRandomStream);
    draw_prefix(all, target, rng);
    s.kept.assign(all.begin(), all.begin() + target);
    std::sort(s.kept.begin(), s.kept.end());
    s.cluster_size = {n}, s.cluster_kept = {target}, s.cluster_near_duplicates = {0};
    return s;
  }

  const int64_t k = clusters.centroids.shape().empty() ? 0 : clusters.centroids.shape()[0];
  if (k < 1 || clusters.centroids.shape().size() != 2 || clusters.centroids.shape()[1] != d || clusters.labels.numel() != local)
    fail(ErrorKind::invalid_argument, "select_records: the clustering (centroids ", shape_str(clusters.centroids.shape()), ", ", clusters.labels.numel(),
         " labels) does not match the embeddings ", shape_str(x.shape()));
  const float* xp = x.data<float>();
  const float* cp = clusters.centroids.data<float>();
  // Every record's cluster and distance to its centroid, on every rank (each rank fills in its
  // own records and adds zeros to the others': exact).
  std::vector<int64_t> label_of(static_cast<size_t>(n), 0);
  const int32_t* local_labels = clusters.labels.data<int32_t>();
  for (int64_t i = 0; i < local; ++i) {
    const int32_t c = local_labels[i];
    if (c < 0 || c >= k) fail(ErrorKind::invalid_argument, "select_records: label ", c, " of record ", first + i, " is outside [0, ", k, ")");
    label_of[size_t(first + i)] = c;
    double dist = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double diff = double(xp[i * d + j]) - cp[c * d + j];
      dist += diff * diff;
    }
    s.distance[size_t(first + i)] = float(dist);
  }
  if (comm) {
    comm->allreduce_sum(label_of.data(), n);
    comm->allreduce_sum(s.distance.data(), n);
  }
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(k));
  for (int64_t i = 0; i < n; ++i) {
    s.cluster[size_t(i)] = int32_t(label_of[size_t(i)]);
    members[size_t(label_of[size_t(i)])].push_back(i);
  }
  // Within each cluster: farthest from the centroid first (ties by record index).
  for (auto& m : members)
    std::stable_sort(m.begin(), m.end(), [&](int64_t a, int64_t b) { return s.distance[size_t(a)] > s.distance[size_t(b)]; });

  // Duplicate scores: cosine similarities of unit rows, a block of rows against every row before
  // it in the cluster's order, through the dispatcher's matmul. Over ranks each cluster is scored
  // by one rank (duplicate_score_owners), which first receives its members' rows from the ranks
  // holding them: each rank sends, per destination, its rows of that rank's clusters in cluster
  // order and member order, and the receiver walks the same order to place them.
  const std::vector<int> owner = duplicate_score_owners(members, ranks);
  auto holder = [&](int64_t record) { return int(std::upper_bound(offsets.begin(), offsets.end(), record) - offsets.begin()) - 1; };
  std::vector<float> received;
  std::vector<int64_t> next_from;  // where each rank's rows start in `received`, then its next row (in floats)
  if (comm) {
    std::vector<std::vector<float>> to(static_cast<size_t>(ranks));
    for (int64_t c = 0; c < k; ++c) {
      if (members[size_t(c)].size() < 2) continue;
      auto& piece = to[size_t(owner[size_t(c)])];
      for (int64_t i : members[size_t(c)])
        if (i >= first && i < first + local) piece.insert(piece.end(), xp + (i - first) * d, xp + (i - first + 1) * d);
    }
    received = comm->exchange(to, next_from);
  }
  constexpr int64_t kBlock = 512;
  int64_t mine = 0;
  for (int64_t c = 0; c < k; ++c)
    if (owner[size_t(c)] == rank && members[size_t(c)].size() >= 2) mine += int64_t(members[size_t(c)].size());
  ProgressBar bar("near-duplicates", mine);
  int64_t scored = 0;
  std::vector<float> dup_mine(static_cast<size_t>(n), 0.0f);  // this rank's scores; zeros elsewhere
  for (int64_t c = 0; c < k; ++c) {
    const auto& m = members[size_t(c)];
    const int64_t size = int64_t(m.size());
    if (size < 2 || owner[size_t(c)] != rank) continue;
    Tensor unit = Tensor::empty({size, d}, DType::f32);
    for (int64_t r = 0; r < size; ++r) {
      float* row = unit.data<float>() + r * d;
      const int64_t i = m[size_t(r)];
      if (!comm) {
        std::memcpy(row, xp + i * d, size_t(d) * sizeof(float));
      } else {
        int64_t& at = next_from[size_t(holder(i))];
        std::memcpy(row, received.data() + at, size_t(d) * sizeof(float));
        at += d;
      }
      l2_normalise(row, d);
    }
    for (int64_t b0 = 0; b0 < size; b0 += kBlock) {
      const int64_t b1 = std::min(size, b0 + kBlock);
      Tensor sims = Tensor::empty({b1 - b0, b1}, DType::f32);
      dispatcher.matmul(unit.rows(b0, b1), unit.rows(0, b1), sims, {false, true, 1.0f, 0.0f});
      for (int64_t r = b0; r < b1; ++r) {
        const float* row = sims.data<float>() + (r - b0) * b1;
        float best = -1.0f;
        for (int64_t i = 0; i < r; ++i) best = std::max(best, row[i]);
        dup_mine[size_t(m[size_t(r)])] = std::min(best, 1.0f);
      }
      bar.update(scored + b1);
    }
    scored += size;
  }
  bar.finish();
  if (comm) comm->allreduce_sum(dup_mine.data(), n);
  for (int64_t c = 0; c < k; ++c)
    if (members[size_t(c)].size() >= 2)
      for (int64_t i : members[size_t(c)]) s.dup_score[size_t(i)] = dup_mine[size_t(i)];

  std::vector<int64_t> sizes(static_cast<size_t>(k));
  for (int64_t c = 0; c < k; ++c) sizes[size_t(c)] = int64_t(members[size_t(c)].size());
  std::vector<char> keep(static_cast<size_t>(n), 0);
  switch (o.strategy) {
    case ReduceStrategy::nearest:
    case ReduceStrategy::hard: {
      const std::vector<int64_t> quota = proportional_quota(sizes, n, target);
      for (int64_t c = 0; c < k; ++c) {
        const auto& m = members[size_t(c)];  // farthest first
        for (int64_t i = 0; i < quota[size_t(c)]; ++i)
          keep[size_t(o.strategy == ReduceStrategy::hard ? m[size_t(i)] : m[m.size() - 1 - size_t(i)])] = 1;
      }
      break;
    }
    case ReduceStrategy::balanced: {
      const std::vector<int64_t> quota = balanced_quota(sizes, target);
      for (int64_t c = 0; c < k; ++c) {
        std::vector<int64_t> m = members[size_t(c)];
        std::sort(m.begin(), m.end());
        Rng rng(o.seed, kBalancedStream + uint64_t(c));
        draw_prefix(m, quota[size_t(c)], rng);
        for (int64_t i = 0; i < quota[size_t(c)]; ++i) keep[size_t(m[size_t(i)])] = 1;
      }
      break;
    }
    case ReduceStrategy::semdedup: {
      if (o.eps) {
        s.eps_used = *o.eps;
        for (int64_t i = 0; i < n; ++i) keep[size_t(i)] = s.dup_score[size_t(i)] <= float(1.0 - *o.eps);
      } else {
        std::vector<int64_t> order(static_cast<size_t>(n));
        std::iota(order.begin(), order.end(), int64_t(0));
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s.dup_score[size_t(a)] < s.dup_score[size_t(b)]; });
        for (int64_t i = 0; i < target; ++i) keep[size_t(order[size_t(i)])] = 1;
        // The threshold that amounts to: the lowest score that went (or nothing went: eps 0).
        s.eps_used = target < n ? 1.0 - double(s.dup_score[size_t(order[size_t(target)])]) : 0.0;
      }
      break;
    }
    case ReduceStrategy::random: break;  // handled above
  }

  const double dup_eps = o.strategy == ReduceStrategy::semdedup ? s.eps_used : o.report_eps;
  s.cluster_kept.assign(size_t(k), 0);
  s.cluster_near_duplicates.assign(size_t(k), 0);
  s.cluster_size = sizes;
  for (int64_t i = 0; i < n; ++i) {
    const bool dup = s.dup_score[size_t(i)] > float(1.0 - dup_eps);
    s.near_duplicates += dup;
    s.cluster_near_duplicates[size_t(s.cluster[size_t(i)])] += dup;
    if (keep[size_t(i)]) {
      s.kept.push_back(i);
      ++s.cluster_kept[size_t(s.cluster[size_t(i)])];
    } else {
      s.near_duplicates_removed += dup;
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Config

ReduceConfig parse_reduce_config(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets) {
  using namespace schema;
  Origins o;
  const YAML::Node root = load_yaml(yaml_text, file_name, sets, o);
  ReduceConfig c;
  c.source = file_name;
  c.kmeans.spherical = true;   // unit embeddings: cosine k-means
  c.kmeans.max_iter = 100;
  bool have_strategy = false;
  auto range = [&](const YAML::Node& n, const std::string& k, int& lo, int& hi) {
    if (!n.IsSequence() || n.size() != 2) bad(o.where(n, k), k, cat("expected [min, max], got ", scalar_text(n)));
    lo = int(as_int(n[0], k, o, 0)), hi = int(as_int(n[1], k, o, 0));
    if (!((lo == 0 && hi == 0) || (lo >= 1 && lo <= hi && hi <= 16)))
      bad(o.where(n, k), k, cat("expected 1 <= min <= max <= 16, or [0, 0] for none, got [", lo, ", ", hi, "]"));
  };
  walk(root, "", o, {
    {"seed", [&](const YAML::Node& n, const std::string& k) { c.seed = uint64_t(as_int(n, k, o, 0)); }},
    {"data", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"sources", [&](const YAML::Node& n, const std::string& k) { c.sources = as_path_list(n, k, o); }},
         {"format", [&](const YAML::Node& n, const std::string& k) { c.format = as_choice(n, k, o, corpus_format_choices()); }},
       });
     }},
    {"embedding", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"kind", [&](const YAML::Node& n, const std::string& k) {
            c.embedding = as_choice(n, k, o, {"ngram", "model"}) == "ngram" ? ReduceConfig::Embedding::ngram : ReduceConfig::Embedding::model;
          }},
         {"dim", [&](const YAML::Node& n, const std::string& k) {
            c.ngram.dim = as_int(n, k, o, 1);
            if (c.ngram.dim > (int64_t(1) << 24)) bad(o.where(n, k), k, cat("expected at most 16777216, got ", c.ngram.dim));
          }},
         {"char_ngrams", [&](const YAML::Node& n, const std::string& k) { range(n, k, c.ngram.char_min, c.ngram.char_max); }},
         {"word_ngrams", [&](const YAML::Node& n, const std::string& k) { range(n, k, c.ngram.word_min, c.ngram.word_max); }},
         {"checkpoint", [&](const YAML::Node& n, const std::string& k) {
            c.model.checkpoint = as_string(n, k, o);
            std::error_code ec;
            if (!fs::is_regular_file(c.model.checkpoint, ec)) bad(o.where(n, k), k, cat("no such file: ", c.model.checkpoint));
          }},
         {"max_tokens", [&](const YAML::Node& n, const std::string& k) { c.model.max_tokens = as_int(n, k, o, 0); }},
         {"batch", [&](const YAML::Node& n, const std::string& k) { c.model.batch = as_int(n, k, o, 1); }},
       });
     }},
    {"clustering", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"k", [&](const YAML::Node& n, const std::string& k) { c.k = (n.IsScalar() && n.Scalar() == "auto") ? 0 : as_int(n, k, o, 1); }},
         {"max_iter", [&](const YAML::Node& n, const std::string& k) { c.kmeans.max_iter = int(as_int(n, k, o, 1)); }},
         {"tol", [&](const YAML::Node& n, const std::string& k) {
            c.kmeans.tol = as_double(n, k, o);
            if (c.kmeans.tol < 0) bad(o.where(n, k), k, "expected a number >= 0");
          }},
         {"n_init", [&](const YAML::Node& n, const std::string& k) { c.kmeans.n_init = int(as_int(n, k, o, 1)); }},
         {"init", [&](const YAML::Node& n, const std::string& k) {
            c.kmeans.init = as_choice(n, k, o, {"kmeans++", "random"}) == "random" ? KMeansOptions::Init::random : KMeansOptions::Init::kmeanspp;
          }},
         {"spherical", [&](const YAML::Node& n, const std::string& k) { c.kmeans.spherical = as_bool(n, k, o); }},
         {"max_points_per_centroid", [&](const YAML::Node& n, const std::string& k) { c.kmeans.max_points_per_centroid = as_int(n, k, o, 0); }},
       });
     }},
    {"reduce", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"strategy", [&](const YAML::Node& n, const std::string& k) {
            c.select.strategy = parse_reduce_strategy(as_string(n, k, o), cat(o.where(n, k), ": ", k));
            have_strategy = true;
          }},
         {"fraction", [&](const YAML::Node& n, const std::string& k) {
            c.select.fraction = as_double(n, k, o);
            if (!(*c.select.fraction > 0 && *c.select.fraction <= 1)) bad(o.where(n, k), k, cat("expected a number in (0, 1], got ", *c.select.fraction));
          }},
         {"count", [&](const YAML::Node& n, const std::string& k) { c.select.count = as_int(n, k, o, 1); }},
         {"eps", [&](const YAML::Node& n, const std::string& k) {
            c.select.eps = as_double(n, k, o);
            if (!(*c.select.eps >= 0 && *c.select.eps <= 2)) bad(o.where(n, k), k, cat("expected a number in [0, 2], got ", *c.select.eps));
          }},
         {"report_eps", [&](const YAML::Node& n, const std::string& k) {
            c.select.report_eps = as_double(n, k, o);
            if (!(c.select.report_eps >= 0 && c.select.report_eps <= 2)) bad(o.where(n, k), k, cat("expected a number in [0, 2], got ", c.select.report_eps));
          }},
       });
       const int targets = int(c.select.fraction.has_value()) + int(c.select.count.has_value()) + int(c.select.eps.has_value());
       if (targets != 1)
         bad(o.where(sec, p), p, targets ? "give only one of fraction, count, eps" : "give the target: fraction (of the records) or count (or eps for semdedup)");
       if (c.select.eps && c.select.strategy != ReduceStrategy::semdedup)
         bad(o.where(sec["eps"], p + ".eps"), p + ".eps", cat("only semdedup keeps by a threshold; ", to_string(c.select.strategy), " needs fraction or count"));
     }},
    {"dispatch", [&](const YAML::Node& sec, const std::string& p) { c.dispatch = overrides_from_section(sec, p, o); }},
  });
  if (!root["reduce"] || !have_strategy) fail(ErrorKind::invalid_argument, file_name, ": reduce.strategy: missing (nearest, balanced, semdedup, hard or random)");
  if (c.embedding == ReduceConfig::Embedding::model && c.model.checkpoint.empty())
    fail(ErrorKind::invalid_argument, file_name, ": embedding.checkpoint: the model embedding needs a training checkpoint (.h5)");
  c.select.seed = c.kmeans.seed = c.seed;
  return c;
}

ReduceConfig load_reduce_config(const std::string& path, const std::vector<std::string>& sets) {
  return parse_reduce_config(schema::read_config_file(path), path, sets);
}

// ---------------------------------------------------------------------------------------------
// The pipeline

namespace {

const char* corpus_file_name(CorpusFormat f) {
  switch (f) {
    case CorpusFormat::fortune: return "corpus.fortune";
    case CorpusFormat::jsonl: return "corpus.jsonl";
    case CorpusFormat::text: return "corpus.txt";
    case CorpusFormat::lines: return "corpus.lines.txt";
    case CorpusFormat::count: break;
  }
  return "corpus.txt";
}

// The records in `format`, so read_corpus gives them back unchanged (written atomically, checked).
void write_corpus(const std::string& path, CorpusFormat format, const std::vector<std::string>& records, const std::vector<int64_t>& kept) {
  std::string text;
  for (int64_t i : kept) {
    const std::string& r = records[size_t(i)];
    switch (format) {
      case CorpusFormat::fortune: text += r + "\n%\n"; break;
      case CorpusFormat::text: text += r + "\n\n"; break;
      case CorpusFormat::jsonl: text += nlohmann::json{{"text", r}}.dump() + "\n"; break;
      case CorpusFormat::lines: text += r + "\n"; break;
      case CorpusFormat::count: break;
    }
  }
  write_file_atomically(path, text);
}

}  // namespace

nlohmann::json run_reduce(const ReduceConfig& c, const std::string& out_dir) {
  DispatcherOptions dopt = c.dispatch_sources;
  dopt.config_section = c.dispatch;
  resolve_overrides(dopt);  // every dispatch source parsed before the output folder exists
  // Under mpirun every rank runs this: each embeds and clusters its share of the records, and
  // rank 0 alone touches the output folder (a refusal there ends the whole job).
  Comm& job = Comm::world();
  Comm* comm = job.distributed() ? &job : nullptr;
  if (job.root() && fs::exists(fs::path(out_dir) / "report.json"))
    fail(ErrorKind::invalid_argument, out_dir, ": already holds a reduction (report.json); choose another --out or remove it");

  nlohmann::json report;
  nlohmann::json& stages = report["seconds"];
  Timer total, t;
  const Corpus corpus = read_corpus(c.sources, c.format);
  const int64_t n = int64_t(corpus.records.size());
  if (n < job.size())
    fail(ErrorKind::invalid_argument, "reduce: ", n, " records for ", job.size(), " ranks: each rank needs at least one record; run at most ", n, " ranks");
  if (job.root()) {  // made once the input is known to be enough: a refusal above leaves no folder behind
    std::error_code ec;
    fs::create_directories(out_dir, ec);
    if (ec) fail(ErrorKind::io, out_dir, ": cannot create the output folder (", ec.message(), ")");
  }
  const Comm::Share share = job.share(n);  // this rank's records
  const std::span<const std::string> records(corpus.records.data() + share.begin, size_t(share.size()));
  stages["read"] = t.seconds();
  log_info("read ", n, " records (", to_string(corpus.format), ") from ", corpus.files.size(), " files",
           comm ? cat("; ", job.size(), " ranks embed and cluster ", share.size(), " or so each") : std::string());

  Dispatcher dispatcher(dopt);
  KMeansResult clusters;
  Tensor embeddings;
  if (c.select.strategy != ReduceStrategy::random) {
    t.reset();
    if (c.embedding == ReduceConfig::Embedding::ngram) embeddings = embed_ngrams(dispatcher, records, c.ngram, comm);
    else embeddings = embed_with_model(dispatcher, records, c.model);
    stages["embed"] = t.seconds();
    log_info("embedded ", n, " records as ", embeddings.shape()[1], "-d vectors (", c.embedding == ReduceConfig::Embedding::ngram ? "n-gram TF-IDF" : "model", ") in ",
             format_seconds(stages["embed"].get<double>()));
    t.reset();
    KMeansOptions ko = c.kmeans;
    ko.k = c.k > 0 ? c.k : default_cluster_count(n);
    if (ko.k > n) fail(ErrorKind::invalid_argument, c.source, ": clustering.k: ", ko.k, " clusters for ", n, " records");
    clusters = kmeans(dispatcher, embeddings, ko, comm);
    stages["kmeans"] = t.seconds();
    log_info("k-means: k ", ko.k, ", ", clusters.iterations, " iterations", clusters.converged ? " (converged)" : " (max_iter reached)", ", inertia ",
             clusters.inertia, " in ", format_seconds(stages["kmeans"].get<double>()));
    report["kmeans"] = {{"k", ko.k}, {"iterations", clusters.iterations}, {"converged", clusters.converged}, {"inertia", clusters.inertia},
                        {"spherical", ko.spherical}};
  }
  t.reset();
  const Selection s = select_records(dispatcher, embeddings.numel() > 0 ? embeddings : Tensor::zeros({share.size(), 1}, DType::f32), clusters, c.select, comm);
  stages["select"] = t.seconds();
  if (!job.root()) return report;  // rank 0 writes for the job

  t.reset();
  const std::string corpus_path = (fs::path(out_dir) / corpus_file_name(corpus.format)).string();
  write_corpus(corpus_path, corpus.format, corpus.records, s.kept);
  {
    std::ostringstream tsv;
    tsv << "record\tcluster\tdistance\tdup_score\tkept\n";
    std::vector<char> kept(size_t(n), 0);
    for (int64_t i : s.kept) kept[size_t(i)] = 1;
    for (int64_t i = 0; i < n; ++i)
      tsv << i << '\t' << s.cluster[size_t(i)] << '\t' << s.distance[size_t(i)] << '\t' << s.dup_score[size_t(i)] << '\t' << int(kept[size_t(i)]) << '\n';
    write_file_atomically((fs::path(out_dir) / "selection.tsv").string(), tsv.str());
  }
  stages["write"] = t.seconds();
  stages["total"] = total.seconds();

  report["config"] = c.source;
  report["ranks"] = job.size();
  report["input"] = {{"records", n}, {"files", corpus.files.size()}, {"format", to_string(corpus.format)}};
  report["embedding"] = c.select.strategy == ReduceStrategy::random ? nlohmann::json("none (random)")
                        : c.embedding == ReduceConfig::Embedding::ngram
                            ? nlohmann::json{{"kind", "ngram"}, {"dim", c.ngram.dim}, {"char_ngrams", {c.ngram.char_min, c.ngram.char_max}}, {"word_ngrams", {c.ngram.word_min, c.ngram.word_max}}}
                            : nlohmann::json{{"kind", "model"}, {"checkpoint", c.model.checkpoint}, {"max_tokens", c.model.max_tokens}};
  report["strategy"] = to_string(c.select.strategy);
  report["kept"] = int64_t(s.kept.size());
  report["kept_fraction"] = double(s.kept.size()) / double(n);
  report["output"] = corpus_path;
  const double dup_eps = c.select.strategy == ReduceStrategy::semdedup ? s.eps_used : c.select.report_eps;
  report["near_duplicates"] = {{"eps", dup_eps}, {"found", s.near_duplicates}, {"removed", s.near_duplicates_removed}};
  if (c.select.strategy == ReduceStrategy::semdedup) report["semdedup_eps"] = s.eps_used;
  nlohmann::json cl = nlohmann::json::array();
  for (size_t i = 0; i < s.cluster_size.size(); ++i)
    cl.push_back({{"cluster", i}, {"size", s.cluster_size[i]}, {"kept", s.cluster_kept[i]}, {"near_duplicates", s.cluster_near_duplicates[i]}});
  report["clusters"] = cl;
  report["dispatch_metrics"] = metrics_json(dispatcher.metrics());
  write_file_atomically((fs::path(out_dir) / "report.json").string(), report.dump(1) + "\n");  // last: its presence marks a finished reduction
  return report;
}

std::string format_reduce_report(const nlohmann::json& r) {
  std::ostringstream out;
  const int64_t n = r["input"]["records"].get<int64_t>(), kept = r["kept"].get<int64_t>();
  char line[256];
  std::snprintf(line, sizeof line, "kept %lld of %lld records (%.1f%%) by %s\n", static_cast<long long>(kept), static_cast<long long>(n),
                100.0 * double(kept) / double(n), r["strategy"].get<std::string>().c_str());
  out << line;
  if (r.contains("kmeans")) {
    const auto& km = r["kmeans"];
    const auto& cl = r["clusters"];
    std::vector<int64_t> sizes;
    for (const auto& c : cl) sizes.push_back(c["size"].get<int64_t>());
    std::sort(sizes.begin(), sizes.end());
    std::snprintf(line, sizeof line, "clusters: %lld (sizes min %lld, median %lld, max %lld), %d k-means iterations%s\n",
                  static_cast<long long>(km["k"].get<int64_t>()), static_cast<long long>(sizes.front()), static_cast<long long>(sizes[sizes.size() / 2]),
                  static_cast<long long>(sizes.back()), km["iterations"].get<int>(), km["converged"].get<bool>() ? " (converged)" : "");
    out << line;
    const auto& nd = r["near_duplicates"];
    std::snprintf(line, sizeof line, "near-duplicates (cosine > %.4f): %lld found, %lld removed\n", 1.0 - nd["eps"].get<double>(),
                  static_cast<long long>(nd["found"].get<int64_t>()), static_cast<long long>(nd["removed"].get<int64_t>()));
    out << line;
  }
  out << "seconds:";
  for (const auto& [stage, secs] : r["seconds"].items()) {
    std::snprintf(line, sizeof line, " %s %.2f", stage.c_str(), secs.get<double>());
    out << line;
  }
  out << "\nreduced corpus: " << r["output"].get<std::string>() << "\n";
  return out.str();
}

}  // namespace hybrit
