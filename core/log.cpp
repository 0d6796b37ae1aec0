#include "core/log.hpp"
#include "core/comm.hpp"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace hybrit {

namespace {
// In a job of several processes (mpirun -np N), rank 0 reports progress; the others only warn
// and fail unless HYBRIT_LOG asks for more. Every line of theirs names its rank.
bool quiet_rank() { return launched_job_size() > 1 && launched_rank() != 0; }
const std::string g_rank_prefix = launched_job_size() > 1 ? cat("[rank ", launched_rank(), "] ") : std::string();

LogLevel level_from_env() {
  const char* v = std::getenv("HYBRIT_LOG");
  if (!v || !*v) return quiet_rank() ? LogLevel::warn : LogLevel::info;
  if (!std::strcmp(v, "debug")) return LogLevel::debug;
  if (!std::strcmp(v, "warn")) return LogLevel::warn;
  if (!std::strcmp(v, "error")) return LogLevel::error;
  return LogLevel::info;
}
bool verbose_from_env() {
  const char* v = std::getenv("HYBRIT_VERBOSE");
  return v && *v && std::strcmp(v, "0") != 0;
}
std::atomic<LogLevel> g_level{level_from_env()};
std::atomic<bool> g_verbose{verbose_from_env()};
std::atomic<bool> g_verbose_all{[] {
  const char* v = std::getenv("HYBRIT_VERBOSE");
  return v && std::strcmp(v, "all") == 0;
}()};
std::atomic<LogSink> g_sink{nullptr};
std::mutex g_stderr_mutex;
}  // namespace

LogLevel log_level() { return g_level; }
void set_log_level(LogLevel level) { g_level = level; }
bool verbose() { return g_verbose; }
bool verbose_every_call() { return g_verbose_all; }
void set_verbose(bool on, bool every_call) {
  g_verbose = on;
  g_verbose_all = on && every_call;
}
void set_log_sink(LogSink sink) { g_sink = sink; }

void log_line(LogLevel level, const std::string& message) {
  if (LogSink sink = g_sink.load()) return sink(level, message);
  static const char* tags[] = {"debug", "info", "warning", "error"};
  std::lock_guard lock(g_stderr_mutex);
  std::fprintf(stderr, "hybrit: %s%s: %s\n", g_rank_prefix.c_str(), tags[static_cast<int>(level)], message.c_str());
}

ProgressBar::ProgressBar(std::string label, int64_t total)
    : label_(std::move(label)), total_(total), drawing_(isatty(STDERR_FILENO) == 1) {}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::update(int64_t done, const std::string& note) {
  if (!drawing_ || finished_) return;
  const double t = timer_.seconds();
  if (done < total_ && t - last_draw_ < 0.1) return;
  last_draw_ = t;
  const double frac = total_ > 0 ? std::min(1.0, double(done) / double(total_)) : 1.0;
  const int width = 24, filled = int(frac * width);
  std::string bar(filled, '#');
  bar.resize(width, '.');
  const double eta = frac > 0 ? t * (1 - frac) / frac : 0;
  std::lock_guard lock(g_stderr_mutex);
  std::fprintf(stderr, "\r%s [%s] %3.0f%% %lld/%lld  %.0fs elapsed, ETA %.0fs  %s\x1b[K", label_.c_str(), bar.c_str(),
               frac * 100, static_cast<long long>(done), static_cast<long long>(total_), t, eta, note.c_str());
  std::fflush(stderr);
}

void ProgressBar::finish() {
  if (!drawing_ || finished_) return;
  finished_ = true;
  std::lock_guard lock(g_stderr_mutex);
  std::fprintf(stderr, "\r\x1b[K");
  std::fflush(stderr);
}

}  // namespace hybrit
