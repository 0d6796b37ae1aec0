// The `hybrit` command line. Parsing and printing only: the work lives in the libraries.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "clustering/reduce.hpp"
#include "inference/engine.hpp"
#include "inference/server.hpp"  // ServerOptions (the server itself links only with cpp-httplib)
#include "core/log.hpp"
#include "dispatch/dispatcher.hpp"
#include "dispatch/report.hpp"
#include "training/trainer.hpp"

#include <filesystem>

namespace {

using namespace hybrit;

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

void print_info(const HardwareInfo& hw) {
  std::string isa;
  for (auto [name, on] : {std::pair{"avx2", hw.avx2}, {"fma", hw.fma}, {"avx512f", hw.avx512f}, {"avx512bw", hw.avx512bw},
                          {"avx512vl", hw.avx512vl}, {"avx512dq", hw.avx512dq}, {"avx512vnni", hw.avx512vnni}, {"avxvnni", hw.avxvnni}})
    if (on) isa += std::string(isa.empty() ? "" : " ") + name;
  std::printf("CPU            %s\n", hw.cpu_model.c_str());
  std::printf("ISA            %s (kernels use %s)\n", isa.empty() ? "baseline x86-64 only" : isa.c_str(), to_string(hw.best_simd()));
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
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrit: train and serve 1.58-bit (ternary) transformer language models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("hybrit ") + HYBRIT_VERSION);
  std::string config, backend;
  app.add_option("--config", config, "YAML file whose `dispatch:` section sets backends, SIMD level, threads, profile")->check(CLI::ExistingFile);
  app.add_option("--backend", backend, "force one backend for every op: c, tbb, cuda or auto (overrides HYBRIT_BACKEND)");

  bool info_json = false;
  CLI::App* info = app.add_subcommand("info", "print what the hardware probe found: CPU, ISA, cores granted, caches, memory, GPUs");
  info->add_flag("--json", info_json, "machine-readable output");

  bool quick = false, report_json = false;
  std::string save_path, ops_text;
  CLI::App* report = app.add_subcommand("dispatch-report", "time every op on every backend and say what the dispatcher does with it");
  report->add_flag("--quick", quick, "smaller ladders and shorter timings (about 30 s on 2 cores)");
  report->add_flag("--json", report_json, "print the report as JSON");
  report->add_option("--save", save_path, "write the measurements as the dispatch profile to PATH (the default profile path is " + default_profile_path() + ")");
  report->add_option("--ops", ops_text, "comma-separated ops to measure (default: all)");

  std::string train_config, train_out;
  std::vector<std::string> train_sets;
  CLI::App* train = app.add_subcommand("train", "train a 1.58-bit (or full-precision) model from a YAML config");
  train->add_option("config", train_config, "the run's YAML file (see configs/tiny.yaml)")->required()->check(CLI::ExistingFile);
  train->add_option("--set", train_sets, "override a key, e.g. --set train.steps=100 (repeatable)");
  train->add_option("--out", train_out, "run folder (default: runs/<config name>-<date>-<time>)");
  std::string train_resume;
  train->add_option("--resume", train_resume, "continue from a checkpoint: its path, or `auto` (the newest valid one in --out)");

  std::string reduce_config, reduce_out;
  std::vector<std::string> reduce_sets;
  CLI::App* reduce = app.add_subcommand("reduce", "shrink a corpus: embed records, cluster them, keep a subset by strategy (see configs/reduce.yaml)");
  reduce->add_option("config", reduce_config, "the reduction's YAML file")->required()->check(CLI::ExistingFile);
  reduce->add_option("--set", reduce_sets, "override a key, e.g. --set reduce.strategy=hard (repeatable)");
  reduce->add_option("--out", reduce_out, "output folder (default: runs/<config name>-<date>-<time>)");

  std::string gen_checkpoint, gen_prompt;
  std::vector<std::string> gen_stop;
  GenerationRequest gen;
  bool gen_f32 = false;
  CLI::App* generate = app.add_subcommand("generate", "write text with a trained model (packed ternary weights, KV cache), streamed as it is made");
  generate->add_option("--checkpoint", gen_checkpoint, "training checkpoint (.h5) or its export (hybrit checkpoint export)")->required()->check(CLI::ExistingFile);
  generate->add_option("--prompt", gen_prompt, "text the output continues")->required();
  generate->add_option("--max-tokens", gen.max_tokens, "most tokens to write")->capture_default_str();
  generate->add_option("--temperature", gen.sampling.temperature, "0: greedy")->capture_default_str();
  generate->add_option("--top-k", gen.sampling.top_k, "keep the k most likely tokens (0: off)")->capture_default_str();
  generate->add_option("--top-p", gen.sampling.top_p, "nucleus: the smallest set reaching this probability (1: off)")->capture_default_str();
  generate->add_option("--min-p", gen.sampling.min_p, "drop tokens below this fraction of the top probability (0: off)")->capture_default_str();
  generate->add_option("--repetition-penalty", gen.sampling.repetition_penalty, "divide (or multiply) logits of tokens already seen (1: off)")
      ->capture_default_str();
  generate->add_option("--seed", gen.sampling.seed, "the same seed gives the same text")->capture_default_str();
  generate->add_option("--stop", gen_stop, "end the output before this text (repeatable)");
  generate->add_flag("--f32", gen_f32, "use f32 weights (the ternary values times their scale) instead of the packed 2-bit kernel");

  std::string serve_checkpoint;
  bool serve_f32 = false;
  ServerOptions serve_options;  // its defaults are the server's
  EngineOptions& serve_engine = serve_options.engine;
  CLI::App* serve = app.add_subcommand("serve", "an OpenAI-style HTTP endpoint: POST /v1/completions (streaming with SSE), GET /health, GET /metrics");
  serve->add_option("--checkpoint", serve_checkpoint, "training checkpoint (.h5) or its export (hybrit checkpoint export)")->required()->check(CLI::ExistingFile);
  serve->add_option("--host", serve_options.host, "address to listen on")->capture_default_str();
  serve->add_option("--port", serve_options.port, "port to listen on (0: any free port)")->capture_default_str()->check(CLI::Range(0, 65535));
  serve->add_option("--max-running", serve_engine.max_running, "sequences batched per step")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(4096)));
  serve->add_option("--max-waiting", serve_engine.max_waiting, "sequences queued for the batch; beyond this, requests get 429")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(4096)));
  serve->add_option("--kv-blocks", serve_engine.kv_blocks, "KV cache blocks of 16 positions (0: the full context for every running sequence)")
      ->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1) << 30));
  serve->add_option("--prefill-chunk", serve_engine.prefill_chunk, "prompt tokens computed per step")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  serve->add_flag("--f32", serve_f32, "use f32 weights instead of the packed 2-bit kernel");

  std::string ckpt_path, export_out;
  CLI::App* ckpt = app.add_subcommand("checkpoint", "look into or convert a training checkpoint");
  ckpt->require_subcommand(1);
  CLI::App* inspect = ckpt->add_subcommand("inspect", "step, config summary, and every dataset with its checksum verified");
  inspect->add_option("path", ckpt_path, "checkpoint file (.h5)")->required();
  CLI::App* exporter = ckpt->add_subcommand("export", "write the packed inference file (ternary weights at 2 bits each plus scales)");
  exporter->add_option("path", ckpt_path, "checkpoint file (.h5)")->required();
  exporter->add_option("--out", export_out, "the inference file to write")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  try {
    // The front end's dispatch sources; resolve_overrides puts them in order with the run
    // config's section and the environment.
    DispatcherOptions options;
    options.config_path = config;
    if (!backend.empty()) {
      if (backend == "auto") options.overrides.backend_auto = true;
      else options.overrides.backend = parse_backend(backend, "--backend");
      options.overrides.source = "--backend";
    }
    if (*info) {
      const HardwareInfo& hw = hardware();
      if (info_json) std::cout << hardware_json(hw).dump(2) << "\n";
      else print_info(hw);
      return 0;
    }
    if (*inspect) {
      std::vector<CheckpointDataset> datasets;
      const CheckpointMeta meta = inspect_checkpoint(ckpt_path, &datasets);
      const TrainConfig cfg = checkpoint_config(meta, ckpt_path);
      const nlohmann::json tok = nlohmann::json::parse(meta.tokenizer_json);  // checkpoint_config checked it
      std::printf("checkpoint  %s\nstep        %lld (%lld tokens seen), seed %llu\n", ckpt_path.c_str(), static_cast<long long>(meta.step),
                  static_cast<long long>(meta.tokens_seen), static_cast<unsigned long long>(meta.seed));
      std::printf("model       %lld layers, dim %lld, %lld heads (%lld kv), ffn %s %lld, context %lld, quant %s%s%s\n",
                  static_cast<long long>(cfg.model.n_layers), static_cast<long long>(cfg.model.dim), static_cast<long long>(cfg.model.n_heads),
                  static_cast<long long>(cfg.model.kv_heads()), cfg.model.ffn == ModelConfig::Ffn::swiglu ? "swiglu" : "relu2",
                  static_cast<long long>(cfg.model.hidden()), static_cast<long long>(cfg.model.context),
                  cfg.model.quant == ModelConfig::Quant::ternary ? "ternary" : "none", cfg.model.subln ? ", subln" : "",
                  cfg.model.tied_embeddings ? ", tied embeddings" : "");
      std::printf("tokenizer   %s, %d tokens\n\n", tok.value("kind", "?").c_str(), tok.value("vocab_size", 0));
      int64_t params = 0;
      for (const auto& d : datasets) {
        int64_t n = 1;
        for (int64_t e : d.shape) n *= e;
        if (d.name.rfind("params/", 0) == 0) params += n;
        std::printf("  %-40s %-14s %016llx %s\n", d.name.c_str(), shape_str(d.shape).c_str(), static_cast<unsigned long long>(d.checksum),
                    d.checksum_ok ? "ok" : "CHECKSUM MISMATCH");
      }
      const std::vector<std::string> problems = checkpoint_layout_problems(cfg, datasets);
      std::printf("\n%lld parameters; %zu datasets; %zu problems\n", static_cast<long long>(params), datasets.size(), problems.size());
      for (const auto& p : problems) std::printf("  %s\n", p.c_str());
      if (!problems.empty())
        fail(ErrorKind::corrupt_data, ckpt_path, ": damaged: ", problems.front(), problems.size() > 1 ? cat(" (and ", problems.size() - 1, " more)") : "");
      return 0;
    }
    if (*exporter) {
      Dispatcher dispatcher(options);
      const int64_t bytes = export_for_inference(dispatcher, ckpt_path, export_out);
      std::printf("wrote %s: %s of weights\n", export_out.c_str(), format_bytes(double(bytes)).c_str());
      return 0;
    }
    if (*train) {
      TrainConfig cfg = load_train_config(train_config, train_sets);
      cfg.dispatch_sources = options;
      if (train_out.empty() && !train_resume.empty()) {
        if (train_resume == "auto") fail(ErrorKind::invalid_argument, "--resume auto: name the run folder with --out");
        train_out = std::filesystem::path(train_resume).parent_path().string();
      }
      if (train_out.empty()) train_out = default_run_folder(std::filesystem::path(train_config).stem().string());
      const RunResult r = run_training(cfg, train_out, train_resume);
      std::printf("%s after %lld steps: loss %.4f%s; run folder %s\n", r.interrupted ? "stopped" : "done", static_cast<long long>(r.steps_done),
                  r.last_loss, r.val_loss ? cat(", validation loss ", *r.val_loss).c_str() : "", train_out.c_str());
      if (!r.sample.empty()) std::printf("\nA sample from the model:\n%s\n", r.sample.c_str());
      return 0;
    }
    if (*generate) {
      Dispatcher dispatcher(options);
      InferenceModel model(dispatcher, gen_checkpoint, !gen_f32);
      EngineOptions one_request;
      one_request.max_running = 1, one_request.max_waiting = 1;
      Engine engine(model, one_request);
      model.tokenizer().encode(gen_prompt, gen.prompt);
      gen.stop = gen_stop;
      FinishReason why = FinishReason::none;
      int64_t tokens = 0;
      gen.on_event = [&](const GenerationEvent& e) {
        std::fputs(printable_utf8(e.text).c_str(), stdout);
        std::fflush(stdout);
        tokens += e.token >= 0;
        if (e.finished != FinishReason::none) why = e.finished;
      };
      std::fputs(gen_prompt.c_str(), stdout);
      Timer timer;
      engine.submit(std::move(gen));
      engine.run();
      std::printf("\n");
      std::fprintf(stderr, "hybrit: %lld tokens in %.2f s (%.1f tokens/s, %s weights), finished: %s\n", static_cast<long long>(tokens), timer.seconds(),
                   double(tokens) / timer.seconds(), model.packed() ? "packed 2-bit" : "f32", to_string(why));
      return 0;
    }
    if (*serve) {
#ifdef HYBRIT_HAVE_SERVER
      Dispatcher dispatcher(options);
      InferenceModel model(dispatcher, serve_checkpoint, !serve_f32);
      ServerOptions& so = serve_options;
      so.model_name = std::filesystem::path(serve_checkpoint).stem().string();
      hybrit::serve(model, so, [&](int port) {
        std::printf("hybrit: serving %s (%s weights) on http://%s:%d (POST /v1/completions, GET /health, GET /metrics); Ctrl-C stops\n",
                    so.model_name.c_str(), model.packed() ? "packed 2-bit" : "f32", so.host.c_str(), port);
        std::fflush(stdout);
      });
      std::printf("hybrit: server stopped\n");
      return 0;
#else
      fail(ErrorKind::unsupported, "this hybrit was built without cpp-httplib: install libcpp-httplib-dev and rebuild to get `hybrit serve`");
#endif
    }
    if (*reduce) {
      ReduceConfig cfg = load_reduce_config(reduce_config, reduce_sets);
      cfg.dispatch_sources = options;
      if (reduce_out.empty()) reduce_out = default_run_folder(std::filesystem::path(reduce_config).stem().string());
      const nlohmann::json r = run_reduce(cfg, reduce_out);
      std::cout << format_reduce_report(r);
      std::printf("report: %s/report.json; train on it with --set data.sources=%s\n", reduce_out.c_str(), r["output"].get<std::string>().c_str());
      return 0;
    }
    if (*report) {
      ReportOptions ro;
      ro.quick = quick;
      for (const auto& name : split_commas(ops_text)) ro.ops.push_back(parse_op(name, "--ops"));
      Dispatcher dispatcher(options);
      const nlohmann::json r = run_dispatch_report(dispatcher, ro);
      if (report_json) std::cout << r.dump(2) << "\n";
      else std::cout << format_report(r);
      if (!save_path.empty()) {
        save_profile(profile_from_report(r, dispatcher), save_path);
        std::cerr << "hybrit: saved the measured dispatch profile to " << save_path
                  << (save_path == default_profile_path() ? " (loaded automatically from now on)\n" : " (use it with HYBRIT_PROFILE or dispatch.profile)\n");
      }
      return 0;
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "hybrit: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hybrit: internal error: %s\n", e.what());
    return 3;
  }
  return 0;
}
