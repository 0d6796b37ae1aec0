#include "cli/commands.hpp"
#include "backends/c/hybrit_c.h"
#include "core/comm.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/log.hpp"
#include "inference/chat.hpp"
#include "training/plot.hpp"
#include "training/trainer.hpp"

namespace hybrit::cli {

namespace fs = std::filesystem;

namespace {

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

void print_info(const HardwareInfo& hw) {
  std::string isa;
  for (auto [name, on] : hw.isa_flags())
    if (on) isa += std::string(isa.empty() ? "" : " ") + name;
  std::printf("CPU            %s\n", hw.cpu_model.c_str());
  std::printf("ISA            %s (kernels use %s%s)\n", isa.empty() ? "baseline x86-64 only" : isa.c_str(), to_string(hw.best_simd()),
              hw.best_simd() == SimdLevel::avx512 && hybrit_c_amx_usable()
                  ? cat("; matmul_ternary on AMX tiles from ", HYBRIT_AMX_MIN_ROWS, " activation rows").c_str()
                  : hw.amx_int8 ? "; AMX: the kernel did not grant the tile state" : "");
  std::printf("cores          %d granted to this process (%d physical cores, %d logical CPUs)\n", hw.granted_cpus, hw.physical_cores, hw.logical_cpus);
  std::printf("caches         L1d %s, L2 %s, L3 %s\n", format_bytes(double(hw.l1d_bytes)).c_str(), format_bytes(double(hw.l2_bytes)).c_str(),
              format_bytes(double(hw.l3_bytes)).c_str());
  std::printf("memory         %s total, %s available\n", format_bytes(double(hw.memory_total_bytes)).c_str(),
              format_bytes(double(hw.memory_available_bytes)).c_str());
  if (hw.cuda_devices.empty()) std::printf("CUDA           none: %s\n", hw.cuda_status.c_str());
  for (const auto& d : hw.cuda_devices)
    std::printf("CUDA           cuda:%d %s, compute %d.%d, %s, %d SMs\n", d.index, d.name.c_str(), d.compute_major, d.compute_minor,
                format_bytes(double(d.memory_bytes)).c_str(), d.multiprocessors);
  std::printf("fingerprint    %s\n", hw.fingerprint().c_str());
  const Comm& comm = Comm::world();
  if (!Comm::built_with_mpi()) std::printf("MPI            none: built without MPI (apt-get install libopenmpi-dev openmpi-bin, then rebuild)\n");
  else if (!comm.distributed())
    std::printf("MPI            %s; one process (mpirun -np N hybrit train|reduce ... runs N ranks)\n", Comm::library_version().c_str());
  else
    std::printf("MPI            %s; %s, %d of the job's ranks on this machine, each with %d of its CPUs\n", Comm::library_version().c_str(), comm.where().c_str(),
                comm.local_size(), hw.granted_cpus);
  if (Comm::built_with_mpi())
    std::printf("MPI CUDA       %s\n", Comm::cuda_aware() ? "CUDA-aware (device buffers could go to MPI directly; hybrit's ranks stage through host memory today)"
                                                         : "not CUDA-aware (what ranks exchange is staged through host memory)");
}

nlohmann::json mpi_json() {
  const Comm& comm = Comm::world();
  return {{"built", Comm::built_with_mpi()}, {"library", Comm::library_version()}, {"rank", comm.rank()}, {"size", comm.size()},
          {"local_size", comm.local_size()}, {"host", comm.host()}, {"cuda_aware", Comm::cuda_aware()}};
}

// A checkpoint option: a file, or a run folder (its newest valid checkpoint).
CLI::Option* add_checkpoint_option(CLI::App* app, std::string& path, const char* what) {
  return app->add_option("-m,--checkpoint,--model", path, std::string(what) + ": a .h5 file, or a run folder (its newest valid ckpt-*.h5)")
      ->required()
      ->check(CLI::ExistingPath);
}

void add_sampling_options(CLI::App* app, SamplingParams& s, std::optional<uint64_t>& seed) {
  app->add_option("--temperature", s.temperature, "0: greedy")->capture_default_str();
  app->add_option("--top-k", s.top_k, "keep the k most likely tokens (0: off)")->capture_default_str();
  app->add_option("--top-p", s.top_p, "nucleus: the smallest set reaching this probability (1: off)")->capture_default_str();
  app->add_option("--min-p", s.min_p, "drop tokens below this fraction of the top probability (0: off)")->capture_default_str();
  app->add_option("--repetition-penalty", s.repetition_penalty, "divide (or multiply) logits of tokens already seen (1: off)")->capture_default_str();
  app->add_option("--seed", seed, "the same seed gives the same text (default: a fresh one, printed at the end)");
}

std::string read_all(std::istream& in) { return std::string(std::istreambuf_iterator<char>(in), {}); }

}  // namespace

DispatcherOptions GlobalOptions::dispatcher() const {
  // The front end's dispatch sources; resolve_overrides puts them in order with the run config's
  // section and the environment.
  DispatcherOptions options;
  options.config_path = config;
  if (!backend.empty()) {
    if (backend == "auto") options.overrides.backend_auto = true;
    else options.overrides.backend = parse_backend(backend, "--backend");
    options.overrides.source = "--backend";
  }
  return options;
}

CLI::App* InfoCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("info", "print what the hardware probe found: CPU, ISA, cores granted, caches, memory, GPUs");
  c->add_flag("--json", json, "machine-readable output");
  return c;
}

int InfoCommand::run(const GlobalOptions&) const {
  const HardwareInfo& hw = hardware();
  if (json) {
    nlohmann::json j = hardware_json(hw);
    j["mpi"] = mpi_json();
    std::cout << j.dump(2) << "\n";
  } else {
    print_info(hw);
  }
  return 0;
}

CLI::App* ReportCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("dispatch-report", "time every op on every backend and say what the dispatcher does with it");
  c->add_flag("--quick", quick, "smaller ladders and shorter timings (about 30 s on 2 cores)");
  c->add_flag("--json", json, "print the report as JSON");
  c->add_option("--save", save_path, "write the measurements as the dispatch profile to PATH (the default profile path is " + default_profile_path() + ")");
  c->add_option("--ops", ops, "comma-separated ops to measure (default: all)");
  return c;
}

int ReportCommand::run(const GlobalOptions& g) const {
  ReportOptions ro;
  ro.quick = quick;
  for (const auto& name : split_commas(ops)) ro.ops.push_back(parse_op(name, "--ops"));
  Dispatcher dispatcher(g.dispatcher());
  const nlohmann::json r = run_dispatch_report(dispatcher, ro);
  if (json) std::cout << r.dump(2) << "\n";
  else std::cout << format_report(r);
  if (!save_path.empty()) {
    save_profile_from_report(r, dispatcher, save_path);
    std::cerr << "hybrit: saved the measured dispatch profile to " << save_path
              << (save_path == default_profile_path() ? " (loaded automatically from now on)\n" : " (use it with HYBRIT_PROFILE or dispatch.profile)\n");
  }
  return 0;
}

CLI::App* TrainCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("train", "train a 1.58-bit (or full-precision) model from a YAML config");
  c->add_option("config", config, "the run's YAML file (see configs/tiny.yaml); with --resume RUN_DIR, the run's own config.yaml")->check(CLI::ExistingFile);
  c->add_option("--set", sets, "override a key, e.g. --set train.steps=100 (repeatable)");
  c->add_option("-o,--out", out, "run folder (default: runs/<config name>-<date>-<time>)");
  c->add_option("--resume", resume,
                "continue a run: its folder (the newest valid checkpoint there, and its config.yaml unless a config is given), "
                "a checkpoint file, or auto (the newest valid one in --out)");
  c->add_flag("--help-config", help_config, "list every config key with its default, what it accepts and what it does, then exit");
  return c;
}

int TrainCommand::run(const GlobalOptions& g) {
  if (help_config) {
    std::cout << train_config_help();
    return 0;
  }
  std::string resume_from = resume;
  std::error_code ec;
  if (!resume.empty() && resume != "auto") {
    // A run folder continues in place; a checkpoint file continues in its own folder.
    const bool folder = fs::is_directory(resume, ec);
    const std::string run_dir = folder ? resume : fs::path(resume).parent_path().string();
    if (!folder && !fs::is_regular_file(resume, ec)) fail(ErrorKind::io, "--resume ", resume, ": no such checkpoint file or run folder");
    if (folder) resume_from = "auto";
    if (out.empty()) out = run_dir.empty() ? "." : run_dir;
    else if (folder && fs::weakly_canonical(out) != fs::weakly_canonical(resume))
      fail(ErrorKind::invalid_argument, "--resume ", resume, " continues the run in that folder; drop --out ", out, " (or give a checkpoint file)");
    if (config.empty()) {
      config = (fs::path(out) / "config.yaml").string();
      if (!fs::is_regular_file(config, ec)) fail(ErrorKind::io, "--resume ", resume, ": ", config, " is missing; give the run's YAML file too");
    }
  }
  if (config.empty()) fail(ErrorKind::invalid_argument, "train: give the run's YAML file (e.g. configs/tiny.yaml), or --resume RUN_DIR to continue a run");
  if (resume == "auto" && out.empty()) fail(ErrorKind::invalid_argument, "--resume auto: name the run folder with --out (or give --resume RUN_DIR)");
  TrainConfig cfg = load_train_config(config, sets);
  cfg.dispatch_sources = g.dispatcher();
  Comm& comm = Comm::world();
  if (out.empty()) out = comm.broadcast(default_run_folder(fs::path(config).stem().string()), 0);  // rank 0's clock names the folder
  const RunResult r = run_training(cfg, out, resume_from);
  if (!comm.root()) return 0;  // rank 0 reports for the job
  std::printf("%s after %lld steps: loss %.4f%s; %s (%s tokens/s on average); run folder %s\n", r.interrupted ? "stopped" : "done",
              static_cast<long long>(r.steps_done), r.last_loss, r.val_loss ? cat(", validation loss ", *r.val_loss).c_str() : "",
              format_seconds(r.total_seconds).c_str(), cat(int64_t(r.tokens_per_s)).c_str(), out.c_str());
  if (!r.sample.empty()) std::printf("\nA sample from the model:\n%s\n", r.sample.c_str());
  return 0;
}

CLI::App* ReduceCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("reduce", "shrink a corpus: embed records, cluster them, keep a subset by strategy (see configs/reduce.yaml)");
  c->add_option("config", config, "the reduction's YAML file")->required()->check(CLI::ExistingFile);
  c->add_option("--set", sets, "override a key, e.g. --set reduce.strategy=hard (repeatable)");
  c->add_option("-o,--out", out, "output folder (default: runs/<config name>-<date>-<time>)");
  return c;
}

int ReduceCommand::run(const GlobalOptions& g) {
  ReduceConfig cfg = load_reduce_config(config, sets);
  cfg.dispatch_sources = g.dispatcher();
  Comm& comm = Comm::world();
  if (out.empty()) out = comm.broadcast(default_run_folder(fs::path(config).stem().string()), 0);  // rank 0's clock names the folder
  const nlohmann::json r = run_reduce(cfg, out);
  if (!comm.root()) return 0;  // rank 0 reports for the job
  std::cout << format_reduce_report(r);
  std::printf("report: %s/report.json; train on it with: hybrit train configs/tiny.yaml --set data.sources=%s\n", out.c_str(),
              r["output"].get<std::string>().c_str());
  return 0;
}

CLI::App* EvalCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("eval", "held-out evaluation: loss, bits per token and per byte, and perplexity of a checkpoint on text");
  add_checkpoint_option(c, checkpoint, "the model");
  c->add_option("-d,--data", data, "files, folders or globs to score (read as data.sources are)")->required();
  c->add_option("--format", options.format, "how the data is read: auto (per file), text, fortune, jsonl or lines")->capture_default_str();
  c->add_option("--batch", options.batch, "windows per forward pass")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  c->add_option("--max-tokens", options.max_tokens, "score at most this many tokens (0: all)")->capture_default_str()->check(CLI::Range(int64_t(0), INT64_MAX));
  c->add_flag("--json", json, "print the result as JSON");
  return c;
}

int EvalCommand::run(const GlobalOptions& g) const {
  Dispatcher dispatcher(g.dispatcher());
  const EvalResult r = evaluate_checkpoint(dispatcher, find_checkpoint(checkpoint), data, options);
  if (json) std::cout << r.to_json().dump(2) << "\n";
  else std::cout << r.to_text();
  return 0;
}

CLI::App* GenerateCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("generate", "write text with a trained model (packed ternary weights, KV cache), streamed as it is made");
  add_checkpoint_option(c, checkpoint, "training checkpoint (.h5) or its export (hybrit checkpoint export)");
  c->add_option("-p,--prompt", prompt, "text the output continues; - reads it from standard input");
  c->add_option("-n,--max-tokens", request.max_tokens, "most tokens to write (past the model's context the window slides)")->capture_default_str();
  add_sampling_options(c, request.sampling, seed);
  c->add_option("--stop", stop, "end the output before this text (repeatable)");
  c->add_flag("--f32", f32, "use f32 weights (the ternary values times their scale) instead of the packed 2-bit kernel");
  c->add_flag("-i,--interactive", interactive, "read prompts line by line from standard input, answering each (Ctrl-D ends)");
  c->add_flag("--chat", chat, "with --interactive: keep a conversation in the chat template (inference/chat.hpp) instead of continuing each line");
  return c;
}

int GenerateCommand::run(const GlobalOptions& g) {
  if (!interactive && prompt.empty()) fail(ErrorKind::invalid_argument, "generate: give --prompt TEXT (or - for standard input), or --interactive");
  if (interactive && !prompt.empty()) fail(ErrorKind::invalid_argument, "generate: --interactive reads its prompts from standard input; drop --prompt");
  if (chat && !interactive) fail(ErrorKind::invalid_argument, "generate: --chat goes with --interactive");
  request.sampling.seed = seed ? *seed : fresh_seed();
  request.sampling.validate();
  if (request.max_tokens < 1) fail_field("--max-tokens", "expected an integer >= 1, got ", request.max_tokens);
  if (prompt == "-") prompt = read_all(std::cin);
  Dispatcher dispatcher(g.dispatcher());
  InferenceModel model(dispatcher, find_checkpoint(checkpoint), !f32);
  EngineOptions one_request;
  one_request.max_running = 1, one_request.max_waiting = 1;
  Engine engine(model, one_request);
  // One answer: streamed to stdout; returns the text written.
  auto answer = [&](const std::string& text, const std::vector<std::string>& stops, uint64_t seed_used, bool summary) {
    GenerationRequest r = request;
    r.sampling.seed = seed_used;
    model.tokenizer().encode(text, r.prompt);
    if (r.prompt.empty()) r.prompt.push_back(model.tokenizer().end_of_record());  // "a record starts here"
    r.stop = stops;
    FinishReason why = FinishReason::none;
    int64_t tokens = 0;
    std::string written;
    r.on_event = [&](const GenerationEvent& e) {
      written += e.text;
      std::fputs(printable_utf8(e.text).c_str(), stdout);
      std::fflush(stdout);
      tokens += e.token >= 0;
      if (e.finished != FinishReason::none) why = e.finished;
    };
    Timer timer;
    engine.submit(std::move(r));
    engine.run();
    std::printf("\n");
    if (summary)
      std::fprintf(stderr, "hybrit: %lld tokens in %.2f s (%.1f tokens/s, %s weights), seed %llu, finished: %s\n", static_cast<long long>(tokens),
                   timer.seconds(), double(tokens) / timer.seconds(), model.packed() ? "packed 2-bit" : "f32",
                   static_cast<unsigned long long>(seed_used), to_string(why));
    return written;
  };
  if (!interactive) {
    std::fputs(printable_utf8(prompt).c_str(), stdout);
    answer(prompt, stop, request.sampling.seed, true);
    return 0;
  }
  const bool terminal = isatty(STDIN_FILENO) && isatty(STDOUT_FILENO);
  if (terminal)
    std::fprintf(stderr, "hybrit: %s; one line per %s, Ctrl-D ends (seed %llu)\n", chat ? "chat" : "each line is a prompt the model continues",
                 chat ? "message" : "prompt", static_cast<unsigned long long>(request.sampling.seed));
  std::vector<ChatMessage> history;
  std::vector<std::string> stops = stop;
  if (chat) stops.insert(stops.end(), chat_stop_strings().begin(), chat_stop_strings().end());
  std::string line;
  for (uint64_t turn = 0;; ++turn) {
    if (terminal) std::fputs(chat ? "you> " : "> ", stdout), std::fflush(stdout);
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    if (terminal && chat) std::fputs("model>", stdout);
    std::string text = line;
    if (chat) {
      history.push_back({"user", line});
      text = chat_prompt(history);
    }
    std::string reply = answer(text, stops, request.sampling.seed + turn, false);
    if (chat) {
      bool at_start = true;
      drop_reply_space(reply, at_start);
      history.push_back({"assistant", reply});
    }
  }
  if (terminal) std::printf("\n");
  return 0;
}

CLI::App* ServeCommand::add(CLI::App& app) {
  EngineOptions& e = options.engine;
  CLI::App* c = app.add_subcommand("serve", "an OpenAI-style HTTP endpoint: POST /v1/completions and /v1/chat/completions (streaming with SSE), "
                                            "GET /v1/models, /health, /metrics");
  add_checkpoint_option(c, checkpoint, "training checkpoint (.h5) or its export (hybrit checkpoint export)");
  c->add_option("--host", options.host, "address to listen on")->capture_default_str();
  c->add_option("--port", options.port, "port to listen on (0: any free port)")->capture_default_str()->check(CLI::Range(0, 65535));
  c->add_option("--max-running", e.max_running, "sequences batched per step")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(4096)));
  c->add_option("--max-waiting", e.max_waiting, "sequences queued for the batch; beyond this, requests get 429")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(4096)));
  c->add_option("--kv-blocks", e.kv_blocks, "KV cache blocks of 16 positions (0: the full context for every running sequence)")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1) << 30));
  c->add_option("--prefill-chunk", e.prefill_chunk, "prompt tokens computed per step")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  c->add_flag("--f32", f32, "use f32 weights instead of the packed 2-bit kernel");
  return c;
}

int ServeCommand::run(const GlobalOptions& g) {
#ifdef HYBRIT_HAVE_SERVER
  Dispatcher dispatcher(g.dispatcher());
  const std::string path = find_checkpoint(checkpoint);
  InferenceModel model(dispatcher, path, !f32);
  options.model_name = fs::path(path).stem().string();
  hybrit::serve(model, options, [&](int port) {
    std::printf("hybrit: serving %s (%s weights) on http://%s:%d (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /metrics); "
                "Ctrl-C stops\n",
                options.model_name.c_str(), model.packed() ? "packed 2-bit" : "f32", options.host.c_str(), port);
    std::fflush(stdout);
  });
  std::printf("hybrit: server stopped\n");
  return 0;
#else
  (void)g;
  fail(ErrorKind::unsupported, "this hybrit was built without cpp-httplib: install libcpp-httplib-dev and rebuild to get `hybrit serve`");
#endif
}

CLI::App* CheckpointCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("checkpoint", "look into or convert a training checkpoint");
  c->require_subcommand(1);
  inspect = c->add_subcommand("inspect", "step, config summary, and every dataset with its checksum verified");
  inspect->add_option("path", path, "checkpoint file (.h5), or a run folder (its newest valid checkpoint)")->required();
  exporter = c->add_subcommand("export", "write the packed inference file (.hyb: ternary weights at 2 bits each plus scales) or a GGUF file for llama.cpp");
  exporter->add_option("path", path, "checkpoint file (.h5), a run folder (its newest valid checkpoint) or an export (.hyb)")->required();
  exporter->add_option("-o,--out", export_out, "the file to write")->required();
  exporter->add_option("--format", format, "hyb (hybrit's inference file), gguf (llama.cpp's bitnet architecture), or auto: gguf when --out ends in .gguf")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "hyb", "gguf"}));
  exporter->add_option("--type", gguf.type, "gguf: the BitLinear weights' type, tq2_0, tq1_0 or f16 (f32 too for a full-precision model)")->capture_default_str();
  exporter->add_option("--name", gguf.name, "gguf: general.name (default: the checkpoint's file name)");
  return c;
}

int CheckpointCommand::run(const GlobalOptions& g) const {
  if (exporter->parsed()) {
    Dispatcher dispatcher(g.dispatcher());
    if (export_as_gguf(format, export_out)) {
      const GgufExportReport r = export_gguf(dispatcher, find_checkpoint(path), export_out, gguf);
      for (const auto& note : r.notes) log_warn(note);
      std::printf("wrote %s: GGUF, architecture %s, %lld tensors, %s (llama-cli -m %s runs it)\n", export_out.c_str(), r.architecture.c_str(),
                  static_cast<long long>(r.tensors), format_bytes(double(r.file_bytes)).c_str(), export_out.c_str());
      return 0;
    }
    const int64_t bytes = export_for_inference(dispatcher, find_checkpoint(path), export_out);
    std::printf("wrote %s: %s of weights\n", export_out.c_str(), format_bytes(double(bytes)).c_str());
    return 0;
  }
  const std::string file = fs::is_directory(path) ? find_checkpoint(path) : path;  // inspect looks at a damaged file too
  std::vector<CheckpointDataset> datasets;
  const CheckpointMeta meta = inspect_checkpoint(file, &datasets);
  const TrainConfig cfg = checkpoint_config(meta, file);
  const nlohmann::json tok = nlohmann::json::parse(meta.tokenizer_json);  // checkpoint_config checked it
  std::printf("checkpoint  %s\nstep        %lld (%lld tokens seen), seed %llu\n", file.c_str(), static_cast<long long>(meta.step),
              static_cast<long long>(meta.tokens_seen), static_cast<unsigned long long>(meta.seed));
  std::printf("model       %lld layers, dim %lld, %lld heads (%lld kv), ffn %s %lld, context %lld, quant %s%s%s\n", static_cast<long long>(cfg.model.n_layers),
              static_cast<long long>(cfg.model.dim), static_cast<long long>(cfg.model.n_heads), static_cast<long long>(cfg.model.kv_heads()),
              cfg.model.ffn == ModelConfig::Ffn::swiglu ? "swiglu" : "relu2", static_cast<long long>(cfg.model.hidden()),
              static_cast<long long>(cfg.model.context), cfg.model.quant == ModelConfig::Quant::ternary ? "ternary" : "none",
              cfg.model.subln ? ", subln" : "", cfg.model.tied_embeddings ? ", tied embeddings" : "");
  std::printf("tokenizer   %s, %d tokens\n\n", tok.value("kind", "?").c_str(), tok.value("vocab_size", 0));
  int64_t params = 0;
  for (const auto& d : datasets) {
    int64_t n = 1;
    for (int64_t e : d.shape) n *= e;
    if (d.name.rfind("params/", 0) == 0) params += n;
    std::printf("  %-40s %-14s %016llx %s\n", d.name.c_str(), shape_str(d.shape).c_str(), static_cast<unsigned long long>(d.checksum),
                d.checksum_ok ? "ok" : "CHECKSUM MISMATCH");
  }
  const std::vector<std::string> problems = checkpoint_layout_problems(cfg, datasets, meta.format_version);
  std::printf("\n%lld parameters; %zu datasets; %zu problems\n", static_cast<long long>(params), datasets.size(), problems.size());
  for (const auto& p : problems) std::printf("  %s\n", p.c_str());
  if (!problems.empty())
    fail(ErrorKind::corrupt_data, file, ": damaged: ", problems.front(), problems.size() > 1 ? cat(" (and ", problems.size() - 1, " more)") : "");
  return 0;
}

CLI::App* PlotCommand::add(CLI::App& app) {
  CLI::App* c = app.add_subcommand("plot", "draw the loss curves of one or more runs into one PNG (matplotlib)");
  c->add_option("runs", runs, "run folders (each with its metrics.jsonl)")->required()->check(CLI::ExistingDirectory);
  c->add_option("-o,--out", out, "the PNG to write (default: RUN/loss.png for one run, loss-compared.png for several)");
  return c;
}

int PlotCommand::run(const GlobalOptions&) const {
  const std::string png = !out.empty() ? out : runs.size() == 1 ? (fs::path(runs[0]) / "loss.png").string() : "loss-compared.png";
  std::string why_not;
  if (!plot_runs(runs, png, &why_not)) fail(ErrorKind::unsupported, "plot: ", why_not);
  std::printf("wrote %s\n", png.c_str());
  return 0;
}

}  // namespace hybrit::cli
