// The subcommands of `hybrit`: one options struct and one run function each. Every option's help
// prints its default, read from the library's own structs (one source of truth).
#pragma once
#include <CLI/CLI.hpp>

#include <optional>
#include <string>
#include <vector>

#include "clustering/reduce.hpp"
#include "dispatch/dispatcher.hpp"
#include "dispatch/report.hpp"
#include "inference/engine.hpp"
#include "inference/gguf.hpp"
#include "inference/server.hpp"  // ServerOptions (the server itself links only with cpp-httplib)
#include "training/evaluate.hpp"

namespace hybrit::cli {

// Options every subcommand takes (before or after its name).
struct GlobalOptions {
  std::string config;   // --config: a YAML file's `dispatch:` section
  std::string backend;  // --backend c|tbb|cuda|auto
  DispatcherOptions dispatcher() const;
};

struct InfoCommand {
  bool json = false;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&) const;
};

struct ReportCommand {
  bool quick = false, json = false;
  std::string save_path, ops;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&) const;
};

struct TrainCommand {
  std::string config, out, resume;
  std::vector<std::string> sets;
  bool help_config = false;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&);
};

struct ReduceCommand {
  std::string config, out;
  std::vector<std::string> sets;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&);
};

struct EvalCommand {
  std::string checkpoint;
  std::vector<std::string> data;
  EvalOptions options;
  bool json = false;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&) const;
};

struct GenerateCommand {
  std::string checkpoint, prompt;
  std::vector<std::string> stop;
  GenerationRequest request;       // max_tokens and sampling, with their defaults
  std::optional<uint64_t> seed;    // none: fresh_seed(), printed
  bool f32 = false, interactive = false, chat = false;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&);
};

struct ServeCommand {
  std::string checkpoint;
  bool f32 = false;
  ServerOptions options;  // its defaults are the server's
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&);
};

struct CheckpointCommand {
  std::string path, export_out;
  std::string format = "auto";     // hyb | gguf | auto (by the --out extension)
  GgufExportOptions gguf;
  CLI::App *inspect = nullptr, *exporter = nullptr;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&) const;
};

struct PlotCommand {
  std::vector<std::string> runs;
  std::string out;
  CLI::App* add(CLI::App& app);
  int run(const GlobalOptions&) const;
};

}  // namespace hybrit::cli
