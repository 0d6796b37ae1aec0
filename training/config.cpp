#include "training/config.hpp"
#include "core/yaml_schema.hpp"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

namespace hybrit {


using namespace schema;

namespace {
using M = ModelConfig;
// Beyond these a run is a typo, not a plan: each would run for days with no sign of progress.
constexpr int64_t kMaxSteps = int64_t(1) << 40, kMaxBatch = 1 << 20, kMaxEvalBatches = 100000, kMaxSampleTokens = 1000000;
constexpr int64_t kMaxNsSteps = 100;  // Muon uses 5; past a few dozen Newton-Schulz steps nothing changes
}  // namespace

namespace {
// The `model:` section's keys, shared by training configs and Python's Model({...}). `remember`
// notes each shape key's origin, for errors that involve several keys.
std::map<std::string, Handler> model_keys(ModelConfig& m, const Origins& o, const std::function<void(const YAML::Node&, const std::string&)>& remember) {
  return {
      {"vocab_size", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.vocab_size = as_int(n, k, o, 1, M::kMaxVocab); }},
      {"dim", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.dim = as_int(n, k, o, 1, M::kMaxDim); }},
      {"n_layers", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.n_layers = as_int(n, k, o, 1, M::kMaxLayers); }},
      {"n_heads", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.n_heads = as_int(n, k, o, 1, M::kMaxHeads); }},
      {"n_kv_heads", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.n_kv_heads = as_int(n, k, o, 0, M::kMaxHeads); }},
      {"ffn_hidden", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.ffn_hidden = as_int(n, k, o, 0, M::kMaxFfnHidden); }},
      {"context", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.context = as_int(n, k, o, 1, M::kMaxContext); }},
      {"rope_theta", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.rope_theta = as_double(n, k, o, above(0)); }},
      {"norm_eps", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.norm_eps = as_double(n, k, o, open_closed(0, 1)); }},
      {"ffn", [&](const YAML::Node& n, const std::string& k) { m.ffn = as_choice(n, k, o, {"swiglu", "relu2"}) == "swiglu" ? ModelConfig::Ffn::swiglu : ModelConfig::Ffn::relu2; }},
      {"quant", [&](const YAML::Node& n, const std::string& k) { m.quant = as_choice(n, k, o, {"ternary", "none"}) == "ternary" ? ModelConfig::Quant::ternary : ModelConfig::Quant::none; }},
      {"subln", [&](const YAML::Node& n, const std::string& k) { m.subln = as_bool(n, k, o); }},
      {"tied_embeddings", [&](const YAML::Node& n, const std::string& k) { m.tied_embeddings = as_bool(n, k, o); }},
  };
}
}  // namespace

ModelConfig parse_model_config(const YAML::Node& section, const std::string& source) {
  Origins o;
  o.file = source;
  ModelConfig m;
  walk(section, "model", o, model_keys(m, o, [](const YAML::Node&, const std::string&) {}));
  try {
    m.validate();
  } catch (const Error& e) {
    fail(ErrorKind::invalid_argument, source, ": ", e.what());
  }
  return m;
}

TrainConfig parse_train_config(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets) {
  Origins o;
  const YAML::Node root = load_yaml(yaml_text, file_name, sets, o);

  TrainConfig c;
  c.source = file_name;
  ModelConfig& m = c.model;
  DataConfig& d = c.data;
  TrainLoopConfig& t = c.train;
  OptimizerConfig& op = c.optim;
  std::map<std::string, std::string> model_lines;  // for shape errors, which involve several keys
  std::string grad_accum_line = file_name;         // for train.batch / train.grad_accum
  auto remember = [&](const YAML::Node& n, const std::string& key) { model_lines[key] = o.where(n, key); };

  walk(root, "", o, {
    {"seed", [&](const YAML::Node& n, const std::string& k) { c.seed = uint64_t(as_int(n, k, o, 0)); }},
    {"model", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, model_keys(m, o, remember));
     }},
    {"data", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"sources", [&](const YAML::Node& n, const std::string& k) { d.sources = as_path_list(n, k, o); }},
         {"format", [&](const YAML::Node& n, const std::string& k) { d.format = as_choice(n, k, o, corpus_format_choices()); }},
         {"tokenizer", [&](const YAML::Node& n, const std::string& k) { d.tokenizer = as_choice(n, k, o, {"byte", "bpe"}); }},
         {"vocab_size", [&](const YAML::Node& n, const std::string& k) {
            d.vocab_size = as_int(n, k, o, 320, M::kMaxVocab);
          }},
         {"val_fraction", [&](const YAML::Node& n, const std::string& k) {
            d.val_fraction = as_double(n, k, o, open_interval(0, 1));
          }},
         {"val_sources", [&](const YAML::Node& n, const std::string& k) { d.val_sources = as_path_list(n, k, o); }},
       });
     }},
    {"train", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"steps", [&](const YAML::Node& n, const std::string& k) { t.steps = as_int(n, k, o, 1, kMaxSteps); }},
         {"batch", [&](const YAML::Node& n, const std::string& k) { t.batch = as_int(n, k, o, 1, kMaxBatch); }},
         {"grad_accum", [&](const YAML::Node& n, const std::string& k) {
            t.grad_accum = as_int(n, k, o, 1, kMaxBatch);
            grad_accum_line = o.where(n, k);
          }},
         {"recompute", [&](const YAML::Node& n, const std::string& k) { t.recompute = as_choice(n, k, o, {"none", "attention", "block"}); }},
         {"eval_every", [&](const YAML::Node& n, const std::string& k) { t.eval_every = as_int(n, k, o, 0, kMaxSteps); }},
         {"eval_batches", [&](const YAML::Node& n, const std::string& k) { t.eval_batches = as_int(n, k, o, 1, kMaxEvalBatches); }},
         {"log_every", [&](const YAML::Node& n, const std::string& k) { t.log_every = as_int(n, k, o, 1, kMaxSteps); }},
         {"sample_tokens", [&](const YAML::Node& n, const std::string& k) { t.sample_tokens = as_int(n, k, o, 0, kMaxSampleTokens); }},
         {"sample_prompt", [&](const YAML::Node& n, const std::string& k) { t.sample_prompt = as_string(n, k, o); }},
         {"sample_temperature", [&](const YAML::Node& n, const std::string& k) {
            t.sample_temperature = as_double(n, k, o, closed(0, 100));
          }},
         {"on_nonfinite", [&](const YAML::Node& n, const std::string& k) { t.on_nonfinite = as_choice(n, k, o, {"stop", "skip"}); }},
         {"checkpoint_every", [&](const YAML::Node& n, const std::string& k) { t.checkpoint_every = as_int(n, k, o, 0, kMaxSteps); }},
         {"keep_checkpoints", [&](const YAML::Node& n, const std::string& k) { t.keep_checkpoints = as_int(n, k, o, 1, 1000000); }},
         {"keep_best", [&](const YAML::Node& n, const std::string& k) { t.keep_best = as_bool(n, k, o); }},
       });
     }},
    {"optim", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"grad_clip", [&](const YAML::Node& n, const std::string& k) { op.grad_clip = as_double(n, k, o, at_least(0)); }},
         {"matrices", [&](const YAML::Node& n, const std::string& k) {
            op.matrices = as_choice(n, k, o, {"muon", "adamw"}) == "muon" ? OptimizerConfig::Matrices::muon : OptimizerConfig::Matrices::adamw;
          }},
         {"schedule", [&](const YAML::Node& s, const std::string& sp) {
            walk(s, sp, o, {
              {"kind", [&](const YAML::Node& n, const std::string& k) { op.schedule.kind = parse_schedule_kind(as_string(n, k, o), o.where(n, k) + ": " + k); }},
              {"warmup_steps", [&](const YAML::Node& n, const std::string& k) { op.schedule.warmup_steps = as_int(n, k, o, 0, kMaxSteps); }},
              {"min_lr_ratio", [&](const YAML::Node& n, const std::string& k) { op.schedule.min_lr_ratio = as_double(n, k, o, closed(0, 1)); }},
              {"decay_fraction", [&](const YAML::Node& n, const std::string& k) { op.schedule.decay_fraction = as_double(n, k, o, closed(0, 1)); }},
              {"stage2_lr_ratio", [&](const YAML::Node& n, const std::string& k) { op.schedule.stage2_lr_ratio = as_double(n, k, o, closed(0, 1)); }},
              {"total_steps", [&](const YAML::Node& n, const std::string& k) { c.schedule_total_steps = as_int(n, k, o, 0, kMaxSteps); }},
            });
          }},
         {"muon", [&](const YAML::Node& s, const std::string& sp) {
            walk(s, sp, o, {
              {"lr", [&](const YAML::Node& n, const std::string& k) { op.muon.lr = as_double(n, k, o, at_least(0)); }},
              {"momentum", [&](const YAML::Node& n, const std::string& k) { op.muon.momentum = as_double(n, k, o, closed_open(0, 1)); }},
              {"nesterov", [&](const YAML::Node& n, const std::string& k) { op.muon.nesterov = as_bool(n, k, o); }},
              {"ns_steps", [&](const YAML::Node& n, const std::string& k) { op.muon.ns_steps = int(as_int(n, k, o, 1, kMaxNsSteps)); }},
              {"weight_decay", [&](const YAML::Node& n, const std::string& k) { op.muon.weight_decay = as_double(n, k, o, at_least(0)); }},
            });
          }},
         {"adamw", [&](const YAML::Node& s, const std::string& sp) {
            walk(s, sp, o, {
              {"lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.lr = as_double(n, k, o, at_least(0)); }},
              {"beta1", [&](const YAML::Node& n, const std::string& k) { op.adamw.beta1 = as_double(n, k, o, closed_open(0, 1)); }},
              {"beta2", [&](const YAML::Node& n, const std::string& k) { op.adamw.beta2 = as_double(n, k, o, closed_open(0, 1)); }},
              {"eps", [&](const YAML::Node& n, const std::string& k) { op.adamw.eps = as_double(n, k, o, above(0)); }},
              {"weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.weight_decay = as_double(n, k, o, at_least(0)); }},
              {"embedding_lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.embedding_lr = as_double(n, k, o, at_least(0)); }},
              {"head_lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.head_lr = as_double(n, k, o, at_least(0)); }},
              {"norm_lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.norm_lr = as_double(n, k, o, at_least(0)); }},
              {"embedding_weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.embedding_weight_decay = as_double(n, k, o, at_least(0)); }},
              {"head_weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.head_weight_decay = as_double(n, k, o, at_least(0)); }},
              {"norm_weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.norm_weight_decay = as_double(n, k, o, at_least(0)); }},
            });
          }},
       });
     }},
    {"dispatch", [&](const YAML::Node& sec, const std::string& p) { c.dispatch = overrides_from_section(sec, p, o); }},
  });
  if (t.batch % t.grad_accum)
    fail(ErrorKind::invalid_argument, grad_accum_line, ": train.grad_accum: train.batch (", t.batch, ") must split into ", t.grad_accum,
         " equal micro-batches; pick a divisor of it");
  c.optim.schedule.total_steps = c.schedule_total_steps > 0 ? c.schedule_total_steps : t.steps;
  // The tokenizer decides the vocabulary (BPE may settle on fewer tokens than asked for a small
  // corpus; the trainer then takes the count from the trained model).
  const int64_t tokenizer_vocab = d.tokenizer == "byte" ? 257 : d.vocab_size;
  if (model_lines.count("model.vocab_size") && m.vocab_size != tokenizer_vocab)
    fail(ErrorKind::invalid_argument, model_lines["model.vocab_size"], ": model.vocab_size: the ", d.tokenizer, " tokenizer has ", tokenizer_vocab,
         " tokens, got ", m.vocab_size, " (leave model.vocab_size out)");
  m.vocab_size = tokenizer_vocab;
  try {
    m.validate();
  } catch (const Error& e) {
    // Shape errors name their keys ("model.dim (50) must be divisible by model.n_heads (4)"):
    // point at the line of the first key named.
    const std::string msg = e.what();
    std::string where = file_name;
    size_t best = std::string::npos;
    for (const auto& [key, line] : model_lines)
      if (size_t at = msg.find(key); at != std::string::npos && at < best) best = at, where = line;
    fail(ErrorKind::invalid_argument, where, ": ", msg);
  }
  return c;
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& sets) {
  return parse_train_config(read_config_file(path), path, sets);
}

std::string TrainConfig::to_yaml() const {
  YAML::Emitter y;
  y << YAML::BeginMap;
  y << YAML::Key << "seed" << YAML::Value << seed;
  y << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  y << YAML::Key << "vocab_size" << YAML::Value << model.vocab_size << YAML::Key << "dim" << YAML::Value << model.dim;
  y << YAML::Key << "n_layers" << YAML::Value << model.n_layers << YAML::Key << "n_heads" << YAML::Value << model.n_heads;
  y << YAML::Key << "n_kv_heads" << YAML::Value << model.kv_heads() << YAML::Key << "ffn_hidden" << YAML::Value << model.hidden();
  y << YAML::Key << "context" << YAML::Value << model.context << YAML::Key << "rope_theta" << YAML::Value << yaml_number(model.rope_theta);
  y << YAML::Key << "norm_eps" << YAML::Value << yaml_number(model.norm_eps);
  y << YAML::Key << "ffn" << YAML::Value << (model.ffn == ModelConfig::Ffn::swiglu ? "swiglu" : "relu2");
  y << YAML::Key << "quant" << YAML::Value << (model.quant == ModelConfig::Quant::ternary ? "ternary" : "none");
  y << YAML::Key << "subln" << YAML::Value << model.subln << YAML::Key << "tied_embeddings" << YAML::Value << model.tied_embeddings;
  y << YAML::EndMap;
  y << YAML::Key << "data" << YAML::Value << YAML::BeginMap << YAML::Key << "sources" << YAML::Value << data.sources;
  y << YAML::Key << "format" << YAML::Value << data.format << YAML::Key << "tokenizer" << YAML::Value << data.tokenizer;
  if (data.tokenizer == "bpe") y << YAML::Key << "vocab_size" << YAML::Value << data.vocab_size;
  y << YAML::Key << "val_fraction" << YAML::Value << yaml_number(data.val_fraction);
  if (!data.val_sources.empty()) y << YAML::Key << "val_sources" << YAML::Value << data.val_sources;
  y << YAML::EndMap;
  y << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  y << YAML::Key << "steps" << YAML::Value << train.steps << YAML::Key << "batch" << YAML::Value << train.batch;
  y << YAML::Key << "grad_accum" << YAML::Value << train.grad_accum << YAML::Key << "recompute" << YAML::Value << train.recompute;
  y << YAML::Key << "eval_every" << YAML::Value << train.eval_every << YAML::Key << "eval_batches" << YAML::Value << train.eval_batches;
  y << YAML::Key << "log_every" << YAML::Value << train.log_every << YAML::Key << "sample_tokens" << YAML::Value << train.sample_tokens;
  y << YAML::Key << "sample_prompt" << YAML::Value << YAML::DoubleQuoted << train.sample_prompt;
  y << YAML::Key << "sample_temperature" << YAML::Value << yaml_number(train.sample_temperature);
  y << YAML::Key << "on_nonfinite" << YAML::Value << train.on_nonfinite;
  y << YAML::Key << "checkpoint_every" << YAML::Value << train.checkpoint_every << YAML::Key << "keep_checkpoints" << YAML::Value << train.keep_checkpoints;
  y << YAML::Key << "keep_best" << YAML::Value << train.keep_best;
  y << YAML::EndMap;
  y << YAML::Key << "optim" << YAML::Value << YAML::BeginMap << YAML::Key << "grad_clip" << YAML::Value << yaml_number(optim.grad_clip);
  y << YAML::Key << "matrices" << YAML::Value << (optim.matrices == OptimizerConfig::Matrices::muon ? "muon" : "adamw");
  y << YAML::Key << "schedule" << YAML::Value << YAML::BeginMap << YAML::Key << "kind" << YAML::Value << to_string(optim.schedule.kind);
  y << YAML::Key << "warmup_steps" << YAML::Value << optim.schedule.warmup_steps << YAML::Key << "min_lr_ratio" << YAML::Value << yaml_number(optim.schedule.min_lr_ratio);
  y << YAML::Key << "decay_fraction" << YAML::Value << yaml_number(optim.schedule.decay_fraction);
  y << YAML::Key << "stage2_lr_ratio" << YAML::Value << yaml_number(optim.schedule.stage2_lr_ratio);
  if (schedule_total_steps > 0) y << YAML::Key << "total_steps" << YAML::Value << schedule_total_steps;
  y << YAML::EndMap;
  y << YAML::Key << "muon" << YAML::Value << YAML::BeginMap << YAML::Key << "lr" << YAML::Value << yaml_number(optim.muon.lr);
  y << YAML::Key << "momentum" << YAML::Value << yaml_number(optim.muon.momentum) << YAML::Key << "nesterov" << YAML::Value << optim.muon.nesterov;
  y << YAML::Key << "ns_steps" << YAML::Value << optim.muon.ns_steps << YAML::Key << "weight_decay" << YAML::Value << yaml_number(optim.muon.weight_decay) << YAML::EndMap;
  y << YAML::Key << "adamw" << YAML::Value << YAML::BeginMap << YAML::Key << "lr" << YAML::Value << yaml_number(optim.adamw.lr);
  y << YAML::Key << "beta1" << YAML::Value << yaml_number(optim.adamw.beta1) << YAML::Key << "beta2" << YAML::Value << yaml_number(optim.adamw.beta2);
  y << YAML::Key << "eps" << YAML::Value << yaml_number(optim.adamw.eps) << YAML::Key << "weight_decay" << YAML::Value << yaml_number(optim.adamw.weight_decay);
  const std::pair<const char*, double> groups[] = {{"embedding_lr", optim.adamw.embedding_lr}, {"head_lr", optim.adamw.head_lr},
                                                   {"norm_lr", optim.adamw.norm_lr}, {"embedding_weight_decay", optim.adamw.embedding_weight_decay},
                                                   {"head_weight_decay", optim.adamw.head_weight_decay}, {"norm_weight_decay", optim.adamw.norm_weight_decay}};
  for (const auto& [key, value] : groups)
    if (value >= 0) y << YAML::Key << key << YAML::Value << yaml_number(value);
  y << YAML::EndMap;  // adamw
  y << YAML::EndMap;  // optim
  if (!dispatch.empty()) {  // the section as the file gave it (`auto` kept: it undoes lower sources)
    y << YAML::Key << "dispatch" << YAML::Value << YAML::BeginMap;
    if (dispatch.backend || dispatch.backend_auto) y << YAML::Key << "backend" << YAML::Value << (dispatch.backend ? to_string(*dispatch.backend) : "auto");
    if (!dispatch.per_op.empty() || !dispatch.per_op_auto.empty()) {
      y << YAML::Key << "ops" << YAML::Value << YAML::BeginMap;
      for (const auto& [op, kind] : dispatch.per_op) y << YAML::Key << to_string(op) << YAML::Value << to_string(kind);
      for (Op op : dispatch.per_op_auto) y << YAML::Key << to_string(op) << YAML::Value << "auto";
      y << YAML::EndMap;
    }
    if (dispatch.simd || dispatch.simd_auto) y << YAML::Key << "simd" << YAML::Value << (dispatch.simd ? to_string(*dispatch.simd) : "auto");
    if (dispatch.threads > 0 || dispatch.threads_auto) y << YAML::Key << "threads" << YAML::Value << (dispatch.threads > 0 ? cat(dispatch.threads) : "auto");
    if (!dispatch.profile_path.empty() || dispatch.profile_auto)
      y << YAML::Key << "profile" << YAML::Value << (dispatch.profile_path.empty() ? "auto" : dispatch.profile_path);
    y << YAML::EndMap;
  }
  y << YAML::EndMap;
  return std::string(y.c_str()) + "\n";
}

}  // namespace hybrit
