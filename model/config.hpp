// A training run's configuration: the YAML file (sections model, data, optim, train, dispatch),
// checked against a schema. Unknown keys, wrong types and impossible shapes give one line naming
// the file, the line and the key; `--set key=value` overrides are checked the same way.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/yaml_schema.hpp"
#include "dispatch/dispatcher.hpp"
#include "model/text.hpp"
#include "model/model.hpp"
#include "model/optimizer_settings.hpp"

namespace hybrit {

struct DataConfig {
  std::vector<std::string> sources = {"/usr/share/games/fortunes"};
  std::string format = "auto";
  std::string tokenizer = "byte";  // byte | bpe (sentencepiece, trained on the corpus)
  int64_t vocab_size = 1024;       // bpe only
  double val_fraction = 0.05;      // records held out for validation (unused with val_sources)
  // Files or folders read as the validation set, whole (a fixed split, as nanoGPT's val.bin); the
  // training set is then every record of `sources`. Empty: val_fraction of the records.
  std::vector<std::string> val_sources;
};

struct TrainLoopConfig {
  int64_t steps = 1000;
  int64_t batch = 12;         // sequences per optimizer step
  int64_t grad_accum = 1;     // micro-batches per step (batch / grad_accum sequences each), gradients summed
  std::string recompute = "none";  // none | attention | block: activations recomputed in the backward (Model::Recompute)
  int64_t eval_every = 100;   // 0: only at the end
  int64_t eval_batches = 16;
  int64_t log_every = 10;     // plain log lines when stderr is not a terminal
  int64_t sample_tokens = 200;
  std::string sample_prompt;
  double sample_temperature = 0.8;
  std::string on_nonfinite = "stop";  // stop | skip
  int64_t checkpoint_every = 0;       // 0: only at the end and on SIGINT/SIGTERM
  int64_t keep_checkpoints = 3;       // the newest K are kept
  bool keep_best = false;             // also best.h5: the checkpoint with the lowest validation loss
};

struct TrainConfig {
  uint64_t seed = 1;
  ModelConfig model;
  DataConfig data;
  OptimizerConfig optim;
  TrainLoopConfig train;
  Overrides dispatch;  // the YAML's `dispatch:` section
  // The front end's sources above that section (--config, the environment, --backend; Python's
  // defaults), resolved together with `dispatch` by resolve_overrides. Not part of the YAML.
  DispatcherOptions dispatch_sources;
  int64_t schedule_total_steps = 0;  // optim.schedule.total_steps; 0: train.steps
  std::string source = "defaults";  // the file it came from

  // The resolved configuration as YAML (every key, defaults filled in).
  std::string to_yaml() const;
};

// One key of a training config. The table of them (train_config_fields) is the one place the
// schema lives: parsing, to_yaml, Python's model dicts and `hybrit train --help-config` read it,
// each key with its accepted values, its documentation and (from the structs above) its default.
struct ConfigField {
  enum class Kind { integer, number, boolean, text, choice, paths, section };
  const char* key;      // dotted: "train.steps"
  Kind kind;
  std::string accepts;  // "an integer in [1, 1048576]", "swiglu or relu2"
  const char* doc;      // one line
  // Reads and checks the value (errors name the file, line and key).
  std::function<void(TrainConfig&, const YAML::Node&, const std::string& key, const schema::Origins&)> read;
  // Writes the resolved value.
  std::function<void(YAML::Emitter&, const TrainConfig&)> write;
  // Whether to_yaml writes the key (null: always; e.g. data.vocab_size only for bpe).
  std::function<bool(const TrainConfig&)> written;
  // Unset unless given (the AdamW group values, val_sources): the help shows no default.
  bool optional = false;
};
// In the order to_yaml writes them.
const std::vector<ConfigField>& train_config_fields();
// Every key, its default, what it accepts and what it does: a line each.
std::string train_config_help();
// The `model:` section's resolved values, as parse_model_config reads them back.
YAML::Node model_config_node(const ModelConfig& config);

// A `model:` section alone (Python's Model({...})), checked as a training config checks it; errors
// name `source`.
ModelConfig parse_model_config(const YAML::Node& section, const std::string& source);

// Loads and checks a config; `sets` are `dotted.key=value` overrides applied first.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& sets = {});
TrainConfig parse_train_config(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets = {});

}  // namespace hybrit
