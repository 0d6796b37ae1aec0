// A training run's configuration: the YAML file (sections model, data, optim, train, dispatch),
// checked against a schema. Unknown keys, wrong types and impossible shapes give one line naming
// the file, the line and the key; `--set key=value` overrides are checked the same way.
#pragma once
#include <string>
#include <vector>

#include "core/yaml_schema.hpp"
#include "dispatch/dispatcher.hpp"
#include "training/data.hpp"
#include "training/model.hpp"

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

// A `model:` section alone (Python's Model({...})), checked as a training config checks it; errors
// name `source`.
ModelConfig parse_model_config(const YAML::Node& section, const std::string& source);

// Loads and checks a config; `sets` are `dotted.key=value` overrides applied first.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& sets = {});
TrainConfig parse_train_config(const std::string& yaml_text, const std::string& file_name, const std::vector<std::string>& sets = {});

}  // namespace hybrit
