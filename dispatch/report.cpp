#include "dispatch/report.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_reduce.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>

#include "core/log.hpp"
#include "core/rng.hpp"

namespace hybrit {

namespace {

using json = nlohmann::json;


// Median of repeated timings after one warm-up call: at least 3 runs, until `budget` seconds.
double time_median(const std::function<void()>& fn, double budget) {
  fn();
  std::vector<double> t;
  Timer total;
  while (t.size() < 3 || (total.seconds() < budget && t.size() < 50)) {
    Timer one;
    fn();
    t.push_back(one.seconds());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

Tensor random_tensor(Shape shape, uint64_t stream, float lo = -1.0f, float hi = 1.0f) {
  Tensor t = Tensor::empty(std::move(shape), DType::f32);
  Rng rng(20261121, stream);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = rng.uniform(lo, hi);
  return t;
}

}  // namespace

OpCase make_op_case(Op op, int64_t a, int64_t b, int64_t c) {
  OpCase cs{op_size(op, a, b, c), {}, {}};
  // Each call runs through `call` on either a Backend or a Dispatcher (same signatures).
  auto both = [&cs](auto call) {
    cs.on_backend = [call](Backend& be) { call(be); };
    cs.routed = [call](Dispatcher& d) { call(d); };
  };
  switch (op) {
    case Op::quantize_ternary: {
      auto w = std::make_shared<Tensor>(random_tensor({a}, 1));
      auto q = std::make_shared<Tensor>(Tensor::empty({a}, DType::i8));
      both([w, q](auto& x) { x.quantize_ternary(*w, *q); });
      break;
    }
    case Op::quantize_int8_rows: {
      auto x = std::make_shared<Tensor>(random_tensor({a, b}, 2));
      auto q = std::make_shared<Tensor>(Tensor::empty({a, b}, DType::i8));
      auto s = std::make_shared<Tensor>(Tensor::empty({a}, DType::f32));
      both([x, q, s](auto& be) { be.quantize_int8_rows(*x, *q, *s); });
      break;
    }
    case Op::pack_ternary:
    case Op::unpack_ternary: {
      auto q = std::make_shared<Tensor>(Tensor::empty({a, b}, DType::i8));
      Rng rng(7, 3);
      int8_t* codes = q->data<int8_t>();
      for (int64_t i = 0; i < q->numel(); ++i) codes[i] = int8_t(int(rng.below(3)) - 1);
      auto p = std::make_shared<Tensor>(Tensor::empty({a, (b + 3) / 4}, DType::ternary2));
      make_c_backend(SimdLevel::scalar)->pack_ternary(*q, *p);  // valid codes for unpack
      if (op == Op::pack_ternary) both([q, p](auto& be) { be.pack_ternary(*q, *p); });
      else both([q, p](auto& be) { be.unpack_ternary(*p, *q); });
      break;
    }
    case Op::matmul: {
      auto x = std::make_shared<Tensor>(random_tensor({a, c}, 4));
      auto y = std::make_shared<Tensor>(random_tensor({c, b}, 5));
      auto z = std::make_shared<Tensor>(Tensor::empty({a, b}, DType::f32));
      both([x, y, z](auto& be) { be.matmul(*x, *y, *z, MatmulArgs{}); });
      break;
    }
    case Op::matmul_ternary: {
      auto xq = std::make_shared<Tensor>(Tensor::empty({a, c}, DType::i8));
      auto scales = std::make_shared<Tensor>(Tensor::empty({a}, DType::f32));
      auto w = std::make_shared<Tensor>(Tensor::empty({b, (c + 3) / 4}, DType::ternary2));
      Rng rng(11, 4);
      int8_t* xq_values = xq->data<int8_t>();
      float* scale_values = scales->data<float>();
      uint8_t* w_codes = w->data<uint8_t>();
      for (int64_t i = 0; i < xq->numel(); ++i) xq_values[i] = int8_t(int(rng.below(255)) - 127);
      for (int64_t i = 0; i < a; ++i) scale_values[i] = 1.0f + rng.uniform();
      for (int64_t i = 0; i < w->numel(); ++i) w_codes[i] = uint8_t(rng.below(3) | rng.below(3) << 2 | rng.below(3) << 4 | rng.below(3) << 6);
      auto y = std::make_shared<Tensor>(Tensor::empty({a, b}, DType::f32));
      both([xq, scales, w, y](auto& be) { be.matmul_ternary(*xq, *scales, *w, 0.5f, *y); });
      break;
    }
    case Op::attention_forward:
    case Op::attention_backward: {
      // a = batch * heads as `a` sequences of one head each (the kernel's unit of work).
      const AttentionShape sh{a, b, 1, 1, c, float(1.0 / std::sqrt(double(c)))};
      auto q = std::make_shared<Tensor>(random_tensor({a * b, c}, 12));
      auto k = std::make_shared<Tensor>(random_tensor({a * b, c}, 13));
      auto v = std::make_shared<Tensor>(random_tensor({a * b, c}, 14));
      auto out = std::make_shared<Tensor>(Tensor::empty({a * b, c}, DType::f32));
      auto lse = std::make_shared<Tensor>(Tensor::empty({a * b}, DType::f32));
      make_c_backend(cpu_hardware().best_simd())->attention_forward(*q, *k, *v, sh, *out, *lse);
      if (op == Op::attention_forward) {
        both([q, k, v, out, lse, sh](auto& be) { be.attention_forward(*q, *k, *v, sh, *out, *lse); });
      } else {
        auto dout = std::make_shared<Tensor>(random_tensor({a * b, c}, 15));
        auto dq = std::make_shared<Tensor>(Tensor::empty({a * b, c}, DType::f32));
        auto dk = std::make_shared<Tensor>(Tensor::empty({a * b, c}, DType::f32));
        auto dv = std::make_shared<Tensor>(Tensor::empty({a * b, c}, DType::f32));
        both([q, k, v, out, lse, dout, dq, dk, dv, sh](auto& be) { be.attention_backward(*q, *k, *v, *out, *dout, *lse, sh, *dq, *dk, *dv); });
      }
      break;
    }
    case Op::kmeans_assign:
    case Op::kmeans_update: {
      auto x = std::make_shared<Tensor>(random_tensor({a, c}, 6));
      auto cen = std::make_shared<Tensor>(random_tensor({b, c}, 7));
      auto labels = std::make_shared<Tensor>(Tensor::empty({a}, DType::i32));
      Rng rng(9, 9);
      int32_t* label_values = labels->data<int32_t>();
      for (int64_t i = 0; i < a; ++i) label_values[i] = int32_t(rng.below(uint64_t(b)));
      if (op == Op::kmeans_assign) {
        auto dist = std::make_shared<Tensor>(Tensor::empty({a}, DType::f32));
        both([x, cen, labels, dist](auto& be) { be.kmeans_assign(*x, *cen, *labels, *dist); });
      } else {
        auto sums = std::make_shared<Tensor>(Tensor::empty({b, c}, DType::f64));
        auto counts = std::make_shared<Tensor>(Tensor::empty({b}, DType::i64));
        both([x, labels, sums, counts](auto& be) { be.kmeans_update(*x, *labels, *sums, *counts); });
      }
      break;
    }
  }
  return cs;
}

namespace {

using Dims = std::array<int64_t, 3>;

std::vector<Dims> ladder(Op op, bool quick) {
  switch (op) {
    case Op::quantize_ternary:
      return quick ? std::vector<Dims>{{4096, 1, 1}, {65536, 1, 1}, {1 << 20, 1, 1}, {1 << 24, 1, 1}}
                   : std::vector<Dims>{{1024, 1, 1}, {16384, 1, 1}, {262144, 1, 1}, {1 << 22, 1, 1}, {1 << 24, 1, 1}, {1 << 26, 1, 1}};
    case Op::quantize_int8_rows:
      return quick ? std::vector<Dims>{{1, 4096, 1}, {16, 4096, 1}, {256, 4096, 1}, {2048, 4096, 1}}
                   : std::vector<Dims>{{1, 4096, 1}, {8, 4096, 1}, {64, 4096, 1}, {512, 4096, 1}, {4096, 4096, 1}};
    case Op::pack_ternary:
    case Op::unpack_ternary:
      return quick ? std::vector<Dims>{{1, 4096, 1}, {64, 4096, 1}, {1024, 4096, 1}, {4096, 4096, 1}}
                   : std::vector<Dims>{{1, 4096, 1}, {16, 4096, 1}, {256, 4096, 1}, {4096, 4096, 1}, {16384, 4096, 1}};
    case Op::matmul:
      return quick ? std::vector<Dims>{{32, 32, 32}, {64, 64, 64}, {128, 128, 128}, {256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}}
                   : std::vector<Dims>{{16, 16, 16}, {32, 32, 32}, {64, 64, 64}, {128, 128, 128}, {256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}, {2048, 2048, 2048}};
    case Op::matmul_ternary:  // decode (a few rows) to prefill (many) against a 2048 or 4096 square layer
      return quick ? std::vector<Dims>{{1, 2048, 2048}, {8, 2048, 2048}, {64, 2048, 2048}}
                   : std::vector<Dims>{{1, 2048, 2048}, {1, 4096, 4096}, {8, 4096, 4096}, {16, 4096, 4096}, {256, 4096, 4096}};
    case Op::kmeans_assign:
      return quick ? std::vector<Dims>{{256, 256, 64}, {4096, 256, 64}, {65536, 256, 64}}
                   : std::vector<Dims>{{256, 256, 64}, {4096, 256, 64}, {65536, 256, 64}, {262144, 256, 64}};
    case Op::kmeans_update:
      return quick ? std::vector<Dims>{{1024, 256, 64}, {16384, 256, 64}, {262144, 256, 64}}
                   : std::vector<Dims>{{1024, 256, 64}, {16384, 256, 64}, {262144, 256, 64}, {1 << 20, 256, 64}};
    case Op::attention_forward:  // (sequences x heads, context, head_dim): sampling one sequence to a training batch
    case Op::attention_backward:
      return quick ? std::vector<Dims>{{1, 64, 64}, {6, 256, 64}, {48, 1024, 64}}
                   : std::vector<Dims>{{1, 64, 64}, {4, 256, 64}, {48, 256, 64}, {48, 1024, 64}, {6, 4096, 64}};
  }
  return {};
}

// Machine ceilings, measured on all granted CPUs: streaming read and copy bandwidth over a buffer
// well past the last-level cache, and the best GEMM rate among the CPU backends.
json measure_ceilings(Dispatcher& dispatcher, bool quick, const HardwareInfo& hw) {
  const size_t bytes = std::max<size_t>(quick ? (256ull << 20) : (512ull << 20), 4 * hw.l3_bytes);
  const size_t words = bytes / 8;
  std::vector<uint64_t> src(words), dst(words);
  tbb::task_arena arena(hw.granted_cpus);
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, words), [&](const auto& r) {
      for (size_t i = r.begin(); i != r.end(); ++i) src[i] = i * 0x9E3779B97F4A7C15ull, dst[i] = 0;
    });
  });
  const double budget = quick ? 0.4 : 1.5;
  volatile uint64_t sink = 0;
  const double read_s = time_median([&] {
    arena.execute([&] {
      sink = tbb::parallel_reduce(tbb::blocked_range<size_t>(0, words, 1 << 16), uint64_t(0), [&](const auto& r, uint64_t acc) {
        for (size_t i = r.begin(); i != r.end(); ++i) acc += src[i];
        return acc;
      }, std::plus<uint64_t>());
    });
  }, budget);
  const double copy_s = time_median([&] {
    arena.execute([&] {
      tbb::parallel_for(tbb::blocked_range<size_t>(0, words, 1 << 16), [&](const auto& r) {
        std::memcpy(dst.data() + r.begin(), src.data() + r.begin(), (r.end() - r.begin()) * 8);
      });
    });
  }, budget);
  const double read_gbps = bytes / read_s / 1e9, copy_gbps = 2.0 * bytes / copy_s / 1e9;
  const int64_t n = quick ? 768 : 1024;
  OpCase gemm = make_op_case(Op::matmul, n, n, n);
  double best_gflops = 0;
  std::string gemm_backend;
  for (BackendKind kind : {BackendKind::c, BackendKind::tbb}) {
    const double t = time_median([&] { gemm.on_backend(dispatcher.backend(kind)); }, budget);
    if (gemm.size.flops / t / 1e9 > best_gflops) best_gflops = gemm.size.flops / t / 1e9, gemm_backend = to_string(kind);
  }
  return {{"buffer_bytes", bytes}, {"read_gbps", read_gbps}, {"copy_gbps", copy_gbps}, {"memory_gbps", std::max(read_gbps, copy_gbps)},
          {"gemm_gflops", best_gflops}, {"gemm_size", n}, {"gemm_backend", gemm_backend}};
}

constexpr int kCeilingRuns = 4;  // ceiling measurements at most: the first, and up to three after the ops

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}


}  // namespace

std::vector<std::array<int64_t, 3>> report_ladder(Op op, bool quick) { return ladder(op, quick); }

bool ceilings_agree(const json& a, const json& b) {
  for (const char* key : {"memory_gbps", "gemm_gflops"}) {
    const double x = a.at(key).get<double>(), y = b.at(key).get<double>();
    if (!(x > 0 && y > 0) || std::max(x, y) > kCeilingTolerance * std::min(x, y)) return false;
  }
  return true;
}

nlohmann::json metrics_json(const Metrics& metrics) {
  nlohmann::json out = nlohmann::json::object();
  for (int op = 0; op < kOpCount; ++op)
    for (int b = 0; b < kBackendCount; ++b) {
      const MetricsRow r = metrics.get(Op(op), BackendKind(b));
      if (r.calls)
        out[to_string(Op(op))][to_string(BackendKind(b))] = {{"calls", r.calls}, {"elements", r.elements}, {"bytes", r.bytes}, {"seconds", r.seconds}};
    }
  return out;
}

json hardware_json(const HardwareInfo& hw) {
  json isa = json::object();
  for (auto [name, on] : hw.isa_flags()) isa[name] = on;
  json gpus = json::array();
  for (const auto& d : hw.cuda_devices)
    gpus.push_back({{"index", d.index}, {"name", d.name}, {"compute_capability", cat(d.compute_major, ".", d.compute_minor)},
                    {"memory_bytes", d.memory_bytes}, {"multiprocessors", d.multiprocessors}});
  return {{"cpu", hw.cpu_model},
          {"isa", isa},
          {"simd", to_string(hw.best_simd())},
          {"logical_cpus", hw.logical_cpus},
          {"physical_cores", hw.physical_cores},
          {"granted_cpus", hw.granted_cpus},
          {"cache_bytes", {{"l1d", hw.l1d_bytes}, {"l2", hw.l2_bytes}, {"l3", hw.l3_bytes}}},
          {"memory_bytes", {{"total", hw.memory_total_bytes}, {"available", hw.memory_available_bytes}}},
          {"cuda_devices", gpus},
          {"cuda_status", hw.cuda_status},
          {"cuda_backend_built", cuda_backend_built()},
          {"fingerprint", hw.fingerprint()}};
}

json run_dispatch_report(Dispatcher& dispatcher, const ReportOptions& options) {
  const HardwareInfo& hw = dispatcher.policy().hardware;
  std::vector<Op> ops = options.ops;
  if (ops.empty())
    for (int o = 0; o < kOpCount; ++o) ops.push_back(Op(o));
  std::vector<BackendKind> backends;
  json backends_json = json::object();
  for (int b = 0; b < kBackendCount; ++b) {
    if (dispatcher.available(BackendKind(b))) {
      backends.push_back(BackendKind(b));
      backends_json[to_string(BackendKind(b))] = dispatcher.backend(BackendKind(b)).describe();
    } else {
      backends_json[to_string(BackendKind(b))] = "unavailable: " + dispatcher.policy().unavailable_reason[b];
    }
  }

  json report;
  report["hardware"] = hardware_json(hw);
  report["backends"] = backends_json;
  report["quick"] = options.quick;
  report["profile_in_force"] = dispatcher.policy().profile.source;
  report["conditions"] = dispatcher.conditions().str();

  size_t cells = 0;
  for (Op op : ops) cells += ladder(op, options.quick).size() * backends.size();
  ProgressBar bar("dispatch-report", int64_t(cells) + 1);
  if (!options.progress) bar.finish();
  bar.update(0, "measuring ceilings");
  // The ceilings are measured before the ops and again after them (a busy machine can move them
  // several-fold in minutes); see the stability check after the loop.
  json ceiling_runs = json::array({measure_ceilings(dispatcher, options.quick, hw)});
  // Enough repeats that the median is stable on a noisy machine; the profile is built from these.
  const double cell_budget = options.quick ? 0.2 : 0.5;

  int64_t done = 1;
  json ops_json = json::array();
  for (Op op : ops) {
    const bool compute = is_compute_bound(op);
    json rows = json::array();
    for (const Dims& dims : ladder(op, options.quick)) {
      OpCase cs = make_op_case(op, dims[0], dims[1], dims[2]);
      json times = json::object(), rates = json::object();
      double best = INFINITY;
      std::string winner;
      for (BackendKind kind : backends) {
        bar.update(done++, cat(to_string(op), " ", cs.size.label(), " on ", to_string(kind)));
        if (!dispatcher.backend(kind).supports(op)) continue;  // no kernel: no time, and never auto's pick
        const double t = time_median([&] { cs.on_backend(dispatcher.backend(kind)); }, cell_budget);
        const double rate = compute ? cs.size.flops / t / 1e9 : cs.size.touched_bytes / t / 1e9;
        times[to_string(kind)] = t;
        rates[to_string(kind)] = rate;
        if (t < best) best = t, winner = to_string(kind);
      }
      const Decision chosen = dispatcher.choose(cs.size, Device::cpu());
      // What auto's pick costs against the winner, by these measurements (1 when it is the winner).
      const double auto_loss = times.value(to_string(chosen.backend), INFINITY) / best;
      rows.push_back({{"size", cs.size.label()}, {"work", cs.size.work}, {"seconds", times}, {"rate", rates},
                      {"winner", winner}, {"auto", to_string(chosen.backend)}, {"auto_loss", auto_loss}});
    }
    // Crossovers: the first ladder size at which the winner changes.
    json crossovers = json::array();
    for (size_t i = 1; i < rows.size(); ++i)
      if (rows[i]["winner"] != rows[i - 1]["winner"])
        crossovers.push_back({{"from", rows[i - 1]["winner"]}, {"to", rows[i]["winner"]}, {"between", rows[i - 1]["size"]}, {"and", rows[i]["size"]}});
    ops_json.push_back({{"op", to_string(op)}, {"unit", compute ? "GFLOP/s" : "GB/s"}, {"rows", rows}, {"crossovers", crossovers}});
  }
  bar.finish();
  // Stable ceilings: the runs so far agree within kCeilingTolerance, or up to kCeilingRuns runs are
  // taken. The ceiling used is the best run (what the machine can do when nothing else runs).
  auto spread = [&](const char* key) {
    double lo = INFINITY, hi = 0;
    for (const auto& c : ceiling_runs) lo = std::min(lo, c[key].get<double>()), hi = std::max(hi, c[key].get<double>());
    return lo > 0 ? hi / lo : INFINITY;
  };
  auto stable = [&] { return ceilings_agree(ceiling_runs[ceiling_runs.size() - 2], ceiling_runs.back()); };
  do ceiling_runs.push_back(measure_ceilings(dispatcher, options.quick, hw));
  while (!stable() && ceiling_runs.size() < size_t(kCeilingRuns));
  json ceilings = ceiling_runs[0];
  for (const auto& c : ceiling_runs)
    for (const char* key : {"read_gbps", "copy_gbps", "memory_gbps", "gemm_gflops"})
      ceilings[key] = std::max(ceilings[key].get<double>(), c[key].get<double>());
  report["ceilings"] = ceilings;
  report["ceiling_runs"] = ceiling_runs;
  const bool noisy = !stable();
  report["too_noisy"] = noisy;
  report["noise_note"] = !noisy ? std::string()
                                : cat("the machine is too noisy to trust these timings: ", ceiling_runs.size(), " measurements of the ceilings disagree by up to ",
                                      fmt("%.1f", spread("memory_gbps")), "x (memory) and ", fmt("%.1f", spread("gemm_gflops")),
                                      "x (GEMM); run it again when the machine is idle");
  for (auto& o : ops_json) {
    const double ceiling = o["unit"] == "GFLOP/s" ? ceilings["gemm_gflops"].get<double>() : ceilings["memory_gbps"].get<double>();
    for (auto& row : o["rows"]) {
      json shares = json::object();
      for (const auto& [name, rate] : row["rate"].items()) shares[name] = ceiling > 0 ? rate.get<double>() / ceiling : 0.0;
      row["share_of_ceiling"] = shares;
    }
  }
  report["ops"] = ops_json;

  // ---- recommendations, in plain words
  json recs = json::array();
  // A miss: auto's pick measured more than the policy's 5% tie margin behind the winner.
  int mismatches = 0;
  double worst_loss = 1.0;
  std::string worst_case;
  for (const auto& o : ops_json)
    for (const auto& r : o["rows"]) {
      const double loss = r["auto_loss"].get<double>();
      if (loss <= kTieMargin) continue;
      ++mismatches;
      if (loss > worst_loss) worst_loss = loss, worst_case = cat(o["op"].get<std::string>(), " ", r["size"].get<std::string>());
    }
  if (mismatches == 0)
    recs.push_back(cat("Automatic routing with the profile in force (", dispatcher.policy().profile.source,
                       ") is within 5% of the measured winner at every size."));
  else
    recs.push_back(cat("With the profile in force (", dispatcher.policy().profile.source, "), automatic routing is more than 5% behind the measured winner at ",
                       mismatches, " sizes (worst: ", worst_case, ", ", fmt("%.2f", worst_loss), "x slower). Run `hybrit dispatch-report --save ",
                       default_profile_path(), "` so it follows these measurements."));
  // Thresholds, measured and in force: where the winner (or auto's pick) changes along the ladder.
  auto thresholds = [](const json& rows, const char* field) {
    std::string text = cat(rows[0][field].get<std::string>());
    for (size_t i = 1; i < rows.size(); ++i)
      if (rows[i][field] != rows[i - 1][field])
        text += cat(" up to ", rows[i - 1]["size"].get<std::string>(), ", ", rows[i][field].get<std::string>(), " from ", rows[i]["size"].get<std::string>());
    return text == rows[0][field].get<std::string>() ? text + " at every size" : text;
  };
  for (const auto& o : ops_json)
    recs.push_back(cat(o["op"].get<std::string>(), ": measured ", thresholds(o["rows"], "winner"), "; auto now uses ", thresholds(o["rows"], "auto"), "."));
  // Scaling: how far tbb gets beyond one core on the largest compute-bound case.
  for (const auto& o : ops_json) {
    if (o["op"] != "matmul") continue;
    const auto& last = o["rows"].back();
    if (last["seconds"].contains("c") && last["seconds"].contains("tbb")) {
      const double speedup = last["seconds"]["c"].get<double>() / last["seconds"]["tbb"].get<double>();
      recs.push_back(cat("Cores: matmul ", last["size"].get<std::string>(), " runs ", fmt("%.2f", speedup), "x faster on tbb (Eigen, ", hw.granted_cpus,
                         " threads) than on the single-thread C backend; compute-bound ops (matmul, kmeans_assign) grow with more cores, while "
                         "memory-bound ones (quantize, pack) are held by memory bandwidth (", fmt("%.1f", ceilings["memory_gbps"].get<double>()),
                         " GB/s measured), which more cores raise only up to the memory channels' limit."));
    }
  }
  if (!dispatcher.available(BackendKind::cuda)) {
    // What a GPU would take, by the built-in GPU model and the transfer cost on host data.
    Profile gpu = default_profile(hw);
    std::string moves;
    for (const auto& o : ops_json) {
      const Op op = parse_op(o["op"].get<std::string>(), "report");
      for (const auto& r : o["rows"]) {
        const double work = r["work"].get<double>();
        double cpu_best = INFINITY;
        for (const auto& [k, v] : r["seconds"].items()) cpu_best = std::min(cpu_best, v.get<double>());
        const Dims d = ladder(op, options.quick)[&r - &o["rows"][0]];
        const OpSize sz = op_size(op, d[0], d[1], d[2]);
        const double gpu_t = gpu.predict(op, BackendKind::cuda, work) + sz.transfer_bytes / (gpu.transfer_gbps * 1e9) + 2 * gpu.transfer_latency_s;
        if (gpu_t < cpu_best) {
          moves += cat(o["op"].get<std::string>(), " from ", r["size"].get<std::string>(), ", ");
          break;
        }
      }
    }
    recs.push_back(cat("CUDA: ", hw.cuda_status, ". With a GPU, by the built-in GPU model (",
                       "PCIe transfers included, data starting on the host): ", moves.empty() ? std::string("nothing measured here would move") : "would move " + moves.substr(0, moves.size() - 2),
                       "; memory-bound ops on host data stay on the CPU, because the trip over PCIe costs more than the work."));
  }
  if (report["too_noisy"].get<bool>()) recs.insert(recs.begin(), cat("Warning: ", report["noise_note"].get<std::string>(), " (--save refuses to write this profile)."));
  report["recommendations"] = recs;
  return report;
}

std::string format_report(const json& r) {
  std::string out;
  const auto& hw = r["hardware"];
  out += cat("hybrit dispatch-report", r["quick"].get<bool>() ? " (quick)" : "", "\n\n");
  out += cat("CPU      ", hw["cpu"].get<std::string>(), ", ", hw["simd"].get<std::string>(), ", ", hw["granted_cpus"].get<int>(), " CPUs granted, L3 ",
             format_bytes(hw["cache_bytes"]["l3"].get<double>()), ", memory ", format_bytes(hw["memory_bytes"]["total"].get<double>()), "\n");
  out += cat("CUDA     ", hw["cuda_status"].get<std::string>(), "\n");
  for (const auto& [name, text] : r["backends"].items()) out += cat("backend  ", name, ": ", text.get<std::string>(), "\n");
  const auto& c = r["ceilings"];
  out += cat("ceilings memory ", fmt("%.1f", c["memory_gbps"].get<double>()), " GB/s (read ", fmt("%.1f", c["read_gbps"].get<double>()), ", copy ",
             fmt("%.1f", c["copy_gbps"].get<double>()), ", all granted CPUs, ", format_bytes(c["buffer_bytes"].get<double>()), " buffer); GEMM ",
             fmt("%.1f", c["gemm_gflops"].get<double>()), " GFLOP/s (", c["gemm_backend"].get<std::string>(), ", n = ", c["gemm_size"].get<int>(), "); the best of ",
             r["ceiling_runs"].size(), " measurements, before and after the ops", r["too_noisy"].get<bool>() ? " (THEY DISAGREE: see the warning below)" : "", "\n");
  out += cat("profile  ", r["profile_in_force"].get<std::string>(), "\n");
  out += cat("measured ", r["conditions"].get<std::string>(), "\n");
  for (const auto& o : r["ops"]) {
    const std::string unit = o["unit"].get<std::string>();
    out += cat("\n", o["op"].get<std::string>(), "  (rate in ", unit, ", % of the measured ceiling)\n");
    std::vector<std::string> names;
    for (const auto& [name, _] : o["rows"][0]["seconds"].items()) names.push_back(name);
    char line[256];
    std::snprintf(line, sizeof line, "  %-22s", "size");
    out += line;
    for (const auto& n : names) {
      std::snprintf(line, sizeof line, " %26s", (n + " time / rate / %").c_str());
      out += line;
    }
    out += "  winner  auto\n";
    for (const auto& row : o["rows"]) {
      std::snprintf(line, sizeof line, "  %-22s", row["size"].get<std::string>().c_str());
      out += line;
      for (const auto& n : names) {
        std::snprintf(line, sizeof line, " %10s %8.2f %5.0f%%", format_seconds(row["seconds"][n].get<double>()).c_str(), row["rate"][n].get<double>(),
                      100 * row["share_of_ceiling"][n].get<double>());
        out += line;
      }
      const double loss = row["auto_loss"].get<double>();
      std::snprintf(line, sizeof line, "  %-6s  %-5s%s\n", row["winner"].get<std::string>().c_str(), row["auto"].get<std::string>().c_str(),
                    loss > kTieMargin ? fmt("  <- %.2fx slower", loss).c_str() : "");
      out += line;
    }
  }
  out += "\nRecommendations\n";
  for (const auto& rec : r["recommendations"]) out += cat("  - ", rec.get<std::string>(), "\n");
  return out;
}

Profile profile_from_report(const json& report, const Dispatcher& dispatcher) {
  Profile p = dispatcher.policy().profile;
  p.conditions = dispatcher.conditions();
  for (const auto& o : report["ops"]) {
    const Op op = parse_op(o["op"].get<std::string>(), "report");
    std::map<BackendKind, std::vector<ProfilePoint>> measured;
    for (const auto& row : o["rows"])
      for (const auto& [name, t] : row["seconds"].items()) measured[parse_backend(name, "report")].push_back({row["work"].get<double>(), t.get<double>()});
    for (auto& [kind, pts] : measured) p.points(op, kind) = std::move(pts);
  }
  return p;
}

void save_profile_from_report(const json& report, const Dispatcher& dispatcher, const std::string& path) {
  if (report.value("too_noisy", false))
    fail(ErrorKind::unsupported, "not saving a profile to ", path, ": ", report["noise_note"].get<std::string>());
  save_profile(profile_from_report(report, dispatcher), path);
}

}  // namespace hybrit
