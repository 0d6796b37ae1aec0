// `hybrit dispatch-report`: measures every op on every available backend at a ladder of sizes,
// against machine ceilings it measures itself, and says what the dispatcher does with that.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dispatch/dispatcher.hpp"

namespace hybrit {

struct ReportOptions {
  bool quick = true;          // about 30 s on 2 cores; otherwise larger ladders and longer timings
  std::vector<Op> ops;        // empty: all
  bool progress = true;       // progress bar on a terminal
};

// The hardware probe as JSON (what `hybrit info --json` and hybrit.info() return).
nlohmann::json hardware_json(const HardwareInfo& hw);

// The whole report as JSON (hardware, backends, ceilings, per-op tables, crossovers,
// recommendations, and the measured profile).
nlohmann::json run_dispatch_report(Dispatcher& dispatcher, const ReportOptions& options);
std::string format_report(const nlohmann::json& report);
// The measured profile inside a report, ready for save_profile.
Profile profile_from_report(const nlohmann::json& report, const Profile& base);

}  // namespace hybrit
