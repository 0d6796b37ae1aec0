#include "dispatch/dispatcher.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/log.hpp"

namespace hybrit {

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace

// ------------------------------------------------------------------ sizes

std::string OpSize::label() const {
  switch (op) {
    case Op::quantize_ternary: return std::to_string(dims[0]);
    case Op::quantize_int8_rows:
    case Op::pack_ternary:
    case Op::unpack_ternary: return cat(dims[0], "x", dims[1]);
    case Op::kmeans_assign:
    case Op::kmeans_update: return cat("n=", dims[0], " k=", dims[1], " d=", dims[2]);
    case Op::attention_forward:
    case Op::attention_backward: return cat("heads=", dims[0], " T=", dims[1], " d=", dims[2]);
    default: return cat(dims[0], "x", dims[1], "x", dims[2]);
  }
}

bool is_compute_bound(Op op) {
  return op == Op::matmul || op == Op::kmeans_assign || op == Op::matmul_ternary || op == Op::attention_forward || op == Op::attention_backward;
}

const char* op_size_dim_names(Op op) {
  switch (op) {  // every op listed: -Wswitch names a new one that is missing
    case Op::quantize_ternary: return "n";
    case Op::quantize_int8_rows:
    case Op::pack_ternary:
    case Op::unpack_ternary: return "rows, cols";
    case Op::matmul:
    case Op::matmul_ternary: return "m, n, k";
    case Op::kmeans_assign:
    case Op::kmeans_update: return "n, k, d";
    case Op::attention_forward:
    case Op::attention_backward: return "batch * heads, seq, head_dim";
  }
  return "";
}

int op_size_dims(Op op) {
  int dims = 1;
  for (const char* p = op_size_dim_names(op); *p; ++p) dims += *p == ',';
  return dims;
}

OpSize op_size(Op op, int64_t a, int64_t b, int64_t c) {
  if (a < 0 || b < 0 || c < 0) fail(ErrorKind::invalid_argument, to_string(op), ": sizes must be >= 0, got ", a, " x ", b, " x ", c);
  OpSize s;
  s.op = op;
  s.dims[0] = a, s.dims[1] = b, s.dims[2] = c;
  const double A = double(a), B = double(b), C = double(c);
  switch (op) {
    case Op::quantize_ternary:  // two reads (|w| sum, then quantize) and one int8 write
      s.work = A, s.transfer_bytes = 5 * A, s.touched_bytes = 9 * A;
      break;
    case Op::quantize_int8_rows:
      s.work = A * B, s.transfer_bytes = 5 * A * B + 4 * A, s.touched_bytes = 9 * A * B + 4 * A;
      break;
    case Op::pack_ternary:
    case Op::unpack_ternary:
      s.work = A * B, s.transfer_bytes = s.touched_bytes = A * B + A * std::ceil(B / 4);
      break;
    case Op::matmul:  // (m, n, k)
      s.work = A * B * C, s.flops = 2 * A * B * C, s.transfer_bytes = s.touched_bytes = 4 * (A * C + C * B + A * B);
      break;
    case Op::kmeans_assign:  // (n, k, d)
      s.work = A * B * C, s.flops = 2 * A * B * C, s.transfer_bytes = s.touched_bytes = 4 * (A * C + B * C + 2 * A);
      break;
    case Op::kmeans_update:  // (n, k, d)
      s.work = A * C, s.transfer_bytes = s.touched_bytes = 4 * A * C + 4 * A + 8 * B * C + 8 * B;
      break;
    case Op::matmul_ternary:  // (m, n, k): int8 activations, 2-bit weights, f32 out; integer ops
      s.work = A * B * C, s.flops = 2 * A * B * C, s.transfer_bytes = s.touched_bytes = A * C + 4 * A + B * std::ceil(C / 4) + 4 * A * B;
      break;
    case Op::attention_forward:  // (batch * heads, seq, head_dim); causal: T (T + 1) / 2 query-key pairs per head
    case Op::attention_backward: {
      const double pairs = A * B * (B + 1) / 2;
      const bool fwd = op == Op::attention_forward;
      // Forward: scores and P V (2 products); backward: scores, dV, dP, dK, dQ (5 products).
      s.work = pairs * C, s.flops = (fwd ? 4 : 10) * pairs * C;
      s.transfer_bytes = s.touched_bytes = 4 * A * B * C * (fwd ? 4 : 8) + 4 * A * B;
      break;
    }
  }
  return s;
}

// ------------------------------------------------------------------ profile

std::string MeasurementConditions::str() const {
  return cat("hybrit ", version, ", ", to_string(simd), " kernels, ", threads, " tbb threads, hardware ", fingerprint);
}

std::string MeasurementConditions::difference(const MeasurementConditions& o) const {
  if (fingerprint != o.fingerprint) return cat("measured on other hardware (fingerprint ", fingerprint, "; this machine is ", o.fingerprint, ")");
  if (version != o.version) return cat("measured with hybrit ", version, " (this is ", o.version, ")");
  if (simd != o.simd) return cat("measured with ", to_string(simd), " kernels (now ", to_string(o.simd), ")");
  if (threads != o.threads) return cat("measured with ", threads, " tbb threads (now ", o.threads, ")");
  return "";
}

double Profile::predict(Op op, BackendKind backend, double work) const {
  const auto& p = points(op, backend);
  if (p.empty()) return kNaN;
  if (work <= p.front().work) return p.front().seconds;  // overhead-dominated: no cheaper than the smallest
  if (work >= p.back().work) return p.back().seconds * work / p.back().work;  // throughput-dominated
  size_t i = 1;
  while (p[i].work < work) ++i;
  if (p[i].work == work) return p[i].seconds;  // a measured size: the measurement itself
  const double x0 = std::log(p[i - 1].work), x1 = std::log(p[i].work);
  const double y0 = std::log(p[i - 1].seconds), y1 = std::log(p[i].seconds);
  return std::exp(y0 + (y1 - y0) * (std::log(work) - x0) / (x1 - x0));
}

Profile default_profile(const HardwareInfo& hw) {
  Profile prof;
  const int threads = std::max(1, hw.granted_cpus);
  const SimdLevel simd = hw.best_simd();
  const double core_bandwidth = simd == SimdLevel::scalar ? 6e9 : 12e9;
  const double core_flops = simd == SimdLevel::avx512 ? 80e9 : simd == SimdLevel::avx2 ? 45e9 : 6e9;
  for (int o = 0; o < kOpCount; ++o) {
    const Op op = Op(o);
    // Touched bytes and FLOPs per unit of work, at a representative shape.
    const OpSize unit = is_compute_bound(op) ? op_size(op, 1024, 256, 64) : op_size(op, 1024, 1024, 64);
    const double bytes_per_work = unit.touched_bytes / unit.work, flops_per_work = unit.flops / unit.work;
    // Work per tbb task, as the tbb backend splits it: below this a call runs as one task.
    const double grain = op == Op::matmul || op == Op::matmul_ternary || op == Op::attention_forward || op == Op::attention_backward ? 1e6 : op == Op::kmeans_assign ? 1024.0 * 256 * 64 : op == Op::kmeans_update ? 4096.0 * 64 : 65536;
    std::vector<ProfilePoint> c_pts, tbb_pts, cuda_pts;
    for (double work = 1e2; work <= 1e12; work *= 2) {
      const double one_core = is_compute_bound(op) ? flops_per_work * work / core_flops : bytes_per_work * work / core_bandwidth;
      c_pts.push_back({work, 0.3e-6 + one_core});
      // tbb: only as many threads as the call has tasks; waking them costs a few microseconds;
      // memory-bound work stops scaling at the memory channels (taken as 4 cores' worth).
      const double tasks = std::clamp(work / grain, 1.0, double(threads));
      const double scale = is_compute_bound(op) ? 0.85 * tasks : std::min(tasks, 4.0) * (tasks > 1 ? 0.8 : 1.0);
      tbb_pts.push_back({work, 0.5e-6 + (tasks > 1 ? 8e-6 : 0.0) + one_core / std::max(scale, 1.0)});
      // A nominal data-centre GPU (1.5 TB/s, 25 TFLOP/s, 15 us per call); a measured profile replaces it.
      cuda_pts.push_back({work, 15e-6 + (is_compute_bound(op) ? flops_per_work * work / 25e12 : bytes_per_work * work / 1.5e12)});
    }
    prof.points(op, BackendKind::c) = std::move(c_pts);
    prof.points(op, BackendKind::tbb) = std::move(tbb_pts);
    prof.points(op, BackendKind::cuda) = std::move(cuda_pts);
  }
  return prof;
}

std::string default_profile_path() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return std::string(xdg) + "/hybrit/profile.json";
  if (const char* home = std::getenv("HOME"); home && *home) return std::string(home) + "/.cache/hybrit/profile.json";
  return ".hybrit-profile.json";
}

namespace {
constexpr const char* kProfileFormat = "hybrit-dispatch-profile";
constexpr int kProfileVersion = 1;
}  // namespace

Profile load_profile(const std::string& path, bool named_explicitly, const HardwareInfo& hw, const MeasurementConditions& now) {
  Profile prof = default_profile(hw);
  prof.conditions = now;
  auto reject = [&](ErrorKind kind, const std::string& why) -> Profile {
    if (named_explicitly) fail(kind, "dispatch profile ", path, ": ", why);
    log_warn("dispatch profile ", path, ": ", why, "; using built-in defaults");
    Profile defaults = default_profile(hw);
    defaults.conditions = now;
    return defaults;
  };
  std::ifstream in(path);
  if (!in) {
    if (named_explicitly) fail(ErrorKind::io, "dispatch profile ", path, ": cannot open (does it exist?)");
    return prof;
  }
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    return reject(ErrorKind::corrupt_data, cat("not valid JSON (", e.what(), ")"));
  }
  try {
    if (j.value("format", "") != kProfileFormat) return reject(ErrorKind::corrupt_data, cat("not a hybrit profile (format is not '", kProfileFormat, "')"));
    if (j.value("version", 0) != kProfileVersion)
      return reject(ErrorKind::corrupt_data, cat("profile version ", j.value("version", 0), ", this build reads version ", kProfileVersion));
    MeasurementConditions then;
    then.fingerprint = j.value("fingerprint", "");
    then.version = j.value("hybrit_version", "unknown");
    then.simd = parse_simd_level(j.value("simd", "scalar"), cat("dispatch profile ", path, ": simd"));
    then.threads = j.value("tbb_threads", 0);
    if (const std::string diff = then.difference(now); !diff.empty()) {
      log_warn("dispatch profile ", path, " was ", diff, ": ignored; run `hybrit dispatch-report --save ", path, "` to measure again");
      return prof;
    }
    prof.conditions = then;
    prof.source = path;
    prof.transfer_gbps = j.value("transfer_gbps", prof.transfer_gbps);
    for (const auto& [op_name, per_backend] : j.at("points").items()) {
      const Op op = parse_op(op_name, cat("dispatch profile ", path, ": points"));
      for (const auto& [backend_name, list] : per_backend.items()) {
        const BackendKind kind = parse_backend(backend_name, cat("dispatch profile ", path, ": points.", op_name));
        std::vector<ProfilePoint> pts;
        for (const auto& pair : list) {
          const double work = pair.at(0).get<double>(), seconds = pair.at(1).get<double>();
          if (!(work > 0) || !(seconds > 0) || (!pts.empty() && work <= pts.back().work))
            return reject(ErrorKind::corrupt_data, cat("points.", op_name, ".", backend_name, " must be increasing sizes with positive times"));
          pts.push_back({work, seconds});
        }
        if (!pts.empty()) prof.points(op, kind) = std::move(pts);
      }
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    return reject(ErrorKind::corrupt_data, cat("malformed (", e.what(), ")"));
  }
  return prof;
}

void save_profile(const Profile& profile, const std::string& path) {
  nlohmann::json j;
  j["format"] = kProfileFormat;
  j["version"] = kProfileVersion;
  j["fingerprint"] = profile.conditions.fingerprint;
  j["hybrit_version"] = profile.conditions.version;
  j["simd"] = to_string(profile.conditions.simd);
  j["tbb_threads"] = profile.conditions.threads;
  j["hardware"] = hardware().cpu_model;
  j["transfer_gbps"] = profile.transfer_gbps;
  nlohmann::json points = nlohmann::json::object();
  for (int o = 0; o < kOpCount; ++o)
    for (int b = 0; b < kBackendCount; ++b) {
      const auto& pts = profile.points(Op(o), BackendKind(b));
      if (pts.empty()) continue;
      nlohmann::json list = nlohmann::json::array();
      for (const auto& p : pts) list.push_back({p.work, p.seconds});
      points[to_string(Op(o))][to_string(BackendKind(b))] = list;
    }
  j["points"] = points;
  const std::filesystem::path target(path);
  if (target.has_parent_path()) {
    std::error_code ec;
    std::filesystem::create_directories(target.parent_path(), ec);
  }
  // Written beside the target and renamed, so a crash never leaves half a profile.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(1) << "\n";
    if (!out) fail(ErrorKind::io, "cannot write dispatch profile ", tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, target, ec);
  if (ec) fail(ErrorKind::io, "cannot move ", tmp, " to ", path, ": ", ec.message());
}

// ------------------------------------------------------------------ overrides

void Overrides::merge(const Overrides& higher) {
  if (higher.backend || higher.backend_auto) {
    backend = higher.backend, backend_auto = higher.backend_auto;
    per_op.clear(), per_op_auto.clear();
  }
  for (Op op : higher.per_op_auto) per_op.erase(op), per_op_auto.insert(op);
  for (const auto& [op, kind] : higher.per_op) per_op[op] = kind, per_op_auto.erase(op);
  if (higher.simd || higher.simd_auto) simd = higher.simd, simd_auto = higher.simd_auto;
  if (higher.threads > 0 || higher.threads_auto) threads = higher.threads, threads_auto = higher.threads_auto;
  if (!higher.profile_path.empty() || higher.profile_auto) profile_path = higher.profile_path, profile_auto = higher.profile_auto;
  if (!higher.source.empty() && !higher.empty()) source = higher.source;
}

bool Overrides::empty() const {
  return !backend && per_op.empty() && !simd && threads == 0 && profile_path.empty() && !backend_auto && !simd_auto && !threads_auto &&
         !profile_auto && per_op_auto.empty();
}

namespace {
// "auto" (or nothing) is a value: it undoes lower sources. Returns false for auto.
bool parse_backend_or_auto(const std::string& text, const std::string& what, BackendKind& out) {
  if (text == "auto" || text.empty()) return false;
  if (text == "c" || text == "tbb" || text == "cuda") {
    out = parse_backend(text, what);
    return true;
  }
  fail(ErrorKind::invalid_argument, what, ": expected c, tbb, cuda or auto, got '", text, "'");
}

void set_backend(Overrides& o, const std::string& text, const std::string& what) {
  BackendKind kind{};
  if (parse_backend_or_auto(text, what, kind)) o.backend = kind, o.backend_auto = false;
  else o.backend.reset(), o.backend_auto = true;
}
void set_op_backend(Overrides& o, Op op, const std::string& text, const std::string& what) {
  BackendKind kind{};
  if (parse_backend_or_auto(text, what, kind)) o.per_op[op] = kind, o.per_op_auto.erase(op);
  else o.per_op.erase(op), o.per_op_auto.insert(op);
}
void set_simd(Overrides& o, const std::string& text, const std::string& what) {
  if (text == "auto" || text.empty()) o.simd.reset(), o.simd_auto = true;
  else o.simd = parse_simd_level(text, what), o.simd_auto = false;
}
void set_threads(Overrides& o, const std::string& text, const std::string& what) {
  char* end = nullptr;
  const long v = text == "auto" ? 0 : std::strtol(text.c_str(), &end, 10);
  if (text != "auto" && (text.empty() || *end || v < 0 || v > 4096))
    fail(ErrorKind::invalid_argument, what, ": expected a thread count 0..4096 or auto, got '", text, "'");
  o.threads = int(v), o.threads_auto = v == 0;
}
void set_profile(Overrides& o, const std::string& text) {
  if (text == "auto" || text.empty()) o.profile_path.clear(), o.profile_auto = true;
  else o.profile_path = text, o.profile_auto = false;
}
}  // namespace

void Overrides::set(const std::string& setting, const std::string& text, const std::string& what) {
  if (setting == "backend") return set_backend(*this, text, what);
  if (setting == "simd") return set_simd(*this, text, what);
  if (setting == "threads") return set_threads(*this, text, what);
  if (setting == "profile") return set_profile(*this, text);
  if (setting.rfind("ops.", 0) == 0) return set_op_backend(*this, parse_op(setting.substr(4), what), text, what);
  fail(ErrorKind::invalid_argument, what, ": unknown dispatch setting '", setting, "' (expected backend, ops.<op>, simd, threads or profile)");
}

Overrides overrides_from_env() {
  Overrides o;
  o.source = "environment";
  for (const char* setting : {"backend", "simd", "threads", "profile"}) {
    std::string name = "HYBRIT_" + std::string(setting);
    for (auto& ch : name) ch = char(std::toupper(ch));
    if (const char* v = std::getenv(name.c_str()); v && *v) o.set(setting, v, name);
  }
  return o;
}

Overrides overrides_from_section(const YAML::Node& section, const std::string& key, const schema::Origins& origins) {
  using namespace schema;
  Overrides o;
  o.source = cat(origins.file, " (", key, " section)");
  auto at = [&](const YAML::Node& n, const std::string& k) { return cat(origins.where(n, k), ": ", k); };
  auto setting = [&](const char* name) {
    return [&, name](const YAML::Node& n, const std::string& k) { o.set(name, as_string(n, k, origins), at(n, k)); };
  };
  walk(section, key, origins, {
    {"backend", setting("backend")}, {"simd", setting("simd")}, {"threads", setting("threads")}, {"profile", setting("profile")},
    {"ops", [&](const YAML::Node& ops, const std::string& k) {
       if (!ops.IsMap()) bad(origins.where(ops, k), k, cat("expected a mapping of op: backend, got ", scalar_text(ops)));
       std::map<std::string, Handler> handlers;
       for (int i = 0; i < kOpCount; ++i)
         handlers[to_string(Op(i))] = [&, name = std::string("ops.") + to_string(Op(i))](const YAML::Node& n, const std::string& ok) {
           o.set(name, as_string(n, ok, origins), at(n, ok));
         };
       walk(ops, k, origins, handlers);
     }},
  });
  return o;
}

Overrides overrides_from_yaml(const std::string& yaml_text, const std::string& file) {
  schema::Origins origins;
  const YAML::Node root = schema::load_yaml(yaml_text, file, {}, origins);
  const YAML::Node section = root["dispatch"];
  if (!section.IsDefined() || section.IsNull()) return {};
  return overrides_from_section(section, "dispatch", origins);
}

Overrides overrides_from_yaml_file(const std::string& path) { return overrides_from_yaml(schema::read_config_file(path), path); }

Overrides resolve_overrides(const DispatcherOptions& sources) {
  Overrides resolved;  // the built-in defaults: nothing forced
  resolved.merge(sources.config_section);
  if (!sources.config_path.empty()) resolved.merge(overrides_from_yaml_file(sources.config_path));
  if (sources.use_environment) resolved.merge(overrides_from_env());
  Overrides caller = sources.overrides;
  if (caller.source.empty()) caller.source = "argument";
  resolved.merge(caller);
  return resolved;
}

// ------------------------------------------------------------------ policy

void Policy::validate() const {
  auto check = [&](BackendKind kind, const std::string& what) {
    if (!available[int(kind)])
      fail(ErrorKind::unsupported, what, " forces the ", to_string(kind), " backend, which is not available: ", unavailable_reason[int(kind)]);
  };
  if (overrides.backend) check(*overrides.backend, cat(overrides.source.empty() ? "an override" : overrides.source));
  for (const auto& [op, kind] : overrides.per_op) check(kind, cat(overrides.source.empty() ? "an override" : overrides.source, " (op ", to_string(op), ")"));
}

Decision Policy::choose(const OpSize& size, Device data, bool explain) const {
  Decision d;
  d.predicted_seconds.fill(kNaN);
  std::optional<BackendKind> forced;
  if (auto it = overrides.per_op.find(size.op); it != overrides.per_op.end()) forced = it->second;
  else if (overrides.backend) forced = overrides.backend;
  const bool predict_all = !forced || explain;
  for (int b = 0; b < kBackendCount && predict_all; ++b) {
    if (!available[b] || !has_kernel[int(size.op)][b]) continue;
    // CPU backends cannot read device memory, so device data stays where it is.
    if (BackendKind(b) != BackendKind::cuda && data.is_cuda()) continue;
    double t = profile.predict(size.op, BackendKind(b), size.work);
    // A GPU computing on host data pays the trip there and back.
    if (BackendKind(b) == BackendKind::cuda && data.is_cpu()) t += size.transfer_bytes / (profile.transfer_gbps * 1e9) + 2 * profile.transfer_latency_s;
    d.predicted_seconds[b] = t;
  }
  if (forced) {
    const std::string source = overrides.source.empty() ? "an override" : overrides.source;
    if (!available[int(*forced)]) fail(ErrorKind::unsupported, to_string(size.op), ": the ", to_string(*forced), " backend is forced but not available: ", unavailable_reason[int(*forced)]);
    if (!has_kernel[int(size.op)][int(*forced)])
      fail(ErrorKind::unsupported, to_string(size.op), ": the ", to_string(*forced), " backend is forced but has no kernel for this op");
    if (data.is_cuda() && *forced != BackendKind::cuda)
      fail(ErrorKind::invalid_argument, to_string(size.op), ": data is on ", data.str(), " but the ", to_string(*forced), " backend is forced, and it computes on the host");
    d.backend = *forced;
    d.forced = true;
    if (explain) d.reason = cat("forced by ", source);
    return d;
  }
  if (data.is_cuda()) {
    if (!available[int(BackendKind::cuda)]) fail(ErrorKind::unsupported, to_string(size.op), ": data is on ", data.str(), " but the CUDA backend is not available");
    if (!has_kernel[int(size.op)][int(BackendKind::cuda)])
      fail(ErrorKind::unsupported, to_string(size.op), ": data is on ", data.str(), " but the CUDA backend has no kernel for this op; copy it with .to(cpu)");
    d.backend = BackendKind::cuda;
    if (explain) d.reason = cat("data is on ", data.str());
    return d;
  }
  int best = -1;
  for (int b = 0; b < kBackendCount; ++b)
    if (std::isfinite(d.predicted_seconds[b]) && (best < 0 || d.predicted_seconds[b] < d.predicted_seconds[best])) best = b;
  if (best < 0) fail(ErrorKind::unsupported, to_string(size.op), ": no backend available");
  // Near-ties go to c (kTieMargin): a flip between nearly equal backends should not cost a thread start-up.
  const double c_time = d.predicted_seconds[int(BackendKind::c)];
  if (std::isfinite(c_time) && c_time <= kTieMargin * d.predicted_seconds[best]) best = int(BackendKind::c);
  d.backend = BackendKind(best);
  if (explain) {
    std::string why = "predicted";
    for (int b = 0; b < kBackendCount; ++b)
      why += available[b] ? cat(" ", to_string(BackendKind(b)), " ", format_seconds(d.predicted_seconds[b]), b == int(BackendKind::cuda) ? " incl. transfer" : "")
                          : cat(" (", to_string(BackendKind(b)), " unavailable)");
    d.reason = why + cat(" [profile: ", profile.source, "]");
  }
  return d;
}

// ------------------------------------------------------------------ metrics

void Metrics::record(Op op, BackendKind backend, double elements, double bytes, double seconds) {
  std::lock_guard lock(mutex_);
  MetricsRow& r = rows_[int(op)][int(backend)];
  r.calls += 1;
  r.elements += elements;
  r.bytes += bytes;
  r.seconds += seconds;
}

MetricsRow Metrics::get(Op op, BackendKind backend) const {
  std::lock_guard lock(mutex_);
  return rows_[int(op)][int(backend)];
}

void Metrics::reset() {
  std::lock_guard lock(mutex_);
  rows_ = {};
}

std::string Metrics::table() const {
  std::lock_guard lock(mutex_);
  std::string out;
  char line[200];
  for (int o = 0; o < kOpCount; ++o)
    for (int b = 0; b < kBackendCount; ++b) {
      const MetricsRow& r = rows_[o][b];
      if (!r.calls) continue;
      if (out.empty()) {
        std::snprintf(line, sizeof line, "%-20s %-5s %8s %12s %12s %10s\n", "op", "backend", "calls", "elements", "bytes", "seconds");
        out += line;
      }
      std::snprintf(line, sizeof line, "%-20s %-5s %8lld %12.4g %12.4g %10.4f\n", to_string(Op(o)), to_string(BackendKind(b)),
                    static_cast<long long>(r.calls), r.elements, r.bytes, r.seconds);
      out += line;
    }
  return out;
}

// ------------------------------------------------------------------ dispatcher

Dispatcher::Dispatcher(const DispatcherOptions& options) {
  const Overrides ov = resolve_overrides(options);

  policy_.hardware = hardware();
  policy_.overrides = ov;
  conditions_.fingerprint = policy_.hardware.fingerprint();
  conditions_.simd = ov.simd.value_or(policy_.hardware.best_simd());
  conditions_.threads = ov.threads > 0 ? ov.threads : policy_.hardware.granted_cpus;
  backends_[int(BackendKind::c)] = make_c_backend(conditions_.simd);
  backends_[int(BackendKind::tbb)] = make_tbb_backend(conditions_.simd, conditions_.threads);
  std::string why;
  backends_[int(BackendKind::cuda)] = make_cuda_backend(&why);
  for (int b = 0; b < kBackendCount; ++b) {
    policy_.available[b] = backends_[b] != nullptr;
    for (int o = 0; o < kOpCount && backends_[b]; ++o) policy_.has_kernel[o][b] = backends_[b]->supports(Op(o));
  }
  policy_.unavailable_reason[int(BackendKind::cuda)] = why;
  policy_.profile = load_profile(ov.profile_path.empty() ? default_profile_path() : ov.profile_path, !ov.profile_path.empty(), policy_.hardware,
                                 conditions_);
  policy_.validate();
  // Host loops run where a forced CPU backend says, else on tbb's arena (HYBRIT_THREADS applies).
  host_loops_ = backends_[int(ov.backend == BackendKind::c ? BackendKind::c : BackendKind::tbb)].get();
  if (verbose())
    log_info("dispatcher: c = ", backends_[0]->describe(), "; tbb = ", backends_[1]->describe(), "; cuda = ",
             backends_[2] ? backends_[2]->describe() : "unavailable (" + why + ")", "; profile: ", policy_.profile.source);
}

Backend& Dispatcher::backend(BackendKind kind) {
  if (!backends_[int(kind)]) fail(ErrorKind::unsupported, "the ", to_string(kind), " backend is not available: ", policy_.unavailable_reason[int(kind)]);
  return *backends_[int(kind)];
}

template <class Run>
auto Dispatcher::route(const OpSize& size, Device data, const Run& run) {
  const bool explain = verbose();
  const Decision d = policy_.choose(size, data, explain);
  if (explain) {
    const std::string line = cat("dispatch ", to_string(size.op), " ", size.label(), " (data on ", data.str(), ") -> ", to_string(d.backend), ": ", d.reason);
    bool first = true;
    if (!verbose_every_call()) {
      std::lock_guard<std::mutex> lock(explained_mutex_);
      first = explained_.insert(line).second;
    }
    if (first) log_info(line, verbose_every_call() ? "" : " (logged once; HYBRIT_VERBOSE=all logs every call)");
  }
  Backend& b = *backends_[int(d.backend)];
  Timer timer;
  if constexpr (std::is_void_v<decltype(run(b))>) {
    run(b);
    metrics_.record(size.op, d.backend, size.work, size.touched_bytes, timer.seconds());
  } else {
    auto result = run(b);
    metrics_.record(size.op, d.backend, size.work, size.touched_bytes, timer.seconds());
    return result;
  }
}

float Dispatcher::quantize_ternary(const Tensor& w, Tensor& q) {
  return route(op_size(Op::quantize_ternary, w.numel()), w.device(), [&](Backend& b) { return b.quantize_ternary(w, q); });
}

void Dispatcher::quantize_int8_rows(const Tensor& x, Tensor& q, Tensor& scales) {
  const auto [rows, cols] = as_matrix(x);
  route(op_size(Op::quantize_int8_rows, rows, cols), x.device(), [&](Backend& b) { b.quantize_int8_rows(x, q, scales); });
}

void Dispatcher::pack_ternary(const Tensor& q, Tensor& packed) {
  const auto [rows, cols] = as_matrix(q);
  route(op_size(Op::pack_ternary, rows, cols), q.device(), [&](Backend& b) { b.pack_ternary(q, packed); });
}

void Dispatcher::unpack_ternary(const Tensor& packed, Tensor& q) {
  const auto [rows, cols] = as_matrix(q);
  route(op_size(Op::unpack_ternary, rows, cols), packed.device(), [&](Backend& b) { b.unpack_ternary(packed, q); });
}

void Dispatcher::matmul(const Tensor& a, const Tensor& b, Tensor& c, const MatmulArgs& args) {
  const auto [ar, ac] = as_matrix(a);
  const auto [br, bc] = as_matrix(b);
  const int64_t m = args.trans_a ? ac : ar, k = args.trans_a ? ar : ac, n = args.trans_b ? br : bc;
  route(op_size(Op::matmul, m, n, k), a.device(), [&](Backend& be) { be.matmul(a, b, c, args); });
}

void Dispatcher::matmul_ternary(const Tensor& xq, const Tensor& x_scales, const Tensor& w_packed, float w_scale, Tensor& y) {
  const auto [m, k] = as_matrix(xq);
  route(op_size(Op::matmul_ternary, m, as_matrix(w_packed).first, k), xq.device(),
        [&](Backend& b) { b.matmul_ternary(xq, x_scales, w_packed, w_scale, y); });
}

void Dispatcher::kmeans_assign(const Tensor& x, const Tensor& centroids, Tensor& labels, Tensor& dist) {
  const auto [n, d] = as_matrix(x);
  route(op_size(Op::kmeans_assign, n, as_matrix(centroids).first, d), x.device(), [&](Backend& b) { b.kmeans_assign(x, centroids, labels, dist); });
}

void Dispatcher::kmeans_update(const Tensor& x, const Tensor& labels, Tensor& sums, Tensor& counts) {
  const auto [n, d] = as_matrix(x);
  route(op_size(Op::kmeans_update, n, as_matrix(sums).first, d), x.device(), [&](Backend& b) { b.kmeans_update(x, labels, sums, counts); });
}

void Dispatcher::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& shape, Tensor& out, Tensor& lse) {
  route(op_size(Op::attention_forward, shape.batch * shape.heads, shape.seq, shape.head_dim), q.device(),
        [&](Backend& b) { b.attention_forward(q, k, v, shape, out, lse); });
}

void Dispatcher::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& lse,
                                    const AttentionShape& shape, Tensor& dq, Tensor& dk, Tensor& dv) {
  route(op_size(Op::attention_backward, shape.batch * shape.heads, shape.seq, shape.head_dim), q.device(),
        [&](Backend& b) { b.attention_backward(q, k, v, out, dout, lse, shape, dq, dk, dv); });
}

void Dispatcher::parallel_for(int64_t n, int64_t grain, const RangeBody& body) { host_loops_->parallel_for(n, grain, body); }

}  // namespace hybrit
