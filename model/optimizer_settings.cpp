#include "model/optimizer_settings.hpp"
#include "core/names.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace hybrit {

// ------------------------------------------------------------------ schedules

namespace {
const char* const kScheduleNames[] = {"constant", "cosine", "wsd", "bitnet_two_stage"};  // in enum order
static_assert(sizeof(kScheduleNames) / sizeof(kScheduleNames[0]) == Schedule::kKindCount, "one name per schedule kind");
}  // namespace

const char* to_string(Schedule::Kind kind) { return kScheduleNames[int(kind)]; }

Schedule::Kind parse_schedule_kind(const std::string& text, const std::string& what) { return parse_name<Schedule::Kind>(kScheduleNames, text, what); }

Schedule::Multipliers Schedule::at(int64_t step) const {
  auto cosine = [&](double p) { return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + std::cos(std::numbers::pi * std::clamp(p, 0.0, 1.0))); };
  const double warm = warmup_steps > 0 && step < warmup_steps ? double(step + 1) / double(warmup_steps) : 1.0;
  const double after_warmup = double(std::max<int64_t>(1, total_steps - warmup_steps));
  const double p = double(step - warmup_steps) / after_warmup;
  switch (kind) {
    case Kind::constant: return {warm, 1.0};
    case Kind::cosine: return {warm * cosine(p), 1.0};
    case Kind::wsd: {
      const double decay_start = double(total_steps) * (1.0 - decay_fraction);
      if (double(step) < decay_start) return {warm, 1.0};
      const double q = (double(step) - decay_start) / std::max(1.0, double(total_steps) - decay_start);
      return {warm * (1.0 - (1.0 - min_lr_ratio) * std::min(q, 1.0)), 1.0};
    }
    case Kind::bitnet_two_stage: {
      const int64_t half = total_steps / 2;
      if (step < half) {
        // Cosine over the whole run, so the first stage ends well above its minimum; weight
        // decay follows a cosine from 1 to 0 over the first stage.
        const double wd = 0.5 * (1.0 + std::cos(std::numbers::pi * double(step) / double(std::max<int64_t>(1, half))));
        return {warm * cosine(double(step) / double(std::max<int64_t>(1, total_steps))), wd};
      }
      const double q = double(step - half) / double(std::max<int64_t>(1, total_steps - half));
      return {stage2_lr_ratio * cosine(q), 0.0};
    }
  }
  return {1.0, 1.0};
}

}  // namespace hybrit
