// The `hybrit` command line: parsing, "did you mean", and the one place errors become exit codes.
// The subcommands live in commands.cpp; the work lives in the libraries.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <set>

#include "cli/commands.hpp"
#include "core/comm.hpp"
#include "core/error.hpp"

namespace {

using namespace hybrit;

// Edits from a to b, a swap of neighbours counting as one ("trian" is one edit from "train"):
// the optimal string alignment distance.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i)
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

// The candidate nearest to `word` when it is near enough to be a typo (a third of its length, at
// least 1, at most 3 edits), else "".
std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = std::min<size_t>(3, std::max<size_t>(1, word.size() / 3)) + 1;
  for (const auto& c : candidates)
    if (const size_t d = edit_distance(word, c); d < best_distance) best = c, best_distance = d;
  return best;
}

std::vector<std::string> subcommand_names(const CLI::App& app) {
  std::vector<std::string> names;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) names.push_back(sub->get_name());
  return names;
}

// Every --long and -s spelling of the options of `app` and its parents.
std::vector<std::string> option_names(const CLI::App* app) {
  std::vector<std::string> names = {"--help", "-h"};
  for (; app != nullptr; app = app->get_parent())
    for (const CLI::Option* o : app->get_options()) {
      for (const auto& l : o->get_lnames()) names.push_back("--" + l);
      for (const auto& s : o->get_snames()) names.push_back("-" + s);
    }
  return names;
}

// The innermost subcommand named on the command line, scanning argv as CLI11 will.
CLI::App* named_subcommand(CLI::App& app, int argc, char** argv) {
  CLI::App* at = &app;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.empty() || arg[0] == '-') continue;
    for (CLI::App* sub : at->get_subcommands([](const CLI::App*) { return true; }))
      if (sub->get_name() == arg) {
        at = sub;
        break;
      }
  }
  return at;
}

// One line for a mistyped subcommand or option, with the nearest spelling, or "" when the
// command line has neither.
std::string typo_message(CLI::App& app, int argc, char** argv) {
  // The first word that is not an option or an option's value must be a subcommand.
  std::set<std::string> takes_value = {"--config", "--backend"};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("-", 0) == 0) {
      if (takes_value.count(arg)) ++i;
      continue;
    }
    const std::vector<std::string> names = subcommand_names(app);
    if (std::find(names.begin(), names.end(), arg) != names.end()) break;
    const std::string near = closest(arg, names);
    std::string all;
    for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
    return cat("unknown command '", arg, "'", near.empty() ? "" : cat("; did you mean '", near, "'?"), " (commands: ", all, ")");
  }
  CLI::App* sub = named_subcommand(app, argc, argv);
  const std::vector<std::string> known = option_names(sub);
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("-", 0) != 0 || arg == "-" || arg == "--") continue;
    arg = arg.substr(0, arg.find('='));
    if (std::find(known.begin(), known.end(), arg) != known.end()) continue;
    const std::string near = closest(arg, known);
    const std::string where = sub == &app ? "hybrit" : cat("hybrit ", sub->get_parent() != &app ? sub->get_parent()->get_name() + " " : "", sub->get_name());
    return cat("unknown option ", arg, " for `", where, "`", near.empty() ? "" : cat("; did you mean ", near, "?"), " (see ", where, " --help)");
  }
  return "";
}

// One line on stderr and the exit code. In a job of several processes that has started MPI the
// rank is named and the whole job ends with it, so no other rank waits for this one in a
// collective (or in MPI_Finalize); before MPI starts, the launcher ends the job on the exit code.
int failed(const char* what, const char* message, int code) {
  if (Comm::started() && Comm::world().distributed()) Comm::world().abort_job(cat(what, ": ", message), code);
  if (launched_job_size() > 1) std::fprintf(stderr, "hybrit: [rank %d] %s: %s\n", launched_rank(), what, message);
  else std::fprintf(stderr, "hybrit: %s: %s\n", what, message);
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrit: train and serve 1.58-bit (ternary) transformer language models"};
  app.require_subcommand(1);
  app.fallthrough();  // inherited by the subcommands: --config and --backend may come after the subcommand too
  app.set_version_flag("--version", std::string("hybrit ") + HYBRIT_VERSION);
  cli::GlobalOptions global;
  app.add_option("--config", global.config, "YAML file whose `dispatch:` section sets backends, SIMD level, threads, profile")->check(CLI::ExistingFile);
  app.add_option("--backend", global.backend, "force one backend for every op: c, tbb, cuda, or auto (the dispatcher decides; overrides HYBRIT_BACKEND)");

  cli::InfoCommand info;
  cli::ReportCommand report;
  cli::TrainCommand train;
  cli::ReduceCommand reduce;
  cli::EvalCommand eval;
  cli::GenerateCommand generate;
  cli::ServeCommand serve;
  cli::CheckpointCommand checkpoint;
  cli::PlotCommand plot;
  CLI::App* info_app = info.add(app);
  CLI::App* report_app = report.add(app);
  CLI::App* train_app = train.add(app);
  CLI::App* reduce_app = reduce.add(app);
  CLI::App* eval_app = eval.add(app);
  CLI::App* generate_app = generate.add(app);
  CLI::App* serve_app = serve.add(app);
  CLI::App* checkpoint_app = checkpoint.add(app);
  CLI::App* plot_app = plot.add(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    const std::string typo = typo_message(app, argc, argv);
    if (typo.empty()) return app.exit(e) == 0 ? 0 : 2;
    std::fprintf(stderr, "hybrit: error: %s\n", typo.c_str());
    return 2;
  }

  try {
    // Under mpirun training and reduction run across ranks (and info shows each rank's layout);
    // the other commands would run N copies of one job.
    if (launched_job_size() > 1 && !*info_app && !*train_app && !*reduce_app)
      fail(ErrorKind::unsupported, "hybrit ", app.get_subcommands().front()->get_name(), " runs in one process; under mpirun only hybrit train and hybrit reduce (and hybrit info) run across ",
           launched_job_size(), " ranks: run it without mpirun");
    if (*info_app) return info.run(global);
    if (*report_app) return report.run(global);
    if (*train_app) return train.run(global);
    if (*reduce_app) return reduce.run(global);
    if (*eval_app) return eval.run(global);
    if (*generate_app) return generate.run(global);
    if (*serve_app) return serve.run(global);
    if (*checkpoint_app) return checkpoint.run(global);
    if (*plot_app) return plot.run(global);
  } catch (const Error& e) {
    return failed("error", e.what(), 1);
  } catch (const std::exception& e) {
    return failed("internal error", e.what(), 3);
  }
  return 0;
}
