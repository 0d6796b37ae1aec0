// Google Benchmark: the op table per backend, plain Eigen as the matmul baseline, and automatic
// routing against each fixed backend at every size of the report's quick ladder. Ratios are
// computed by the scripts in this folder from one run of this program.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/log.hpp"
#include "core/rng.hpp"
#include "dispatch/dispatcher.hpp"
#include "dispatch/report.hpp"

using namespace hybrit;

void eigen_plain_matmul(const float* a, const float* b, float* c, int n, int threads);

namespace {

Dispatcher& dispatcher_for(const std::string& mode) {
  static std::map<std::string, std::unique_ptr<Dispatcher>> cache;
  auto& d = cache[mode];
  if (!d) {
    DispatcherOptions o;  // the environment applies: HYBRIT_PROFILE names the measured profile
    if (mode != "auto") o.overrides.backend = parse_backend(mode, "benchmark mode");
    d = std::make_unique<Dispatcher>(o);
  }
  return *d;
}

void set_rates(benchmark::State& state, const OpSize& size) {
  if (size.flops > 0)
    state.counters["GFLOP/s"] = benchmark::Counter(size.flops, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  state.counters["GB/s"] = benchmark::Counter(size.touched_bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void register_op(Op op, const std::array<int64_t, 3>& dims, const std::string& mode) {
  const std::string name = cat("op/", to_string(op), "/", op_size(op, dims[0], dims[1], dims[2]).label(), "/", mode);
  benchmark::RegisterBenchmark(name.c_str(), [op, dims, mode](benchmark::State& state) {
    Dispatcher& d = dispatcher_for(mode);
    // One set of buffers per (op, size), shared by every mode: separate 64 MiB allocations differ
    // by tens of percent (page placement), which would swamp the differences measured here.
    static std::map<std::string, std::unique_ptr<OpCase>> cases;
    auto& slot = cases[cat(int(op), "/", dims[0], "/", dims[1], "/", dims[2])];
    if (!slot) slot = std::make_unique<OpCase>(make_op_case(op, dims[0], dims[1], dims[2]));
    OpCase& cs = *slot;
    for (auto _ : state) cs.routed(d);
    set_rates(state, cs.size);
  })->UseRealTime()->MinTime(0.2);
}

void BM_matmul_eigen_plain(benchmark::State& state) {
  const int n = int(state.range(0)), threads = int(state.range(1));
  Rng rng(1, 1);
  std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
  for (auto& v : a) v = rng.uniform(-1, 1);
  for (auto& v : b) v = rng.uniform(-1, 1);
  for (auto _ : state) {
    eigen_plain_matmul(a.data(), b.data(), c.data(), n, threads);
    benchmark::DoNotOptimize(c.data());
  }
  set_rates(state, op_size(Op::matmul, n, n, n));
}

// --routing: auto against each fixed backend with the modes interleaved (round r runs every mode
// once, in rotated order) so drift of the machine hits all of them alike; prints JSON with each
// mode's median seconds per call.
int routing_table(const std::vector<std::string>& modes) {
  nlohmann::json out = nlohmann::json::array();
  for (int o = 0; o < kOpCount; ++o)
    for (const auto& dims : report_ladder(Op(o), true)) {
      OpCase cs = make_op_case(Op(o), dims[0], dims[1], dims[2]);
      // Calls per timed batch: enough for ~20 ms on the slowest mode.
      int64_t batch = 1;
      for (const auto& mode : modes) {
        cs.routed(dispatcher_for(mode));  // warm-up
        Timer t;
        cs.routed(dispatcher_for(mode));
        batch = std::max<int64_t>(batch, int64_t(0.02 / std::max(t.seconds(), 1e-9)));
      }
      batch = std::min<int64_t>(batch, 20000);
      std::map<std::string, std::vector<double>> times;
      constexpr int kRounds = 7;
      for (int r = 0; r < kRounds; ++r)
        for (size_t m = 0; m < modes.size(); ++m) {
          const std::string& mode = modes[(m + r) % modes.size()];
          Dispatcher& d = dispatcher_for(mode);
          Timer t;
          for (int64_t i = 0; i < batch; ++i) cs.routed(d);
          times[mode].push_back(t.seconds() / double(batch));
        }
      nlohmann::json row = {{"op", to_string(Op(o))}, {"size", cs.size.label()}};
      for (auto& [mode, ts] : times) {
        std::sort(ts.begin(), ts.end());
        row[mode] = ts[ts.size() / 2];
      }
      out.push_back(row);
    }
  std::cout << out.dump(1) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = hardware().granted_cpus;
  benchmark::RegisterBenchmark("baseline/matmul_eigen_plain", BM_matmul_eigen_plain)->Args({1024, threads})->Args({1024, 1})->UseRealTime()->MinTime(0.5);
  std::vector<std::string> modes = {"auto", "c", "tbb"};
  if (make_cuda_backend(nullptr)) modes.push_back("cuda");
  if (argc > 1 && std::string(argv[1]) == "--routing") return routing_table(modes);
  for (int o = 0; o < kOpCount; ++o)
    for (const auto& dims : report_ladder(Op(o), true))
      for (const auto& mode : modes) register_op(Op(o), dims, mode);
  // matmul_ternary at the decode shapes of a 595M-parameter model (dim 1536, FFN 4096): one
  // sequence, eight, and a 512-token prompt (filter: --benchmark_filter=op/matmul_ternary).
  for (int64_t m : {1, 8, 16, 512})
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{1536, 1536}, {4096, 1536}, {1536, 4096}, {65536, 4096}, {262144, 4096}})
      for (const auto& mode : modes)
        if (mode != "auto") register_op(Op::matmul_ternary, {m, n, k}, mode);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
