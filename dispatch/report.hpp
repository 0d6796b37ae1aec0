// `hybrit dispatch-report`: measures every op on every available backend at a ladder of sizes,
// against machine ceilings it measures itself, and says what the dispatcher does with that.
#pragma once
#include <array>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dispatch/dispatcher.hpp"

namespace hybrit {

// Two measurements of the machine's ceilings ({memory_gbps, gemm_gflops}) agree when each is
// within kCeilingTolerance of the other. The report measures before and after the ops and repeats
// until two in a row agree; when they never do, it says the machine is too noisy (too_noisy,
// noise_note) and `--save` refuses to write a profile from it.
inline constexpr double kCeilingTolerance = 1.25;
bool ceilings_agree(const nlohmann::json& a, const nlohmann::json& b);

struct ReportOptions {
  bool quick = true;          // about 30 s on 2 cores; otherwise larger ladders and longer timings
  std::vector<Op> ops;        // empty: all
  bool progress = true;       // progress bar on a terminal
};

// One prepared call of an op at one size, with fresh random inputs: runnable on a given backend
// or routed through a dispatcher. The report and the benchmarks time these.
struct OpCase {
  OpSize size;
  std::function<void(Backend&)> on_backend;
  std::function<void(Dispatcher&)> routed;
};
OpCase make_op_case(Op op, int64_t a, int64_t b, int64_t c);
// The report's ladder of dims for an op (the meaning of a, b, c as in op_size).
std::vector<std::array<int64_t, 3>> report_ladder(Op op, bool quick);

// The hardware probe as JSON (what `hybrit info --json` and hybrit.info() return).
nlohmann::json hardware_json(const HardwareInfo& hw);
// Dispatcher metrics as {op: {backend: {calls, elements, bytes, seconds}}}, ops that ran only.
nlohmann::json metrics_json(const Metrics& metrics);

// The whole report as JSON (hardware, backends, ceilings, per-op tables, crossovers,
// recommendations, and the measured profile).
nlohmann::json run_dispatch_report(Dispatcher& dispatcher, const ReportOptions& options);
std::string format_report(const nlohmann::json& report);
// The measured profile inside a report (run with `dispatcher`), ready for save_profile: the
// dispatcher's profile overlaid with the measurements, under the dispatcher's conditions.
// Saves the report's measurements as the dispatch profile at `path`; refuses (ErrorKind::unsupported)
// a report whose ceilings never agreed (too_noisy), so a busy machine writes no profile.
void save_profile_from_report(const nlohmann::json& report, const Dispatcher& dispatcher, const std::string& path);
Profile profile_from_report(const nlohmann::json& report, const Dispatcher& dispatcher);

}  // namespace hybrit
