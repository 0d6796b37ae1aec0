// Clustering-based training-data reduction: embed every record, cluster the embeddings with
// k-means, and keep a subset by a named strategy. `hybrit reduce CONFIG.yaml` runs it end to end
// and writes the reduced corpus in the input's format (the training readers take it) beside a report.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "clustering/embed.hpp"
#include "clustering/kmeans.hpp"

namespace hybrit {

enum class ReduceStrategy {
  nearest,   // per cluster, the records nearest the centroid (prototypical examples)
  balanced,  // the same quota from every cluster (small clusters give all they have), random within
  semdedup,  // drop near-duplicates within each cluster (SemDeDup)
  hard,      // per cluster, the records farthest from the centroid (prototype-based pruning's hard examples)
  random,    // a uniform random subset, no embedding or clustering: the baseline to beat
};
inline constexpr int kReduceStrategyCount = 5;
const char* to_string(ReduceStrategy s);
// A strategy by name (the names of to_string); an Error naming `what` and every name otherwise.
ReduceStrategy parse_reduce_strategy(const std::string& name, const std::string& what);
// The number of clusters when none is given: round(sqrt(records)), at least 1.
int64_t default_cluster_count(int64_t records);

// How many records to keep: exactly one of fraction, count, or (semdedup only) eps.
//   nearest and hard: each cluster keeps its share of the target in proportion to its size
//   (largest remainders get the leftover records), so the mix of clusters is kept.
//   semdedup: a record's duplicate score is its highest cosine similarity to a record before it in
//   its cluster, the cluster ordered farthest from the centroid first (the SemDeDup reference's
//   rule, so of a group of duplicates the one farthest from the centroid stays). With eps, every
//   record scoring above 1 - eps goes; with a target, the highest scores go until it is met, and
//   the report gives the eps that amounts to.
struct SelectOptions {
  ReduceStrategy strategy = ReduceStrategy::nearest;
  std::optional<double> fraction;  // in (0, 1]
  std::optional<int64_t> count;    // in [1, records]
  std::optional<double> eps;       // semdedup without a target
  double report_eps = 0.05;        // near-duplicates counted in the report: score > 1 - report_eps
  uint64_t seed = 1;               // balanced and random draw with it
};

struct Selection {
  std::vector<int64_t> kept;       // record indices, ascending
  std::vector<int32_t> cluster;    // each record's cluster (0 for every record with strategy random)
  std::vector<float> distance;     // squared distance of each record to its centroid
  std::vector<float> dup_score;    // highest cosine similarity to an earlier record of its cluster
  std::vector<int64_t> cluster_size, cluster_kept, cluster_near_duplicates;
  int64_t near_duplicates = 0, near_duplicates_removed = 0;  // by report_eps (or eps for semdedup)
  double eps_used = 0;             // semdedup: the threshold that gave the selection
};

// The records of `embeddings` (n, d) to keep, given their clustering. Similarities go through the
// dispatcher's matmul, a cluster's rows in blocks. Errors: a target outside its range, none or two
// of fraction/count/eps, eps for a strategy other than semdedup.
//
// Over the ranks of a job (`comm` with several processes): `embeddings` and the clustering's labels
// are this rank's records, the ranks holding consecutive pieces in rank order (kmeans' layout).
// Each cluster's near-duplicates are scored by one rank, which receives that cluster's rows; the
// Selection, over every record, comes out the same on every rank and as one process makes it.
Selection select_records(Dispatcher& dispatcher, const Tensor& embeddings, const KMeansResult& clusters, const SelectOptions& options, Comm* comm = nullptr);

struct ReduceConfig {
  uint64_t seed = 1;
  std::vector<std::string> sources = {"/usr/share/games/fortunes"};
  std::string format = "auto";
  enum class Embedding { ngram, model };
  Embedding embedding = Embedding::ngram;
  NgramEmbeddingOptions ngram;
  ModelEmbeddingOptions model;
  int64_t k = 0;  // 0: round(sqrt(records))
  KMeansOptions kmeans;  // k and seed are filled from the fields above
  SelectOptions select;
  Overrides dispatch;  // the YAML's `dispatch:` section
  // The front end's sources above that section (--config, the environment, --backend), resolved
  // together with `dispatch` by resolve_overrides. Not part of the YAML.
  DispatcherOptions dispatch_sources;
  std::string source = "defaults";  // the file it came from
};

// Loads and checks a reduction config (sections seed, data, embedding, clustering, reduce,
// dispatch; see configs/reduce.yaml); `sets` are `dotted.key=value` overrides. Errors name
// file:line:key.
ReduceConfig load_reduce_config(const std::string& path, const std::vector<std::string>& sets = {});
ReduceConfig parse_reduce_config(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets = {});

// The whole reduction into `out_dir` (made if missing; refused if it already holds one):
//   corpus.<fortune|txt|jsonl>  the kept records, in input order, in the input's format
//   selection.tsv               every record: index, cluster, distance, duplicate score, kept
//   report.json                 clusters, sizes, kept per cluster, duplicates, timings, dispatcher metrics
// Returns the report (also printed by the CLI).
nlohmann::json run_reduce(const ReduceConfig& config, const std::string& out_dir);
// The report in a few lines for people.
std::string format_reduce_report(const nlohmann::json& report);

}  // namespace hybrit
