#include "training/plot.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.hpp"
#include "core/file.hpp"

extern char** environ;

namespace hybrit {

namespace {

// argv: out.png, then run folders. Exit 3 without matplotlib, 4 for a run without metrics.
constexpr const char* kPlotScript = R"PY(
import json, os, sys
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.stderr.write("matplotlib is not installed (apt-get install python3-matplotlib)\n")
    sys.exit(3)
out, runs = sys.argv[1], sys.argv[2:]
fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
lr_ax = ax.twinx()
for i, run in enumerate(runs):
    path = os.path.join(run, "metrics.jsonl")
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line
    except OSError as e:
        sys.stderr.write(f"{path}: {e.strerror}\n")
        sys.exit(4)
    rows = [r for r in rows if isinstance(r, dict) and "step" in r and "loss" in r]
    if not rows:
        sys.stderr.write(f"{path}: no metrics lines\n")
        sys.exit(4)
    color = f"C{i % 10}"
    name = os.path.basename(os.path.normpath(run))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, linewidth=0.8, alpha=0.7, label=f"{name} train")
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=color, markersize=3, label=f"{name} val")
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], ":", color=color, linewidth=0.8)
    if len(runs) == 1 and rows[-1].get("tokens") and rows[-1]["step"] > 0:
        per_step = rows[-1]["tokens"] / rows[-1]["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
ax.set_xlabel("step")
ax.set_ylabel("loss (nats per token)")
lr_ax.set_ylabel("learning rate (dotted)")
ax.grid(alpha=0.3)
ax.legend(loc="upper right", fontsize=8)
ax.set_title(", ".join(os.path.basename(os.path.normpath(r)) for r in runs)[:100])
fig.tight_layout()
tmp = out + ".tmp.png"
fig.savefig(tmp)
os.replace(tmp, out)
)PY";

std::string python_executable() {
  const char* env = std::getenv("HYBRIT_PYTHON");
  return env && *env ? env : HYBRIT_PYTHON_EXECUTABLE;
}

}  // namespace

bool plot_runs(const std::vector<std::string>& run_dirs, const std::string& out_png, std::string* why_not) {
  namespace fs = std::filesystem;
  auto refuse = [&](const std::string& why) {
    if (why_not) *why_not = why;
    return false;
  };
  if (run_dirs.empty()) return refuse("no run folders given");
  for (const auto& run : run_dirs)
    if (!fs::is_regular_file(fs::path(run) / "metrics.jsonl")) return refuse(cat(run, ": no metrics.jsonl (not a run folder?)"));
  const std::string python = python_executable();
  if (access(python.c_str(), X_OK) != 0) return refuse(cat(python, ": no Python interpreter there (set HYBRIT_PYTHON)"));
  // The script and the child's stderr go through temporary files beside the output.
  const fs::path dir = fs::path(out_png).parent_path().empty() ? fs::path(".") : fs::path(out_png).parent_path();
  const std::string script = (dir / cat(".hybrit-plot-", ::getpid(), ".py")).string();
  const std::string errors = script + ".err";
  try {
    write_file_atomically(script, kPlotScript);
  } catch (const Error& e) {
    return refuse(e.what());
  }
  std::vector<std::string> args = {python, script, out_png};
  args.insert(args.end(), run_dirs.begin(), run_dirs.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, errors.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, python.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  int status = 0;
  if (rc == 0) while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  std::string message;
  {
    std::ifstream in(errors);
    std::string line;
    while (std::getline(in, line))
      if (!line.empty()) message = line;  // the last line: the exception or our own message
  }
  std::error_code ec;
  fs::remove(script, ec);
  fs::remove(errors, ec);
  if (rc != 0) return refuse(cat("cannot run ", python, " (", std::strerror(rc), ")"));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return refuse(message.empty() ? cat(python, " stopped with status ", WIFEXITED(status) ? WEXITSTATUS(status) : -1) : message);
  return true;
}

}  // namespace hybrit
