#include "training/config.hpp"
#include "training/yaml_schema.hpp"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

namespace hybrit {

// The schema helpers (declared in yaml_schema.hpp), shared with the data-reduction config.
namespace schema {

[[noreturn]] void bad(const std::string& where, const std::string& key, const std::string& what) {
  fail(ErrorKind::invalid_argument, where, ": ", key, ": ", what);
}

std::string scalar_text(const YAML::Node& n) { return n.IsScalar() ? n.Scalar() : std::string(n.IsSequence() ? "a list" : n.IsMap() ? "a mapping" : "nothing"); }

int64_t as_int(const YAML::Node& n, const std::string& key, const Origins& o, int64_t min_value) {
  int64_t v = 0;
  if (!n.IsScalar() || !YAML::convert<int64_t>::decode(n, v)) bad(o.where(n, key), key, cat("expected an integer, got '", scalar_text(n), "'"));
  if (v < min_value) bad(o.where(n, key), key, cat("expected an integer >= ", min_value, ", got ", v));
  return v;
}
double as_double(const YAML::Node& n, const std::string& key, const Origins& o) {
  double v = 0;
  if (!n.IsScalar() || !YAML::convert<double>::decode(n, v) || !std::isfinite(v)) bad(o.where(n, key), key, cat("expected a number, got '", scalar_text(n), "'"));
  return v;
}
bool as_bool(const YAML::Node& n, const std::string& key, const Origins& o) {
  bool v = false;
  if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v)) bad(o.where(n, key), key, cat("expected true or false, got '", scalar_text(n), "'"));
  return v;
}
std::string as_string(const YAML::Node& n, const std::string& key, const Origins& o) {
  if (!n.IsScalar()) bad(o.where(n, key), key, cat("expected a single value, got ", scalar_text(n)));
  return n.Scalar();
}
std::string as_choice(const YAML::Node& n, const std::string& key, const Origins& o, const std::vector<std::string>& choices) {
  const std::string v = as_string(n, key, o);
  std::string all;
  for (const auto& c : choices) {
    if (v == c) return v;
    all += (all.empty() ? "" : ", ") + c;
  }
  bad(o.where(n, key), key, cat("expected one of ", all, ", got '", v, "'"));
}

// Walks a mapping with one handler per allowed key; anything else is an unknown key.
void walk(const YAML::Node& map, const std::string& prefix, const Origins& o, const std::map<std::string, Handler>& keys) {
  if (!map.IsMap()) bad(o.where(map, prefix), prefix, cat("expected a mapping, got ", scalar_text(map)));
  for (const auto& kv : map) {
    const std::string key = kv.first.Scalar(), full = prefix.empty() ? key : prefix + "." + key;
    auto it = keys.find(key);
    if (it == keys.end()) {
      std::string all;
      for (const auto& [name, _] : keys) all += (all.empty() ? "" : ", ") + name;
      bad(o.where(kv.first, full), full, cat("unknown key (expected one of: ", all, ")"));
    }
    it->second(kv.second, full);
  }
}

// `a.b.c=value` into the tree, the value parsed as YAML (so numbers, booleans and lists work).
void apply_set(YAML::Node& root, const std::string& assignment, Origins& o) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) fail(ErrorKind::invalid_argument, "--set ", assignment, ": expected key=value");
  const std::string path = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  YAML::Node value;
  try {
    value = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(ErrorKind::invalid_argument, "--set ", assignment, ": the value is not valid YAML (", e.msg, ")");
  }
  std::vector<std::string> parts;
  std::stringstream ss(path);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = chain.back()[parts[i]];
    if (!next.IsDefined() || next.IsNull()) next = YAML::Node(YAML::NodeType::Map);
    if (!next.IsMap()) fail(ErrorKind::invalid_argument, "--set ", assignment, ": ", parts[i], " is not a section");
    chain.back()[parts[i]] = next;
    chain.push_back(next);
  }
  chain.back()[parts.back()] = value;
  o.of_key[path] = "--set " + assignment;
}

std::vector<std::string> as_path_list(const YAML::Node& n, const std::string& key, const Origins& o) {
  std::vector<std::string> paths;
  if (n.IsScalar()) paths.push_back(n.Scalar());
  else if (n.IsSequence()) for (const auto& s : n) paths.push_back(as_string(s, key, o));
  else bad(o.where(n, key), key, "expected a path or a list of paths");
  if (paths.empty()) bad(o.where(n, key), key, "expected at least one path");
  return paths;
}

std::string read_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(ErrorKind::io, path, ": cannot open config file");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

YAML::Node load_yaml(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets, Origins& o) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    fail(ErrorKind::invalid_argument, file_name, ":", e.mark.line + 1, ": YAML syntax error: ", e.msg);
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  o.file = file_name;
  for (const auto& s : sets) apply_set(root, s, o);
  return root;
}

}  // namespace schema

using namespace schema;

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
       walk(sec, p, o, {
         {"vocab_size", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.vocab_size = as_int(n, k, o, 1); }},
         {"dim", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.dim = as_int(n, k, o, 1); }},
         {"n_layers", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.n_layers = as_int(n, k, o, 1); }},
         {"n_heads", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.n_heads = as_int(n, k, o, 1); }},
         {"n_kv_heads", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.n_kv_heads = as_int(n, k, o, 0); }},
         {"ffn_hidden", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.ffn_hidden = as_int(n, k, o, 0); }},
         {"context", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.context = as_int(n, k, o, 1); }},
         {"rope_theta", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.rope_theta = as_double(n, k, o); }},
         {"norm_eps", [&](const YAML::Node& n, const std::string& k) { remember(n, k); m.norm_eps = as_double(n, k, o); }},
         {"ffn", [&](const YAML::Node& n, const std::string& k) { m.ffn = as_choice(n, k, o, {"swiglu", "relu2"}) == "swiglu" ? ModelConfig::Ffn::swiglu : ModelConfig::Ffn::relu2; }},
         {"quant", [&](const YAML::Node& n, const std::string& k) { m.quant = as_choice(n, k, o, {"ternary", "none"}) == "ternary" ? ModelConfig::Quant::ternary : ModelConfig::Quant::none; }},
         {"subln", [&](const YAML::Node& n, const std::string& k) { m.subln = as_bool(n, k, o); }},
         {"tied_embeddings", [&](const YAML::Node& n, const std::string& k) { m.tied_embeddings = as_bool(n, k, o); }},
       });
     }},
    {"data", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"sources", [&](const YAML::Node& n, const std::string& k) { d.sources = as_path_list(n, k, o); }},
         {"format", [&](const YAML::Node& n, const std::string& k) { d.format = as_choice(n, k, o, {"auto", "text", "fortune", "jsonl"}); }},
         {"tokenizer", [&](const YAML::Node& n, const std::string& k) { d.tokenizer = as_choice(n, k, o, {"byte", "bpe"}); }},
         {"vocab_size", [&](const YAML::Node& n, const std::string& k) {
            d.vocab_size = as_int(n, k, o, 320);
            if (d.vocab_size > 65536) bad(o.where(n, k), k, cat("expected at most 65536, got ", d.vocab_size));
          }},
         {"val_fraction", [&](const YAML::Node& n, const std::string& k) {
            d.val_fraction = as_double(n, k, o);
            if (!(d.val_fraction > 0 && d.val_fraction < 1)) bad(o.where(n, k), k, cat("expected a number in (0, 1), got ", d.val_fraction));
          }},
       });
     }},
    {"train", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"steps", [&](const YAML::Node& n, const std::string& k) { t.steps = as_int(n, k, o, 1); }},
         {"batch", [&](const YAML::Node& n, const std::string& k) { t.batch = as_int(n, k, o, 1); }},
         {"grad_accum", [&](const YAML::Node& n, const std::string& k) {
            t.grad_accum = as_int(n, k, o, 1);
            grad_accum_line = o.where(n, k);
          }},
         {"recompute", [&](const YAML::Node& n, const std::string& k) { t.recompute = as_choice(n, k, o, {"none", "attention", "block"}); }},
         {"eval_every", [&](const YAML::Node& n, const std::string& k) { t.eval_every = as_int(n, k, o, 0); }},
         {"eval_batches", [&](const YAML::Node& n, const std::string& k) { t.eval_batches = as_int(n, k, o, 1); }},
         {"log_every", [&](const YAML::Node& n, const std::string& k) { t.log_every = as_int(n, k, o, 1); }},
         {"sample_tokens", [&](const YAML::Node& n, const std::string& k) { t.sample_tokens = as_int(n, k, o, 0); }},
         {"sample_prompt", [&](const YAML::Node& n, const std::string& k) { t.sample_prompt = as_string(n, k, o); }},
         {"sample_temperature", [&](const YAML::Node& n, const std::string& k) {
            t.sample_temperature = as_double(n, k, o);
            if (t.sample_temperature < 0) bad(o.where(n, k), k, "expected a number >= 0");
          }},
         {"on_nonfinite", [&](const YAML::Node& n, const std::string& k) { t.on_nonfinite = as_choice(n, k, o, {"stop", "skip"}); }},
         {"checkpoint_every", [&](const YAML::Node& n, const std::string& k) { t.checkpoint_every = as_int(n, k, o, 0); }},
         {"keep_checkpoints", [&](const YAML::Node& n, const std::string& k) { t.keep_checkpoints = as_int(n, k, o, 1); }},
         {"keep_best", [&](const YAML::Node& n, const std::string& k) { t.keep_best = as_bool(n, k, o); }},
       });
     }},
    {"optim", [&](const YAML::Node& sec, const std::string& p) {
       walk(sec, p, o, {
         {"grad_clip", [&](const YAML::Node& n, const std::string& k) { op.grad_clip = as_double(n, k, o); }},
         {"matrices", [&](const YAML::Node& n, const std::string& k) {
            op.matrices = as_choice(n, k, o, {"muon", "adamw"}) == "muon" ? OptimizerConfig::Matrices::muon : OptimizerConfig::Matrices::adamw;
          }},
         {"schedule", [&](const YAML::Node& s, const std::string& sp) {
            walk(s, sp, o, {
              {"kind", [&](const YAML::Node& n, const std::string& k) { op.schedule.kind = parse_schedule_kind(as_string(n, k, o), o.where(n, k) + ": " + k); }},
              {"warmup_steps", [&](const YAML::Node& n, const std::string& k) { op.schedule.warmup_steps = as_int(n, k, o, 0); }},
              {"min_lr_ratio", [&](const YAML::Node& n, const std::string& k) { op.schedule.min_lr_ratio = as_double(n, k, o); }},
              {"decay_fraction", [&](const YAML::Node& n, const std::string& k) { op.schedule.decay_fraction = as_double(n, k, o); }},
              {"stage2_lr_ratio", [&](const YAML::Node& n, const std::string& k) { op.schedule.stage2_lr_ratio = as_double(n, k, o); }},
              {"total_steps", [&](const YAML::Node& n, const std::string& k) { c.schedule_total_steps = as_int(n, k, o, 0); }},
            });
          }},
         {"muon", [&](const YAML::Node& s, const std::string& sp) {
            walk(s, sp, o, {
              {"lr", [&](const YAML::Node& n, const std::string& k) { op.muon.lr = as_double(n, k, o); }},
              {"momentum", [&](const YAML::Node& n, const std::string& k) { op.muon.momentum = as_double(n, k, o); }},
              {"nesterov", [&](const YAML::Node& n, const std::string& k) { op.muon.nesterov = as_bool(n, k, o); }},
              {"ns_steps", [&](const YAML::Node& n, const std::string& k) { op.muon.ns_steps = int(as_int(n, k, o, 1)); }},
              {"weight_decay", [&](const YAML::Node& n, const std::string& k) { op.muon.weight_decay = as_double(n, k, o); }},
            });
          }},
         {"adamw", [&](const YAML::Node& s, const std::string& sp) {
            walk(s, sp, o, {
              {"lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.lr = as_double(n, k, o); }},
              {"beta1", [&](const YAML::Node& n, const std::string& k) { op.adamw.beta1 = as_double(n, k, o); }},
              {"beta2", [&](const YAML::Node& n, const std::string& k) { op.adamw.beta2 = as_double(n, k, o); }},
              {"eps", [&](const YAML::Node& n, const std::string& k) { op.adamw.eps = as_double(n, k, o); }},
              {"weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.weight_decay = as_double(n, k, o); }},
              {"embedding_lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.embedding_lr = as_double(n, k, o); }},
              {"head_lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.head_lr = as_double(n, k, o); }},
              {"norm_lr", [&](const YAML::Node& n, const std::string& k) { op.adamw.norm_lr = as_double(n, k, o); }},
              {"embedding_weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.embedding_weight_decay = as_double(n, k, o); }},
              {"head_weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.head_weight_decay = as_double(n, k, o); }},
              {"norm_weight_decay", [&](const YAML::Node& n, const std::string& k) { op.adamw.norm_weight_decay = as_double(n, k, o); }},
            });
          }},
       });
     }},
    {"dispatch", [&](const YAML::Node&, const std::string&) {}},  // checked by overrides_from_yaml below
  });
  c.dispatch = overrides_from_yaml(yaml_text, file_name);
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
  if (m.context > 65536) fail(ErrorKind::invalid_argument, model_lines["model.context"], ": model.context: at most 65536 positions, got ", m.context);
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
  y << YAML::Key << "context" << YAML::Value << model.context << YAML::Key << "rope_theta" << YAML::Value << model.rope_theta;
  y << YAML::Key << "norm_eps" << YAML::Value << model.norm_eps;
  y << YAML::Key << "ffn" << YAML::Value << (model.ffn == ModelConfig::Ffn::swiglu ? "swiglu" : "relu2");
  y << YAML::Key << "quant" << YAML::Value << (model.quant == ModelConfig::Quant::ternary ? "ternary" : "none");
  y << YAML::Key << "subln" << YAML::Value << model.subln << YAML::Key << "tied_embeddings" << YAML::Value << model.tied_embeddings;
  y << YAML::EndMap;
  y << YAML::Key << "data" << YAML::Value << YAML::BeginMap << YAML::Key << "sources" << YAML::Value << data.sources;
  y << YAML::Key << "format" << YAML::Value << data.format << YAML::Key << "tokenizer" << YAML::Value << data.tokenizer;
  if (data.tokenizer == "bpe") y << YAML::Key << "vocab_size" << YAML::Value << data.vocab_size;
  y << YAML::Key << "val_fraction" << YAML::Value << data.val_fraction << YAML::EndMap;
  y << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  y << YAML::Key << "steps" << YAML::Value << train.steps << YAML::Key << "batch" << YAML::Value << train.batch;
  y << YAML::Key << "grad_accum" << YAML::Value << train.grad_accum << YAML::Key << "recompute" << YAML::Value << train.recompute;
  y << YAML::Key << "eval_every" << YAML::Value << train.eval_every << YAML::Key << "eval_batches" << YAML::Value << train.eval_batches;
  y << YAML::Key << "log_every" << YAML::Value << train.log_every << YAML::Key << "sample_tokens" << YAML::Value << train.sample_tokens;
  y << YAML::Key << "sample_prompt" << YAML::Value << YAML::DoubleQuoted << train.sample_prompt;
  y << YAML::Key << "sample_temperature" << YAML::Value << train.sample_temperature;
  y << YAML::Key << "on_nonfinite" << YAML::Value << train.on_nonfinite;
  y << YAML::Key << "checkpoint_every" << YAML::Value << train.checkpoint_every << YAML::Key << "keep_checkpoints" << YAML::Value << train.keep_checkpoints;
  y << YAML::Key << "keep_best" << YAML::Value << train.keep_best;
  y << YAML::EndMap;
  const char* kinds[] = {"constant", "cosine", "wsd", "bitnet_two_stage"};
  y << YAML::Key << "optim" << YAML::Value << YAML::BeginMap << YAML::Key << "grad_clip" << YAML::Value << optim.grad_clip;
  y << YAML::Key << "matrices" << YAML::Value << (optim.matrices == OptimizerConfig::Matrices::muon ? "muon" : "adamw");
  y << YAML::Key << "schedule" << YAML::Value << YAML::BeginMap << YAML::Key << "kind" << YAML::Value << kinds[int(optim.schedule.kind)];
  y << YAML::Key << "warmup_steps" << YAML::Value << optim.schedule.warmup_steps << YAML::Key << "min_lr_ratio" << YAML::Value << optim.schedule.min_lr_ratio;
  y << YAML::Key << "decay_fraction" << YAML::Value << optim.schedule.decay_fraction;
  y << YAML::Key << "stage2_lr_ratio" << YAML::Value << optim.schedule.stage2_lr_ratio;
  if (schedule_total_steps > 0) y << YAML::Key << "total_steps" << YAML::Value << schedule_total_steps;
  y << YAML::EndMap;
  y << YAML::Key << "muon" << YAML::Value << YAML::BeginMap << YAML::Key << "lr" << YAML::Value << optim.muon.lr;
  y << YAML::Key << "momentum" << YAML::Value << optim.muon.momentum << YAML::Key << "nesterov" << YAML::Value << optim.muon.nesterov;
  y << YAML::Key << "ns_steps" << YAML::Value << optim.muon.ns_steps << YAML::Key << "weight_decay" << YAML::Value << optim.muon.weight_decay << YAML::EndMap;
  y << YAML::Key << "adamw" << YAML::Value << YAML::BeginMap << YAML::Key << "lr" << YAML::Value << optim.adamw.lr;
  y << YAML::Key << "beta1" << YAML::Value << optim.adamw.beta1 << YAML::Key << "beta2" << YAML::Value << optim.adamw.beta2;
  y << YAML::Key << "eps" << YAML::Value << optim.adamw.eps << YAML::Key << "weight_decay" << YAML::Value << optim.adamw.weight_decay;
  const std::pair<const char*, double> groups[] = {{"embedding_lr", optim.adamw.embedding_lr}, {"head_lr", optim.adamw.head_lr},
                                                   {"norm_lr", optim.adamw.norm_lr}, {"embedding_weight_decay", optim.adamw.embedding_weight_decay},
                                                   {"head_weight_decay", optim.adamw.head_weight_decay}, {"norm_weight_decay", optim.adamw.norm_weight_decay}};
  for (const auto& [key, value] : groups)
    if (value >= 0) y << YAML::Key << key << YAML::Value << value;
  y << YAML::EndMap;
  y << YAML::EndMap;
  y << YAML::EndMap;
  return std::string(y.c_str()) + "\n";
}

}  // namespace hybrit
