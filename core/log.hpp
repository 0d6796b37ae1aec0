// Logging to stderr. HYBRIT_LOG=debug|info|warn|error sets the level (default info);
// HYBRIT_VERBOSE=1 also logs the dispatcher's decisions, once per distinct (op, size, place,
// backend) so a training run prints a page, not thousands of lines; HYBRIT_VERBOSE=all logs
// every call.
#pragma once
#include <chrono>
#include <string>

#include "core/error.hpp"

namespace hybrit {

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3 };

LogLevel log_level();
void set_log_level(LogLevel level);
bool verbose();             // HYBRIT_VERBOSE is set to something other than 0
bool verbose_every_call();  // HYBRIT_VERBOSE=all
void set_verbose(bool on, bool every_call = false);
void log_line(LogLevel level, const std::string& message);
// Where log lines go; tests capture them. nullptr restores stderr.
using LogSink = void (*)(LogLevel, const std::string&);
void set_log_sink(LogSink sink);

template <class... Parts> void log_debug(const Parts&... p) { if (log_level() <= LogLevel::debug) log_line(LogLevel::debug, cat(p...)); }
template <class... Parts> void log_info(const Parts&... p) { if (log_level() <= LogLevel::info) log_line(LogLevel::info, cat(p...)); }
template <class... Parts> void log_warn(const Parts&... p) { if (log_level() <= LogLevel::warn) log_line(LogLevel::warn, cat(p...)); }

class Timer {
 public:
  Timer() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }
  void reset() { start_ = std::chrono::steady_clock::now(); }

 private:
  std::chrono::steady_clock::time_point start_;
};

// A one-line progress bar for long work, drawn on stderr only when stderr is a terminal
// (so logs and CI output stay clean), at most ten times a second.
class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total);
  ~ProgressBar();
  void update(int64_t done, const std::string& note = "");
  void finish();
  bool drawing() const { return drawing_; }

 private:
  std::string label_;
  int64_t total_;
  bool drawing_;
  bool finished_ = false;
  Timer timer_;
  double last_draw_ = -1;
};

}  // namespace hybrit
