#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/log.hpp"
#include "dispatch/dispatcher.hpp"
#include "dispatch/report.hpp"
#include "test_support.hpp"

namespace hybrit::test {
namespace {

// A synthetic machine: c costs 1 us + 1 ns per unit of work, tbb 20 us + 0.25 ns, and a GPU
// 10 us + 0.01 ns; the crossovers are then known exactly.
Policy synthetic_policy(bool with_cuda) {
  Policy p;
  p.hardware.cpu_model = "test CPU";
  p.hardware.granted_cpus = 4;
  auto line = [](double overhead, double per_unit) {
    std::vector<ProfilePoint> pts;
    for (double w = 1e2; w <= 1e10; w *= 10) pts.push_back({w, overhead + per_unit * w});
    return pts;
  };
  for (int o = 0; o < kOpCount; ++o) {
    p.profile.points(Op(o), BackendKind::c) = line(1e-6, 1e-9);
    p.profile.points(Op(o), BackendKind::tbb) = line(20e-6, 0.25e-9);
    p.profile.points(Op(o), BackendKind::cuda) = line(10e-6, 0.01e-9);
  }
  p.profile.transfer_gbps = 10;
  p.profile.transfer_latency_s = 0;
  p.available = {true, true, with_cuda};
  p.unavailable_reason[2] = "no GPU in this test";
  return p;
}

OpSize work_of(Op op, double work, double transfer_bytes) {
  OpSize s;
  s.op = op;
  s.work = work;
  s.transfer_bytes = transfer_bytes;
  return s;
}

TEST(Policy, PicksTheCheapestBackendBySize) {
  const Policy p = synthetic_policy(false);
  // c: 1 us + w ns; tbb: 20 us + w/4 ns (interpolated in log-log between the decades).
  EXPECT_EQ(p.choose(work_of(Op::matmul, 1e3, 0), Device::cpu()).backend, BackendKind::c);
  EXPECT_EQ(p.choose(work_of(Op::matmul, 2e4, 0), Device::cpu()).backend, BackendKind::c);
  EXPECT_EQ(p.choose(work_of(Op::matmul, 5e4, 0), Device::cpu()).backend, BackendKind::tbb);
  EXPECT_EQ(p.choose(work_of(Op::matmul, 1e9, 0), Device::cpu()).backend, BackendKind::tbb);
  const Decision d = p.choose(work_of(Op::matmul, 1e9, 0), Device::cpu(), true);
  EXPECT_TRUE(std::isnan(d.predicted_seconds[2]));
  EXPECT_NE(d.reason.find("cuda unavailable"), std::string::npos) << d.reason;
}

TEST(Policy, NearTiesGoToTheCBackend) {
  const Policy p = synthetic_policy(false);
  // At 3e4 tbb is predicted about 2% faster: inside the 5% margin, so c (no threads) runs it.
  const Decision d = p.choose(work_of(Op::matmul, 3e4, 0), Device::cpu(), true);
  ASSERT_LT(d.predicted_seconds[1], d.predicted_seconds[0]);
  ASSERT_LE(d.predicted_seconds[0], 1.05 * d.predicted_seconds[1]);
  EXPECT_EQ(d.backend, BackendKind::c);
}

TEST(Policy, ChargesTheTripToTheGpuForHostData) {
  const Policy p = synthetic_policy(true);
  // Memory-bound: 1e8 units moving 5e8 bytes; the GPU kernel takes 1 ms but the trip 50 ms.
  const OpSize stream = work_of(Op::quantize_ternary, 1e8, 5e8);
  EXPECT_EQ(p.choose(stream, Device::cpu()).backend, BackendKind::tbb);
  // Compute-bound: 1e10 units moving 1e7 bytes; the trip is 1 ms, the CPU 2.5 s.
  EXPECT_EQ(p.choose(work_of(Op::matmul, 1e10, 1e7), Device::cpu()).backend, BackendKind::cuda);
  // Data already on the GPU stays there, whatever the size.
  EXPECT_EQ(p.choose(work_of(Op::quantize_ternary, 10, 40), Device::cuda(0)).backend, BackendKind::cuda);
}

TEST(Policy, IsAPureFunctionOfItsInputs) {
  // One policy asked the same questions in two orders gives the same answers: no call leaves state
  // behind that changes a later one (a cache, a counter, a profile update).
  const Policy policy = synthetic_policy(true);
  std::vector<OpSize> sizes;
  for (double w = 10; w < 1e11; w *= 3) sizes.push_back(work_of(Op::kmeans_assign, w, w / 10));
  std::vector<std::pair<BackendKind, std::string>> forward, backward(sizes.size());
  for (const OpSize& s : sizes) forward.push_back({policy.choose(s, Device::cpu()).backend, policy.choose(s, Device::cpu(), true).reason});
  for (size_t i = sizes.size(); i-- > 0;) backward[i] = {policy.choose(sizes[i], Device::cpu()).backend, policy.choose(sizes[i], Device::cpu(), true).reason};
  EXPECT_EQ(forward, backward);
  std::set<BackendKind> picked;
  for (const auto& f : forward) picked.insert(f.first);
  EXPECT_GE(picked.size(), 2u) << "the sizes span a change of backend, so the comparison means something";
  EXPECT_TRUE(policy.choose(sizes[0], Device::cpu()).reason.empty());  // not formatted unless asked for
}

TEST(Policy, OverridesWinAndAMissingBackendIsAnError) {
  Policy p = synthetic_policy(false);
  p.overrides.backend = BackendKind::c;
  p.overrides.per_op[Op::matmul] = BackendKind::tbb;
  p.overrides.source = "test";
  EXPECT_EQ(p.choose(work_of(Op::quantize_ternary, 1e9, 0), Device::cpu()).backend, BackendKind::c);
  EXPECT_EQ(p.choose(work_of(Op::matmul, 10, 0), Device::cpu()).backend, BackendKind::tbb);
  EXPECT_NE(p.choose(work_of(Op::matmul, 10, 0), Device::cpu(), true).reason.find("forced by test"), std::string::npos);
  p.overrides.backend = BackendKind::cuda;
  try {
    p.validate();
    FAIL() << "forcing an absent backend must fail";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::unsupported);
    EXPECT_NE(std::string(e.what()).find("no GPU in this test"), std::string::npos) << e.what();
  }
  Policy q = synthetic_policy(true);
  q.overrides.backend = BackendKind::tbb;
  EXPECT_THROW(q.choose(work_of(Op::matmul, 10, 0), Device::cuda(0)), Error);  // CPU backend, device data
}

// A backend without a kernel for an op (the CUDA backend for attention) is never picked for it,
// even when its profile says it is fastest, and forcing it names the op.
TEST(Policy, ABackendWithoutAKernelIsNeverPickedAndCannotBeForced) {
  Policy p = synthetic_policy(true);
  const OpSize big = work_of(Op::attention_forward, 1e10, 0);
  EXPECT_EQ(p.choose(big, Device::cpu()).backend, BackendKind::cuda);  // the synthetic GPU is fastest
  p.has_kernel[int(Op::attention_forward)][int(BackendKind::cuda)] = false;
  EXPECT_EQ(p.choose(big, Device::cpu()).backend, BackendKind::tbb);
  EXPECT_EQ(p.choose(work_of(Op::matmul, 1e10, 0), Device::cpu()).backend, BackendKind::cuda);  // other ops unchanged
  p.overrides.backend = BackendKind::cuda;
  try {
    p.choose(big, Device::cpu());
    FAIL() << "forcing a backend without the kernel must fail";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::unsupported);
    EXPECT_NE(std::string(e.what()).find("attention_forward: the cuda backend is forced but has no kernel"), std::string::npos) << e.what();
  }
}

TEST(Profile, InterpolatesInLogLogAndExtrapolatesByThroughput) {
  Profile p;
  p.points(Op::matmul, BackendKind::c) = {{1e3, 1e-6}, {1e5, 1e-4}, {1e7, 4e-3}};
  EXPECT_DOUBLE_EQ(p.predict(Op::matmul, BackendKind::c, 10), 1e-6);        // below: the smallest
  EXPECT_NEAR(p.predict(Op::matmul, BackendKind::c, 1e4), 1e-5, 1e-12);     // on the line t = w / 1e9
  EXPECT_NEAR(p.predict(Op::matmul, BackendKind::c, 1e8), 4e-2, 1e-12);     // beyond: same rate
  EXPECT_TRUE(std::isnan(p.predict(Op::matmul, BackendKind::tbb, 1e4)));
}

std::vector<std::string> g_warnings;
void capture(LogLevel level, const std::string& line) {
  if (level == LogLevel::warn) g_warnings.push_back(line);
}


TEST(Profile, SavesLoadsAndRejectsStaleOrDamagedFiles) {
  TempDir dir;
  const HardwareInfo& hw = hardware();
  MeasurementConditions now;
  now.fingerprint = hw.fingerprint();
  now.simd = hw.best_simd();
  now.threads = 2;
  Profile p = default_profile(hw);
  p.conditions = now;
  p.points(Op::matmul, BackendKind::tbb) = {{1e3, 2e-6}, {1e6, 3e-4}};
  save_profile(p, dir.file("profile.json"));
  const Profile back = load_profile(dir.file("profile.json"), true, hw, now);
  EXPECT_EQ(back.source, dir.file("profile.json"));
  EXPECT_DOUBLE_EQ(back.predict(Op::matmul, BackendKind::tbb, 1e6), 3e-4);

  // Measured under other conditions: ignored with a warning naming the difference.
  auto ignored_because = [&](MeasurementConditions then, const std::string& reason) {
    Profile other = p;
    other.conditions = then;
    save_profile(other, dir.file("other.json"));
    set_log_sink(capture);
    g_warnings.clear();
    const Profile ignored = load_profile(dir.file("other.json"), true, hw, now);
    set_log_sink(nullptr);
    EXPECT_EQ(ignored.source, "built-in defaults");
    ASSERT_EQ(g_warnings.size(), 1u);
    EXPECT_NE(g_warnings[0].find(reason), std::string::npos) << g_warnings[0];
  };
  MeasurementConditions then = now;
  then.fingerprint = "0123456789abcdef";
  ignored_because(then, "measured on other hardware");
  then = now;
  then.threads = 7;
  ignored_because(then, "measured with 7 tbb threads (now 2)");
  then = now;
  then.simd = now.simd == SimdLevel::scalar ? SimdLevel::avx2 : SimdLevel::scalar;
  ignored_because(then, "kernels (now ");
  then = now;
  then.version = "0.0.1";
  ignored_because(then, "measured with hybrit 0.0.1");

  // Damaged: an error when named explicitly, a warning at the default location.
  std::ofstream(dir.file("bad.json")) << "{\"format\": \"hybrit-dispatch-profile\", \"version\": 1, ";
  EXPECT_THROW(load_profile(dir.file("bad.json"), true, hw, now), Error);
  set_log_sink(capture);
  g_warnings.clear();
  EXPECT_EQ(load_profile(dir.file("bad.json"), false, hw, now).source, "built-in defaults");
  set_log_sink(nullptr);
  EXPECT_EQ(g_warnings.size(), 1u);
  try {
    load_profile(dir.file("missing.json"), true, hw, now);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::io);
  }
  EXPECT_EQ(load_profile(dir.file("missing.json"), false, hw, now).source, "built-in defaults");
}

TEST(Overrides, YamlSectionIsParsedAndCheckedWithLineNumbers) {
  const Overrides o = overrides_from_yaml("model: {dim: 8}\ndispatch:\n  backend: tbb\n  threads: 3\n  ops:\n    matmul: c\n", "run.yaml");
  EXPECT_EQ(o.backend, BackendKind::tbb);
  EXPECT_EQ(o.threads, 3);
  EXPECT_EQ(o.per_op.at(Op::matmul), BackendKind::c);
  auto error_of = [](const std::string& text) {
    try {
      overrides_from_yaml(text, "run.yaml");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(error_of("dispatch:\n  backend: gpu\n"), "run.yaml:2: dispatch.backend: expected c, tbb, cuda or auto, got 'gpu'");
  EXPECT_EQ(error_of("dispatch:\n  backend: c\n  thread: 2\n"), "run.yaml:3: dispatch.thread: unknown key (expected one of: backend, ops, profile, simd, threads)");
  EXPECT_NE(error_of("dispatch:\n  ops:\n    matmull: c\n").find("run.yaml:3: dispatch.ops.matmull: unknown key (expected one of: attention_backward"),
            std::string::npos);
  EXPECT_EQ(error_of("dispatch:\n  backend: c\n  backend: tbb\n"), "run.yaml:3: dispatch.backend: given twice (first at line 2)");
  EXPECT_EQ(error_of("dispatch:\n  [a]: 1\n"), "run.yaml:2: dispatch: a key must be a plain name, got a list");
  EXPECT_EQ(error_of("dispatch:\n  threads: [1, 2]\n"), "run.yaml:2: dispatch.threads: expected a single value, got a list");
  EXPECT_EQ(error_of("dispatch:\n  threads: -1\n"), "run.yaml:2: dispatch.threads: expected a thread count 0..4096 or auto, got '-1'");
  EXPECT_NE(error_of("dispatch: [\n").find("run.yaml:2: YAML syntax error"), std::string::npos) << error_of("dispatch: [\n");
  EXPECT_FALSE(overrides_from_yaml("train: {steps: 3}\n", "x.yaml").backend.has_value());
}

TEST(Overrides, EnvironmentIsCheckedAndHasItsPlaceInTheOrder) {
  setenv("HYBRIT_BACKEND", "gpu", 1);
  EXPECT_THROW(overrides_from_env(), Error);
  setenv("HYBRIT_BACKEND", "c", 1);
  DispatcherOptions o;  // the real resolver: the environment over the config's section
  o.config_section = overrides_from_yaml("dispatch: {backend: tbb, threads: 2}\n", "x.yaml");
  const Overrides resolved = resolve_overrides(o);
  EXPECT_EQ(resolved.backend, BackendKind::c);
  EXPECT_EQ(resolved.threads, 2);
  EXPECT_EQ(resolved.source, "environment");
  setenv("HYBRIT_THREADS", "lots", 1);
  EXPECT_THROW(overrides_from_env(), Error);
  unsetenv("HYBRIT_THREADS");
  unsetenv("HYBRIT_BACKEND");
}

// Every pair of sources, each saying `c`, `tbb` or `auto` for the backend: the higher one wins,
// and `auto` undoes everything below it. Order: config section < --config file < environment <
// caller (flag or argument).
TEST(Overrides, EveryPairOfSourcesResolvesInTheOneOrder) {
  TempDir dir;
  const std::string file = dir.file("global.yaml");
  enum Source { section, config_file, environment, caller };
  const char* names[] = {"section", "--config", "environment", "caller"};
  for (int low = 0; low < 4; ++low)
    for (int high = low + 1; high < 4; ++high)
      for (const char* low_value : {"c", "tbb"})
        for (const char* high_value : {"c", "tbb", "auto"}) {
          DispatcherOptions o;
          o.use_environment = true;
          unsetenv("HYBRIT_BACKEND");
          auto say = [&](int source, const char* value) {
            switch (source) {
              case section: o.config_section.set("backend", value, "section"); break;
              case config_file: std::ofstream(file) << "dispatch:\n  backend: " << value << "\n", o.config_path = file; break;
              case environment: setenv("HYBRIT_BACKEND", value, 1); break;
              default: o.overrides.set("backend", value, "caller");
            }
          };
          say(low, low_value);
          say(high, high_value);
          const Overrides r = resolve_overrides(o);
          const std::string label = cat(names[low], "=", low_value, " then ", names[high], "=", high_value);
          if (std::string(high_value) == "auto") EXPECT_FALSE(r.backend.has_value()) << label;
          else EXPECT_EQ(r.backend, parse_backend(high_value, "test")) << label;
        }
  unsetenv("HYBRIT_BACKEND");
}

TEST(Overrides, AHigherEveryOpBackendOutranksALowerPerOpChoice) {
  DispatcherOptions o;
  o.use_environment = false;
  o.config_section.set("ops.matmul", "tbb", "section");
  o.config_section.set("threads", "3", "section");
  o.overrides.set("backend", "c", "--backend");
  Overrides r = resolve_overrides(o);
  EXPECT_EQ(r.backend, BackendKind::c);
  EXPECT_TRUE(r.per_op.empty());
  EXPECT_EQ(r.threads, 3);  // a setting the higher source does not name stays
  o.overrides = {};
  o.overrides.set("ops.matmul", "auto", "caller");
  o.overrides.set("threads", "auto", "caller");
  r = resolve_overrides(o);
  EXPECT_TRUE(r.per_op.empty());
  EXPECT_EQ(r.threads, 0);
  EXPECT_THROW(o.overrides.set("threads", "5000", "threads"), Error);
  EXPECT_THROW(o.overrides.set("colour", "red", "x"), Error);
}

TEST(Dispatcher, ForcingAnAbsentCudaBackendIsAnError) {
  if (make_cuda_backend(nullptr)) GTEST_SKIP() << "a CUDA device is present; nothing to refuse";
  DispatcherOptions o;
  o.overrides.backend = BackendKind::cuda;
  o.use_environment = false;
  try {
    Dispatcher d(o);
    FAIL() << "no silent fallback";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::unsupported);
    EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos);
  }
}

std::vector<std::string> g_info;
void capture_info(LogLevel level, const std::string& line) {
  if (level == LogLevel::info) g_info.push_back(line);
}

TEST(Dispatcher, RoutesRecordsMetricsAndExplainsItself) {
  DispatcherOptions o;
  o.use_environment = false;
  o.overrides.per_op[Op::quantize_ternary] = BackendKind::c;
  Dispatcher d(o);
  Tensor w = random_f32({1000}, 1), q = Tensor::empty({1000}, DType::i8);
  set_verbose(true);
  set_log_sink(capture_info);
  g_info.clear();
  d.quantize_ternary(w, q);
  Tensor a = random_f32({64, 64}, 2), c = Tensor::empty({64, 64}, DType::f32);
  d.matmul(a, a, c);
  d.quantize_ternary(w, q);  // the same decision again: logged once
  const std::vector<std::string> summary = g_info;
  set_verbose(true, true);
  g_info.clear();
  d.quantize_ternary(w, q);
  d.quantize_ternary(w, q);
  const size_t every_call = g_info.size();
  g_info = summary;
  set_log_sink(nullptr);
  set_verbose(false);
  EXPECT_EQ(every_call, 2u);
  ASSERT_EQ(g_info.size(), 2u);
  EXPECT_NE(g_info[0].find("dispatch quantize_ternary 1000 (data on cpu) -> c: forced by argument"), std::string::npos) << g_info[0];
  EXPECT_NE(g_info[1].find("dispatch matmul 64x64x64"), std::string::npos) << g_info[1];
  EXPECT_NE(g_info[1].find("predicted"), std::string::npos) << g_info[1];
  const MetricsRow r = d.metrics().get(Op::quantize_ternary, BackendKind::c);
  EXPECT_EQ(r.calls, 4);  // every call is counted, logged or not: 1000 elements, 9000 bytes each
  EXPECT_EQ(r.elements, 4 * 1000);
  EXPECT_EQ(r.bytes, 4 * 9000);
  EXPECT_GT(r.seconds, 0);
  EXPECT_NE(d.metrics().table().find("quantize_ternary"), std::string::npos);
}

TEST(Report, CeilingsAgreeOnlyWithinTheTolerance) {
  using nlohmann::json;
  auto c = [](double gbps, double gflops) { return json{{"memory_gbps", gbps}, {"gemm_gflops", gflops}}; };
  EXPECT_TRUE(ceilings_agree(c(20, 180), c(21, 170)));
  EXPECT_TRUE(ceilings_agree(c(20, 180), c(20 * kCeilingTolerance, 180)));
  EXPECT_FALSE(ceilings_agree(c(2.3, 180), c(17.5, 180)));  // the busy machine of issue 12: 2.3 then 17.5 GB/s
  EXPECT_FALSE(ceilings_agree(c(20, 60), c(20, 180)));
  EXPECT_FALSE(ceilings_agree(c(0, 180), c(0, 180)));
}

TEST(Report, MeasuresEveryBackendAndBecomesAProfile) {
  DispatcherOptions o;
  o.use_environment = false;
  Dispatcher d(o);
  ReportOptions ro;
  ro.ops = {Op::quantize_int8_rows};
  ro.progress = false;
  const auto r = run_dispatch_report(d, ro);
  ASSERT_EQ(r["ops"].size(), 1u);
  const auto& rows = r["ops"][0]["rows"];
  ASSERT_GE(rows.size(), 3u);
  for (const auto& row : rows) {
    EXPECT_TRUE(row["seconds"].contains("c") && row["seconds"].contains("tbb"));
    EXPECT_GT(row["seconds"]["c"].get<double>(), 0);
    const double winner_time = row["seconds"][row["winner"].get<std::string>()].get<double>();
    for (const auto& [name, t] : row["seconds"].items()) EXPECT_LE(winner_time, t.get<double>());
  }
  EXPECT_GT(r["ceilings"]["memory_gbps"].get<double>(), 0.1);
  EXPECT_GT(r["ceilings"]["gemm_gflops"].get<double>(), 0.1);
  // Measured before and after the ops; the ceiling is the best of them, and every share is taken
  // against it.
  ASSERT_GE(r["ceiling_runs"].size(), 2u);
  for (const auto& c : r["ceiling_runs"]) EXPECT_LE(c["memory_gbps"].get<double>(), r["ceilings"]["memory_gbps"].get<double>());
  for (const auto& row : rows)
    for (const auto& [name, rate] : row["rate"].items())
      EXPECT_DOUBLE_EQ(row["share_of_ceiling"][name].get<double>(), rate.get<double>() / r["ceilings"]["memory_gbps"].get<double>());
  EXPECT_EQ(r["too_noisy"].get<bool>(), !ceilings_agree(r["ceiling_runs"][r["ceiling_runs"].size() - 2], r["ceiling_runs"].back()));
  EXPECT_FALSE(r["recommendations"].empty());
  const Profile p = profile_from_report(r, d);
  EXPECT_EQ(p.conditions.fingerprint, hardware().fingerprint());
  EXPECT_EQ(p.conditions.threads, d.conditions().threads);
  const double w = rows[1]["work"].get<double>();
  EXPECT_DOUBLE_EQ(p.predict(Op::quantize_int8_rows, BackendKind::tbb, w), rows[1]["seconds"]["tbb"].get<double>());
  EXPECT_NE(format_report(r).find("quantize_int8_rows"), std::string::npos);
}

}  // namespace
}  // namespace hybrit::test
