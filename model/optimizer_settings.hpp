// The optimizer's settings (the config's `optim:` section) and the learning-rate schedule: plain
// values that every checkpoint carries in its config. The optimizer that applies them is
// training/optim.hpp. Muon updates the 2-D matrices inside blocks; AdamW the embedding, head and
// norm gains.
#pragma once
#include <cstdint>
#include <string>

#include "model/params.hpp"

namespace hybrit {

struct AdamWConfig {
  double lr = 3e-3;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;  // decoupled, as in PyTorch's AdamW
  // Per group (embedding, head, norm gains): a negative value means "as lr / weight_decay above",
  // except that norm gains never decay unless norm_weight_decay is set.
  double embedding_lr = -1, head_lr = -1, norm_lr = -1;
  double embedding_weight_decay = -1, head_weight_decay = -1, norm_weight_decay = -1;
};

// Momentum convention: the exponential moving average m = beta m + (1 - beta) g, and with Nesterov
// the update direction u = beta m + (1 - beta) g (the reference Muon implementation's lerp form).
struct MuonConfig {
  double lr = 0.02;
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  double weight_decay = 0.0;  // decoupled: p *= 1 - lr * wd
};

// Learning-rate and weight-decay multipliers over training.
struct Schedule {
  enum class Kind { constant, cosine, wsd, bitnet_two_stage };
  static constexpr int kKindCount = 4;
  Kind kind = Kind::cosine;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.1;    // cosine and wsd end here (a fraction of the peak)
  double decay_fraction = 0.2;  // wsd: the last fraction of steps decays linearly
  double stage2_lr_ratio = 0.5; // bitnet_two_stage: second-half peak as a fraction of the first
  struct Multipliers {
    double lr, weight_decay;
  };
  // Step 0 is the first step. Warmup is linear from lr/warmup to lr. bitnet_two_stage (the BitNet
  // b1.58 2B4T recipe): the lr follows a cosine over the whole run in the first half, then drops to
  // stage2_lr_ratio and follows a cosine to min_lr_ratio of that in the second half; the weight
  // decay multiplier ramps down on a cosine from 1 at step 0 to 0 at mid-run, and stays 0 after.
  Multipliers at(int64_t step) const;
};
Schedule::Kind parse_schedule_kind(const std::string& text, const std::string& what);
const char* to_string(Schedule::Kind kind);

struct OptimizerConfig {
  // The block matrices (attention and FFN weights) take Muon, or AdamW like every other parameter
  // (optim.matrices: muon | adamw; the plain-PyTorch setup, for comparisons).
  enum class Matrices { muon, adamw };
  Matrices matrices = Matrices::muon;
  AdamWConfig adamw;
  MuonConfig muon;
  Schedule schedule;
  double grad_clip = 1.0;  // global-norm clip; 0 turns it off
};

// Whether Muon steps this parameter (its momentum is its state) rather than AdamW (two moments):
// block matrices under optim.matrices: muon. Checkpoints keep only the state that is used.
inline bool steps_with_muon(const ParamSlice& s, OptimizerConfig::Matrices matrices) {
  return s.group == ParamGroup::block_matrix && matrices == OptimizerConfig::Matrices::muon;
}

}  // namespace hybrit
