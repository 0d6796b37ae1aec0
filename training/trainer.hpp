// A training run: the corpus split into train and validation token streams, the model, the
// optimizers, and the loop that writes a run folder (resolved config, tokenizer, metrics.jsonl,
// a text sample at the end).
#pragma once
#include <optional>
#include <string>

#include "core/comm.hpp"
#include "model/checkpoint.hpp"
#include "model/config.hpp"
#include "model/text.hpp"
#include "training/batches.hpp"
#include "training/optim.hpp"

namespace hybrit {

struct StepMetrics {
  int64_t step = 0;         // the step just taken, counting from 1
  double loss = 0;
  double lr = 0;            // Muon's learning rate at this step (AdamW's scales alike)
  double grad_norm = 0;     // before clipping
  double tokens_per_s = 0;
  size_t peak_rss_bytes = 0;  // the process's peak resident memory so far
  bool skipped = false;     // a non-finite loss or gradient, skipped (train.on_nonfinite: skip)
  std::optional<double> val_loss;
};

// Data-parallel across the processes of an MPI job (mpirun -np N): every rank draws the same
// batch, trains on its rows, and the gradients are summed before one optimizer step, so N ranks
// train the model one process would (the sums' order aside).
class Trainer {
 public:
  // Reads and tokenizes the corpus (through a token cache in `cache_dir` when it is not empty),
  // splits it by record, and builds the model.
  // tokenizer_model: a BPE model file to use instead of training one (a resumed run uses the
  // checkpoint's, so the tokens are the same).
  explicit Trainer(const TrainConfig& config, const std::string& cache_dir = "", const std::string& tokenizer_model = "");

  // One optimizer step on the batch of the current step (drawn from (seed, step)).
  StepMetrics step();
  // Mean loss over train.eval_batches fixed validation batches (the same ones every time).
  double evaluate();
  // Text from the model: `tokens` new tokens after `prompt`, sampled at `temperature` (0: greedy).
  std::string sample(int64_t tokens, const std::string& prompt, double temperature, uint64_t seed);

  // The training batch of a step (what step() uses at that step): inputs and targets, batch x context each.
  void batch(int64_t step, int32_t* inputs, int32_t* targets) const;

  // Checkpoints: everything needed to continue bit for bit (see checkpoint.hpp). With several
  // ranks every rank calls it (they check they hold the same parameters) and rank 0 writes.
  void save(const std::string& path);
  // Loads a checkpoint's parameters, optimizer state and step. Refuses one whose architecture,
  // tokenizer, data or seed differ from this trainer's configuration, naming the key; settings
  // such as train.steps or the evaluation interval may change.
  void restore(const std::string& path);

  int64_t steps_done() const { return step_; }
  const TrainConfig& config() const { return config_; }
  const Split& split() const { return data_.split; }
  const Tokenizer& tokenizer() const { return *data_.tokenizer; }
  Model& model() { return model_; }
  Dispatcher& dispatcher() { return dispatcher_; }

 private:
  struct Data {
    std::unique_ptr<Tokenizer> tokenizer;
    Split split;
  };
  static Data prepare(const TrainConfig& config, const std::string& cache_dir, const std::string& tokenizer_model);
  // This rank's share of the batch as (first row, rows) micro-batches.
  std::vector<std::pair<int64_t, int64_t>> local_chunks() const;
  // An Error naming the ranks whose parameters differ from rank 0's.
  void check_ranks_agree();

  Comm& comm_;  // the job's processes (data-parallel training); this one alone without a launcher
  TrainConfig config_;
  Dispatcher dispatcher_;
  Data data_;
  Model model_;
  int64_t step_ = 0;
  std::vector<int32_t> inputs_, targets_;
};

struct RunResult {
  int64_t steps_done = 0;
  double last_loss = 0;
  std::optional<double> val_loss;
  bool interrupted = false;
  std::string sample;
  double seconds = 0;        // this invocation's training loop
  double total_seconds = 0;  // the whole run's, across resumes (metrics.jsonl's elapsed_s)
  double tokens_per_s = 0;   // training tokens per second, averaged over this invocation
};

// The whole run into `run_dir` (made if missing; refused if it already holds a run, unless
// resuming). Progress bar on a terminal, plain log lines otherwise. Checkpoints every
// train.checkpoint_every steps, at the end and on SIGINT/SIGTERM (which finish the current step and
// stop), keeping the newest train.keep_checkpoints. `resume`: a checkpoint path, "auto" (the newest
// checkpoint in run_dir that loads; damaged newer ones are skipped with a warning) or empty.
// The default output folder of a run named `name` (a config file's stem): runs/<name>-<date>-<time>.
std::string default_run_folder(const std::string& name);

RunResult run_training(const TrainConfig& config, const std::string& run_dir, const std::string& resume = "");

// A checkpoint path as front ends take it: a file is itself; a run folder means its newest
// ckpt-*.h5 that verifies (damaged newer ones are skipped with a warning).
std::string find_checkpoint(const std::string& path);

// train.recompute as the model's setting.
Model::Recompute recompute_of(const TrainLoopConfig& train);
// Refuses a configuration whose training step cannot fit in the memory this process may use
// (MemAvailable, capped by a cgroup limit): one line with the estimate's parts and what to change.
void check_step_memory(const TrainConfig& config);


}  // namespace hybrit
