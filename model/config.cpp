#include "model/config.hpp"
#include "core/yaml_schema.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <type_traits>

namespace hybrit {


using namespace schema;

namespace {
using M = ModelConfig;
using Kind = ConfigField::Kind;
// Beyond these a run is a typo, not a plan: each would run for days with no sign of progress.
constexpr int64_t kMaxSteps = int64_t(1) << 40, kMaxBatch = 1 << 20, kMaxEvalBatches = 100000, kMaxSampleTokens = 1000000;
constexpr int64_t kMaxNsSteps = 100;  // Muon uses 5; past a few dozen Newton-Schulz steps nothing changes

// A member of TrainConfig, for both the const and the mutable config: FIELD(train.steps).
#define FIELD(member) [](auto& c) -> auto& { return c.member; }

template <class Ref>
ConfigField integer(const char* key, Ref ref, int64_t lo, int64_t hi, const char* doc) {
  return {key, Kind::integer, cat("an integer in [", lo, ", ", hi, "]"), doc,
          [=](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) {
            ref(c) = std::remove_reference_t<decltype(ref(c))>(as_int(n, k, o, lo, hi));
          },
          [=](YAML::Emitter& y, const TrainConfig& c) { y << int64_t(ref(c)); }, nullptr, false};
}

template <class Ref>
ConfigField number(const char* key, Ref ref, Range range, const char* doc) {
  return {key, Kind::number, range.text(), doc,
          [=](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { ref(c) = as_double(n, k, o, range); },
          [=](YAML::Emitter& y, const TrainConfig& c) { y << yaml_number(ref(c)); }, nullptr, false};
}

template <class Ref>
ConfigField boolean(const char* key, Ref ref, const char* doc) {
  return {key, Kind::boolean, "true or false", doc,
          [=](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { ref(c) = as_bool(n, k, o); },
          [=](YAML::Emitter& y, const TrainConfig& c) { y << bool(ref(c)); }, nullptr, false};
}

std::string or_list(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += cat(i == 0 ? "" : i + 1 == names.size() ? " or " : ", ", names[i]);
  return out;
}

// A string that must be one of `names` (held as the string).
template <class Ref>
ConfigField choice(const char* key, Ref ref, std::vector<std::string> names, const char* doc) {
  return {key, Kind::choice, or_list(names), doc,
          [=](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { ref(c) = as_choice(n, k, o, names); },
          [=](YAML::Emitter& y, const TrainConfig& c) { y << ref(c); }, nullptr, false};
}

// An enum written by name: `names` in enum order.
template <class Ref>
ConfigField enumeration(const char* key, Ref ref, std::vector<std::string> names, const char* doc) {
  return {key, Kind::choice, or_list(names), doc,
          [=](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) {
            const std::string v = as_choice(n, k, o, names);
            ref(c) = std::remove_reference_t<decltype(ref(c))>(std::find(names.begin(), names.end(), v) - names.begin());
          },
          [=](YAML::Emitter& y, const TrainConfig& c) { y << names[size_t(ref(c))]; }, nullptr, false};
}

template <class Ref>
ConfigField paths(const char* key, Ref ref, const char* doc) {
  return {key, Kind::paths, "a path or a list of paths (files, folders or globs)", doc,
          [=](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { ref(c) = as_path_list(n, k, o); },
          [=](YAML::Emitter& y, const TrainConfig& c) { y << ref(c); }, nullptr, false};
}

// `optional`: the field has no value until given; otherwise it has its default but to_yaml leaves
// it out when it does not apply (data.vocab_size for the byte tokenizer).
ConfigField written_if(ConfigField f, std::function<bool(const TrainConfig&)> when, bool optional = true) {
  f.written = std::move(when);
  f.optional = optional;
  return f;
}

void write_dispatch(YAML::Emitter& y, const TrainConfig& c) {
  // The section as the file gave it (`auto` kept: it undoes lower sources).
  const Overrides& d = c.dispatch;
  y << YAML::BeginMap;
  if (d.backend || d.backend_auto) y << YAML::Key << "backend" << YAML::Value << (d.backend ? to_string(*d.backend) : "auto");
  if (!d.per_op.empty() || !d.per_op_auto.empty()) {
    y << YAML::Key << "ops" << YAML::Value << YAML::BeginMap;
    for (const auto& [op, kind] : d.per_op) y << YAML::Key << to_string(op) << YAML::Value << to_string(kind);
    for (Op op : d.per_op_auto) y << YAML::Key << to_string(op) << YAML::Value << "auto";
    y << YAML::EndMap;
  }
  if (d.simd || d.simd_auto) y << YAML::Key << "simd" << YAML::Value << (d.simd ? to_string(*d.simd) : "auto");
  if (d.threads > 0 || d.threads_auto) y << YAML::Key << "threads" << YAML::Value << (d.threads > 0 ? cat(d.threads) : "auto");
  if (!d.profile_path.empty() || d.profile_auto) y << YAML::Key << "profile" << YAML::Value << (d.profile_path.empty() ? "auto" : d.profile_path);
  y << YAML::EndMap;
}

std::vector<ConfigField> make_fields() {
  const auto group_value = [](const char* key, double AdamWConfig::*member, const char* doc) {
    return written_if(number(key, [member](auto& c) -> auto& { return c.optim.adamw.*member; }, at_least(0), doc),
                      [member](const TrainConfig& c) { return c.optim.adamw.*member >= 0; });
  };
  std::vector<std::string> schedule_kinds;
  for (int i = 0; i < Schedule::kKindCount; ++i) schedule_kinds.push_back(to_string(Schedule::Kind(i)));
  return {
      integer("seed", FIELD(seed), 0, std::numeric_limits<int64_t>::max(), "the run's seed: initial weights, batches, samples"),
      // model: (also Python's Model({...}))
      integer("model.vocab_size", FIELD(model.vocab_size), 1, M::kMaxVocab, "tokens; set by the tokenizer (257 for byte, data.vocab_size for bpe): leave it out"),
      integer("model.dim", FIELD(model.dim), 1, M::kMaxDim, "width of the residual stream"),
      integer("model.n_layers", FIELD(model.n_layers), 1, M::kMaxLayers, "transformer blocks"),
      integer("model.n_heads", FIELD(model.n_heads), 1, M::kMaxHeads, "attention heads (dim must divide by it)"),
      {"model.n_kv_heads", Kind::integer, cat("an integer in [0, ", M::kMaxHeads, "]"), "key/value heads for grouped-query attention; 0: n_heads",
       [](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { c.model.n_kv_heads = as_int(n, k, o, 0, M::kMaxHeads); },
       [](YAML::Emitter& y, const TrainConfig& c) { y << c.model.kv_heads(); }, nullptr, false},
      {"model.ffn_hidden", Kind::integer, cat("an integer in [0, ", M::kMaxFfnHidden, "]"), "FFN width; 0: 8/3 dim for SwiGLU, 4 dim for relu^2, rounded up to 32",
       [](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { c.model.ffn_hidden = as_int(n, k, o, 0, M::kMaxFfnHidden); },
       [](YAML::Emitter& y, const TrainConfig& c) { y << c.model.hidden(); }, nullptr, false},
      integer("model.context", FIELD(model.context), 1, M::kMaxContext, "the longest sequence (tokens) trained and generated in one window"),
      number("model.rope_theta", FIELD(model.rope_theta), above(0), "RoPE base"),
      number("model.norm_eps", FIELD(model.norm_eps), open_closed(0, 1), "RMSNorm epsilon"),
      enumeration("model.ffn", FIELD(model.ffn), {"swiglu", "relu2"}, "feed-forward kind"),
      enumeration("model.quant", FIELD(model.quant), {"ternary", "none"}, "ternary: BitLinear (1.58-bit weights, int8 activations); none: full precision"),
      boolean("model.subln", FIELD(model.subln), "RMSNorm before the attention output and FFN down projections (BitNet's SubLN)"),
      boolean("model.tied_embeddings", FIELD(model.tied_embeddings), "the head reuses the token embedding"),
      // data:
      paths("data.sources", FIELD(data.sources), "the training text"),
      choice("data.format", FIELD(data.format), corpus_format_choices(), "how files are read; auto decides per file"),
      choice("data.tokenizer", FIELD(data.tokenizer), {"byte", "bpe"}, "byte: 256 bytes + end of record; bpe: sentencepiece trained on the corpus"),
      written_if(integer("data.vocab_size", FIELD(data.vocab_size), 320, M::kMaxVocab, "bpe vocabulary size"),
                 [](const TrainConfig& c) { return c.data.tokenizer == "bpe"; }, false),
      number("data.val_fraction", FIELD(data.val_fraction), open_interval(0, 1), "records held out for validation (without val_sources)"),
      written_if(paths("data.val_sources", FIELD(data.val_sources), "a fixed validation set, read whole"),
                 [](const TrainConfig& c) { return !c.data.val_sources.empty(); }),
      // train:
      integer("train.steps", FIELD(train.steps), 1, kMaxSteps, "optimizer steps"),
      integer("train.batch", FIELD(train.batch), 1, kMaxBatch, "sequences per optimizer step"),
      integer("train.grad_accum", FIELD(train.grad_accum), 1, kMaxBatch, "micro-batches per step (batch must divide by it), gradients summed"),
      choice("train.recompute", FIELD(train.recompute), {"none", "attention", "block"}, "activations recomputed in the backward: less memory, the same bits"),
      integer("train.eval_every", FIELD(train.eval_every), 0, kMaxSteps, "steps between validation passes; 0: only at the end"),
      integer("train.eval_batches", FIELD(train.eval_batches), 1, kMaxEvalBatches, "batches per validation pass"),
      integer("train.log_every", FIELD(train.log_every), 1, kMaxSteps, "steps between plain log lines (when stderr is not a terminal)"),
      integer("train.sample_tokens", FIELD(train.sample_tokens), 0, kMaxSampleTokens, "tokens of the sample written at the end; 0: none"),
      {"train.sample_prompt", Kind::text, "a string", "the sample's prompt",
       [](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { c.train.sample_prompt = as_string(n, k, o); },
       [](YAML::Emitter& y, const TrainConfig& c) { y << YAML::DoubleQuoted << c.train.sample_prompt; }, nullptr, false},
      number("train.sample_temperature", FIELD(train.sample_temperature), closed(0, 100), "the sample's temperature"),
      choice("train.on_nonfinite", FIELD(train.on_nonfinite), {"stop", "skip"}, "a non-finite loss or gradient stops the run, or skips the step"),
      integer("train.checkpoint_every", FIELD(train.checkpoint_every), 0, kMaxSteps, "steps between checkpoints; 0: only at the end and on a signal"),
      integer("train.keep_checkpoints", FIELD(train.keep_checkpoints), 1, 1000000, "the newest checkpoints kept"),
      boolean("train.keep_best", FIELD(train.keep_best), "also keep best.h5, the checkpoint with the lowest validation loss"),
      // optim:
      number("optim.grad_clip", FIELD(optim.grad_clip), at_least(0), "global gradient-norm clip; 0: off"),
      enumeration("optim.matrices", FIELD(optim.matrices), {"muon", "adamw"}, "the block matrices' optimizer (every other parameter takes AdamW)"),
      {"optim.schedule.kind", Kind::choice, or_list(schedule_kinds), "the learning-rate (and weight-decay) schedule",
       [](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { c.optim.schedule.kind = parse_schedule_kind(as_string(n, k, o), o.where(n, k) + ": " + k); },
       [](YAML::Emitter& y, const TrainConfig& c) { y << to_string(c.optim.schedule.kind); }, nullptr, false},
      integer("optim.schedule.warmup_steps", FIELD(optim.schedule.warmup_steps), 0, kMaxSteps, "linear warmup steps"),
      number("optim.schedule.min_lr_ratio", FIELD(optim.schedule.min_lr_ratio), closed(0, 1), "cosine and wsd end at this fraction of the peak"),
      number("optim.schedule.decay_fraction", FIELD(optim.schedule.decay_fraction), closed(0, 1), "wsd: the last fraction of steps decays linearly"),
      number("optim.schedule.stage2_lr_ratio", FIELD(optim.schedule.stage2_lr_ratio), closed(0, 1), "bitnet_two_stage: the second half's peak as a fraction of the first"),
      written_if(integer("optim.schedule.total_steps", FIELD(schedule_total_steps), 0, kMaxSteps, "steps the schedule spans; 0: train.steps"),
                 [](const TrainConfig& c) { return c.schedule_total_steps > 0; }),
      number("optim.muon.lr", FIELD(optim.muon.lr), at_least(0), "Muon's learning rate"),
      number("optim.muon.momentum", FIELD(optim.muon.momentum), closed_open(0, 1), "Muon's momentum"),
      boolean("optim.muon.nesterov", FIELD(optim.muon.nesterov), "Nesterov momentum"),
      integer("optim.muon.ns_steps", FIELD(optim.muon.ns_steps), 1, kMaxNsSteps, "Newton-Schulz iterations"),
      number("optim.muon.weight_decay", FIELD(optim.muon.weight_decay), at_least(0), "decoupled weight decay of the Muon matrices"),
      number("optim.adamw.lr", FIELD(optim.adamw.lr), at_least(0), "AdamW's learning rate"),
      number("optim.adamw.beta1", FIELD(optim.adamw.beta1), closed_open(0, 1), "AdamW's beta1"),
      number("optim.adamw.beta2", FIELD(optim.adamw.beta2), closed_open(0, 1), "AdamW's beta2"),
      number("optim.adamw.eps", FIELD(optim.adamw.eps), above(0), "AdamW's epsilon"),
      number("optim.adamw.weight_decay", FIELD(optim.adamw.weight_decay), at_least(0), "decoupled weight decay (as PyTorch's AdamW)"),
      group_value("optim.adamw.embedding_lr", &AdamWConfig::embedding_lr, "the embedding's lr; unset: adamw.lr"),
      group_value("optim.adamw.head_lr", &AdamWConfig::head_lr, "the head's lr; unset: adamw.lr"),
      group_value("optim.adamw.norm_lr", &AdamWConfig::norm_lr, "the norm gains' lr; unset: adamw.lr"),
      group_value("optim.adamw.embedding_weight_decay", &AdamWConfig::embedding_weight_decay, "the embedding's weight decay; unset: adamw.weight_decay"),
      group_value("optim.adamw.head_weight_decay", &AdamWConfig::head_weight_decay, "the head's weight decay; unset: adamw.weight_decay"),
      group_value("optim.adamw.norm_weight_decay", &AdamWConfig::norm_weight_decay, "the norm gains' weight decay; unset: none"),
      // dispatch: a section of its own schema (dispatch/), kept as given
      {"dispatch", Kind::section, "a mapping: backend, ops, simd, threads, profile (configs/dispatch.yaml)", "backends for this run's ops",
       [](TrainConfig& c, const YAML::Node& n, const std::string& k, const Origins& o) { c.dispatch = overrides_from_section(n, k, o); },
       write_dispatch, [](const TrainConfig& c) { return !c.dispatch.empty(); }, true},
  };
}
#undef FIELD

// The handlers of every field under `prefix` ("" for the top, "model." for the model section):
// a leaf reads its field, a section walks the fields below it. `lines` notes where each key came
// from, for the errors that involve several keys.
std::map<std::string, Handler> handlers_under(const std::string& prefix, TrainConfig& c, const Origins& o, std::map<std::string, std::string>& lines) {
  std::map<std::string, Handler> out;
  for (const ConfigField& f : train_config_fields()) {
    const std::string key = f.key;
    if (key.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = key.substr(prefix.size());
    const size_t dot = rest.find('.');
    if (dot == std::string::npos) {
      out[rest] = [&c, &o, &lines, &f](const YAML::Node& n, const std::string& k) {
        lines[k] = o.where(n, k);
        f.read(c, n, k, o);
      };
    } else if (!out.count(rest.substr(0, dot))) {
      const std::string below = prefix + rest.substr(0, dot + 1);
      out[rest.substr(0, dot)] = [below, &c, &o, &lines](const YAML::Node& sec, const std::string& p) { walk(sec, p, o, handlers_under(below, c, o, lines)); };
    }
  }
  return out;
}

// The fields under `prefix` as YAML, in table order, sections opened and closed as keys need them.
void write_fields(YAML::Emitter& y, const TrainConfig& c, const std::string& prefix) {
  std::vector<std::string> open;  // the sections open now, below prefix
  for (const ConfigField& f : train_config_fields()) {
    const std::string key = f.key;
    if (key.compare(0, prefix.size(), prefix) != 0 || (f.written && !f.written(c))) continue;
    std::vector<std::string> path;
    for (size_t at = prefix.size(), dot; (dot = key.find('.', at)) != std::string::npos; at = dot + 1) path.push_back(key.substr(at, dot - at));
    size_t same = 0;
    while (same < open.size() && same < path.size() && open[same] == path[same]) ++same;
    for (; open.size() > same; open.pop_back()) y << YAML::EndMap;
    for (; open.size() < path.size(); open.push_back(path[open.size()])) y << YAML::Key << path[open.size()] << YAML::Value << YAML::BeginMap;
    y << YAML::Key << key.substr(key.rfind('.') + 1) << YAML::Value;
    f.write(y, c);
  }
  for (; !open.empty(); open.pop_back()) y << YAML::EndMap;
}

}  // namespace

const std::vector<ConfigField>& train_config_fields() {
  static const std::vector<ConfigField> fields = make_fields();
  return fields;
}

std::string train_config_help() {
  const TrainConfig defaults;
  std::ostringstream out;
  out << "Keys of a training config (hybrit train CONFIG.yaml, --set key=value, Python dicts); default in brackets:\n";
  for (const ConfigField& f : train_config_fields()) {
    std::string value = "(none)";
    if (!f.optional || f.written(defaults)) {
      YAML::Emitter y;
      y << YAML::Flow;
      f.write(y, defaults);
      value = y.c_str();
    }
    out << "  " << f.key << " [" << value << "]: " << f.doc << "; " << f.accepts << "\n";
  }
  return out.str();
}

YAML::Node model_config_node(const ModelConfig& m) {
  TrainConfig c;
  c.model = m;
  YAML::Emitter y;
  y << YAML::BeginMap;
  write_fields(y, c, "model.");
  y << YAML::EndMap;
  return YAML::Load(y.c_str());
}

ModelConfig parse_model_config(const YAML::Node& section, const std::string& source) {
  Origins o;
  o.file = source;
  TrainConfig c;
  std::map<std::string, std::string> lines;
  walk(section, "model", o, handlers_under("model.", c, o, lines));
  try {
    c.model.validate();
  } catch (const Error& e) {
    fail(ErrorKind::invalid_argument, source, ": ", e.what());
  }
  return c.model;
}

TrainConfig parse_train_config(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets) {
  Origins o;
  const YAML::Node root = load_yaml(yaml_text, file_name, sets, o);
  TrainConfig c;
  c.source = file_name;
  std::map<std::string, std::string> lines;  // where each key came from
  walk(root, "", o, handlers_under("", c, o, lines));
  ModelConfig& m = c.model;
  const DataConfig& d = c.data;
  const TrainLoopConfig& t = c.train;
  if (t.batch % t.grad_accum)
    fail(ErrorKind::invalid_argument, lines.count("train.grad_accum") ? lines["train.grad_accum"] : file_name, ": train.grad_accum: train.batch (", t.batch,
         ") must split into ", t.grad_accum, " equal micro-batches; pick a divisor of it");
  c.optim.schedule.total_steps = c.schedule_total_steps > 0 ? c.schedule_total_steps : t.steps;
  // The tokenizer decides the vocabulary (BPE may settle on fewer tokens than asked for a small
  // corpus; the trainer then takes the count from the trained model).
  const int64_t tokenizer_vocab = d.tokenizer == "byte" ? 257 : d.vocab_size;
  if (lines.count("model.vocab_size") && m.vocab_size != tokenizer_vocab)
    fail(ErrorKind::invalid_argument, lines["model.vocab_size"], ": model.vocab_size: the ", d.tokenizer, " tokenizer has ", tokenizer_vocab,
         " tokens, got ", m.vocab_size, " (leave model.vocab_size out)");
  m.vocab_size = tokenizer_vocab;
  try {
    m.validate();
  } catch (const Error& e) {
    // Shape errors name their keys ("model.dim (50) must be divisible by model.n_heads (4)"):
    // point at the line of the first model key named.
    const std::string msg = e.what();
    std::string where = file_name;
    size_t best = std::string::npos;
    for (const auto& [key, line] : lines)
      if (size_t at = msg.find(key); key.rfind("model.", 0) == 0 && at != std::string::npos && at < best) best = at, where = line;
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
  write_fields(y, *this, "");
  y << YAML::EndMap;
  return std::string(y.c_str()) + "\n";
}

}  // namespace hybrit
