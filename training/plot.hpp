// Loss curves as PNG through matplotlib (Debian's python3-matplotlib), run as a child process of
// the Python interpreter named at build time (HYBRIT_PYTHON_EXECUTABLE, or $HYBRIT_PYTHON): every
// run folder writes loss.png at its end, and `hybrit plot RUN...` overlays several runs.
//
// One figure: training loss (thin) and validation loss (markers) against steps, the learning rate
// on a second axis; with one run, tokens seen on a top axis.
#pragma once
#include <string>
#include <vector>

namespace hybrit {

// Writes `out_png` (atomically) from the metrics.jsonl of each run folder. Returns false and says
// why in `why_not` when it cannot (no Python, no matplotlib, a run without metrics): plotting is an
// extra, so the caller decides whether that is an error.
bool plot_runs(const std::vector<std::string>& run_dirs, const std::string& out_png, std::string* why_not);

}  // namespace hybrit
