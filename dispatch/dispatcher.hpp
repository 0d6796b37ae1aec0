// The dispatcher: for each call, which backend runs it. The choice is a pure function of the
// hardware probe, a cost profile and the user's overrides (Policy::choose), so it can be tested
// without timing anything. Dispatcher wraps a Policy with the live backends and the metrics.
#pragma once
#include <array>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "backends/backend.hpp"
#include "core/yaml_schema.hpp"

namespace hybrit {

// The size of one call. `work` indexes the profile: elements for quantize/pack ops, m*n*k for
// matmul, n*k*d for kmeans_assign, n*d for kmeans_update. `transfer_bytes` is what a round trip
// host -> GPU -> host moves; `touched_bytes` and `flops` give the rates reports print.
struct OpSize {
  Op op = Op::matmul;
  double work = 0;
  double transfer_bytes = 0;
  double touched_bytes = 0;
  double flops = 0;
  int64_t dims[3] = {1, 1, 1};
  std::string label() const;  // e.g. "1024x1024x1024"; formatted on demand (routing is per call)
};
// Dimensions per op: quantize_ternary (n); quantize_int8_rows, pack/unpack (rows, cols);
// matmul and matmul_ternary (m, n, k); kmeans_assign (n, k, d); kmeans_update (n, k, d);
// attention_forward and attention_backward (batch * heads, seq, head_dim).
OpSize op_size(Op op, int64_t a, int64_t b = 1, int64_t c = 1);
// How many of op_size's dimensions an op uses (the list above), and their names ("m, n, k").
int op_size_dims(Op op);
const char* op_size_dim_names(Op op);
bool is_compute_bound(Op op);  // rated in GFLOP/s (matmul, matmul_ternary, kmeans_assign), else GB/s

struct ProfilePoint {
  double work = 0;
  double seconds = 0;
};

// What a measured profile depends on besides the op sizes: the hardware, the kernels (hybrit's
// version), the SIMD level of the CPU kernels and the tbb thread count. A profile measured under
// other conditions is ignored, with a warning that names the difference.
struct MeasurementConditions {
  std::string fingerprint;  // HardwareInfo::fingerprint()
  std::string version = HYBRIT_VERSION;
  SimdLevel simd = SimdLevel::scalar;
  int threads = 1;
  std::string str() const;
  // The first difference from `other` in words, or "" when they match.
  std::string difference(const MeasurementConditions& other) const;
};

// Seconds per call, by op and backend, at a ladder of sizes; predictions interpolate in log-log
// and extrapolate at the end point's throughput.
struct Profile {
  MeasurementConditions conditions;  // of the measurement (for built-in defaults: the current ones)
  std::string source = "built-in defaults";
  // Sorted by work; a flat table because choose() reads it on every call.
  std::array<std::array<std::vector<ProfilePoint>, kBackendCount>, kOpCount> table;

  std::vector<ProfilePoint>& points(Op op, BackendKind b) { return table[int(op)][int(b)]; }
  const std::vector<ProfilePoint>& points(Op op, BackendKind b) const { return table[int(op)][int(b)]; }
  double transfer_gbps = 12.0;       // host <-> GPU (PCIe, pageable memory)
  double transfer_latency_s = 20e-6;  // per direction, plus synchronisation

  double predict(Op op, BackendKind backend, double work) const;  // NaN without points
};

// Defaults from the probe alone: per-core bandwidth and FLOP rate by SIMD level, task overhead
// for tbb, launch latency and a nominal GPU rate for cuda.
Profile default_profile(const HardwareInfo& hw);
// Where a measured profile lives when no path is given: $HYBRIT_PROFILE, else
// $XDG_CACHE_HOME/hybrit/profile.json, else ~/.cache/hybrit/profile.json.
std::string default_profile_path();
// Reads a saved profile. A missing file at the default path is silent; a missing or damaged file
// named explicitly is an Error; a file measured under other conditions (hardware, version, SIMD
// level, threads) is ignored with a warning. Always returns a usable profile (the defaults,
// overlaid with the file's points when it is valid).
Profile load_profile(const std::string& path, bool named_explicitly, const HardwareInfo& hw, const MeasurementConditions& now);
void save_profile(const Profile& profile, const std::string& path);

// What one source of settings says about the dispatch: the built-in defaults (nothing set), a
// config's `dispatch:` section, the environment, or a front end's flags and arguments.
struct Overrides {
  std::optional<BackendKind> backend;   // every op
  std::map<Op, BackendKind> per_op;     // wins over `backend` for its op, within one source
  std::optional<SimdLevel> simd;        // C and tbb kernels; default: the best the CPU has
  int threads = 0;                      // tbb threads; 0: the CPUs granted to this process
  std::string profile_path;             // measured profile to load
  std::string source;                   // where the overrides came from, for messages
  // Settings this source names as `auto`: merged over a lower source, they undo what it set.
  bool backend_auto = false, simd_auto = false, threads_auto = false, profile_auto = false;
  std::set<Op> per_op_auto;

  // `higher` wins for every setting it names (a value or `auto`). Its `backend` (or `auto`) also
  // drops the lower sources' per-op choices: a higher "every op" outranks a lower "this op".
  void merge(const Overrides& higher);
  bool empty() const;  // names no setting at all
  // One setting from its text, as every source writes it: `backend`, `ops.<op>` (c, tbb, cuda or
  // auto), `simd` (scalar, avx2, avx512 or auto), `threads` (0..4096 or auto), `profile` (a path
  // or auto). `what` names the source in errors ("HYBRIT_THREADS", "run.yaml:4: dispatch.simd").
  void set(const std::string& setting, const std::string& text, const std::string& what);
};
// HYBRIT_BACKEND, HYBRIT_SIMD, HYBRIT_THREADS, HYBRIT_PROFILE (each may be `auto`).
Overrides overrides_from_env();
// The `dispatch:` section of a loaded config (keys: backend, ops, simd, threads, profile; each may
// be `auto`); `key` is its dotted name for messages ("dispatch"), errors name the file and line or
// the --set that gave the value.
Overrides overrides_from_section(const YAML::Node& section, const std::string& key, const schema::Origins& origins);
// The `dispatch:` section of a YAML text or file (the rest of the file is not checked here).
Overrides overrides_from_yaml(const std::string& yaml_text, const std::string& file_name);
Overrides overrides_from_yaml_file(const std::string& path);

// The one precedence rule for dispatch settings, lowest first:
//   built-in defaults < a run config's `dispatch:` section < the file named by --config (Python:
//   config=) < the environment (HYBRIT_*) < the front end's own flags or arguments (--backend,
//   backend=).
// `auto` at any level undoes the levels below it for that setting. Every front end (the CLI's
// subcommands, training, reduction, the Python bindings) resolves through here.
struct DispatcherOptions {
  Overrides config_section;  // the run's YAML `dispatch:` section (train, reduce)
  std::string config_path;   // a YAML file whose `dispatch:` section applies (--config, config=)
  bool use_environment = true;
  Overrides overrides;       // the front end's flags and arguments
};
Overrides resolve_overrides(const DispatcherOptions& sources);

struct Decision {
  BackendKind backend = BackendKind::c;
  bool forced = false;
  std::array<double, kBackendCount> predicted_seconds{};  // NaN where not predicted
  std::string reason;  // filled only when asked for: formatting it costs more than a small op
};

// Near-ties go to c: when c's predicted time is within this factor of the best backend's, c runs
// (it starts no threads and moves no data; measured profiles carry a few percent of noise). The
// dispatch report judges auto's picks with the same margin.
inline constexpr double kTieMargin = 1.05;

struct Policy {
  HardwareInfo hardware;
  Profile profile;
  Overrides overrides;
  std::array<bool, kBackendCount> available{};
  std::array<std::string, kBackendCount> unavailable_reason;
  // has_kernel[op][backend]: Backend::supports, copied by the Dispatcher (all true by default). A
  // backend without a kernel for an op is never predicted nor picked for it; forcing it is an error.
  std::array<std::array<bool, kBackendCount>, kOpCount> has_kernel = [] {
    std::array<std::array<bool, kBackendCount>, kOpCount> all{};
    for (auto& row : all) row.fill(true);
    return all;
  }();

  // Throws Error(unsupported) when the overrides force a backend that is not available.
  void validate() const;
  // `explain` fills Decision::reason (and the predictions of a forced choice).
  Decision choose(const OpSize& size, Device data, bool explain = false) const;
};

struct MetricsRow {
  int64_t calls = 0;
  double elements = 0, bytes = 0, seconds = 0;
};

class Metrics {
 public:
  void record(Op op, BackendKind backend, double elements, double bytes, double seconds);
  MetricsRow get(Op op, BackendKind backend) const;
  void reset();
  std::string table() const;  // one line per (op, backend) that ran

 private:
  mutable std::mutex mutex_;
  std::array<std::array<MetricsRow, kBackendCount>, kOpCount> rows_{};
};

class Dispatcher {
 public:
  explicit Dispatcher(const DispatcherOptions& options = {});

  const Policy& policy() const { return policy_; }
  // The conditions this dispatcher's backends run under (what a profile measured now records).
  const MeasurementConditions& conditions() const { return conditions_; }
  bool available(BackendKind kind) const { return policy_.available[int(kind)]; }
  Backend& backend(BackendKind kind);
  Decision choose(const OpSize& size, Device data, bool explain = true) const { return policy_.choose(size, data, explain); }
  Metrics& metrics() { return metrics_; }
  const Metrics& metrics() const { return metrics_; }

  // The op table, routed. Outputs are allocated by the caller, on the inputs' device.
  float quantize_ternary(const Tensor& w, Tensor& q);
  void quantize_int8_rows(const Tensor& x, Tensor& q, Tensor& scales);
  void pack_ternary(const Tensor& q, Tensor& packed);
  void unpack_ternary(const Tensor& packed, Tensor& q);
  void matmul(const Tensor& a, const Tensor& b, Tensor& c, const MatmulArgs& args = {});
  void matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y);
  void kmeans_assign(const Tensor& x, const Tensor& centroids, Tensor& labels, Tensor& dist);
  void kmeans_update(const Tensor& x, const Tensor& labels, Tensor& sums, Tensor& counts);
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& shape, Tensor& out, Tensor& lse);
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& lse,
                          const AttentionShape& shape, Tensor& dq, Tensor& dk, Tensor& dv);

  // The model's loops between ops (Backend::parallel_for): on the tbb backend's arena, so
  // HYBRIT_THREADS bounds them too, or in order on this thread when the c backend is forced.
  void parallel_for(int64_t n, int64_t grain, const RangeBody& body);
  int host_threads() const { return host_loops_->threads(); }

 private:
  template <class Run>
  auto route(const OpSize& size, Device data, const Run& run);

  Policy policy_;
  MeasurementConditions conditions_;
  std::array<std::unique_ptr<Backend>, kBackendCount> backends_;
  Metrics metrics_;
  Backend* host_loops_ = nullptr;
  std::mutex explained_mutex_;
  std::set<std::string> explained_;  // decisions already logged (HYBRIT_VERBOSE=1 logs each once)
};

}  // namespace hybrit
