// Parameters, gradients and optimizer state, each one contiguous f32 buffer with a table of named
// slices (the llm.c layout); optimizers, checkpoints and the Python API walk the same table.
// Muon updates the 2-D matrices inside blocks; AdamW the embedding, head and norm gains.
#pragma once
#include <string>
#include <iterator>
#include <vector>

#include "core/comm.hpp"
#include "core/tensor.hpp"
#include "dispatch/dispatcher.hpp"

namespace hybrit {

// Which optimizer (and learning-rate group) a parameter belongs to.
enum class ParamGroup { block_matrix, embedding, head, norm, count };
inline constexpr const char* kParamGroupNames[] = {"block_matrix", "embedding", "head", "norm"};
static_assert(std::size(kParamGroupNames) == size_t(ParamGroup::count), "one name per ParamGroup");
const char* to_string(ParamGroup group);

struct ParamSlice {
  std::string name;
  Shape shape;
  int64_t offset = 0;  // in floats, into every buffer of the table
  int64_t numel = 0;
  ParamGroup group = ParamGroup::norm;
};

class ParamTable {
 public:
  // Declares a parameter; buffers are made by allocate(). Names must be unique.
  void add(const std::string& name, Shape shape, ParamGroup group);
  // Makes the parameter and gradient buffers (zeroed) and the optimizer-state buffers.
  void allocate();

  const std::vector<ParamSlice>& slices() const { return slices_; }
  const ParamSlice& slice(const std::string& name) const;
  int64_t numel() const { return total_; }

  // Views of one slice, sharing the buffer.
  Tensor param(const ParamSlice& s) { return view(params_, s); }
  Tensor grad(const ParamSlice& s) { return view(grads_, s); }
  Tensor& params() { return params_; }
  Tensor& grads() { return grads_; }
  // Optimizer state, same layout as the parameters: AdamW first and second moments, Muon momentum.
  Tensor& adam_m() { return adam_m_; }
  Tensor& adam_v() { return adam_v_; }
  Tensor& muon_momentum() { return muon_m_; }
  void zero_grads();

 private:
  static Tensor view(Tensor& buffer, const ParamSlice& s);
  std::vector<ParamSlice> slices_;
  int64_t total_ = 0;
  Tensor params_, grads_, adam_m_, adam_v_, muon_m_;
};

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

// Newton-Schulz quintic orthogonalization of g (rows x cols) in place, through the dispatcher's
// matmul: X = g / (||g||_F + 1e-7), then `steps` times A = X X^T, B = b A + c A A, X = a X + B X,
// with (a, b, c) = (3.4445, -4.7750, 2.0315), on the smaller Gram side (X transposed first when
// rows > cols).
void newton_schulz5(Dispatcher& d, Tensor& g, int steps);

// Muon's update scale for a weight stored (out, in) = (rows, cols), as nn.Linear stores it:
// sqrt(max(1, rows / cols)) (the reference implementation's rule).
double muon_scale(int64_t rows, int64_t cols);

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

struct StepReport {
  double grad_norm = 0;  // before clipping
  bool clipped = false;
};

// One optimizer step over every parameter of the table: checks gradients are finite (an Error
// naming the first bad parameter otherwise, and nothing is changed), clips by global norm, then
// Muon for block matrices (unless config.matrices is adamw) and AdamW for the rest. `step` counts from 0 (AdamW's bias correction
// uses step + 1).
// `comm` (data-parallel training; the gradients already summed): every rank holds the same
// gradients and state, each computes Newton-Schulz only for the matrices muon_owners gives it and
// broadcasts them, so N ranks share that work and end with the same parameters.
StepReport optimizer_step(Dispatcher& d, ParamTable& table, const OptimizerConfig& config, int64_t step, Comm* comm = nullptr);

// Which rank orthogonalizes each slice's Muon update (-1: not a Muon slice), by index into
// table.slices(): largest Newton-Schulz work (rows x cols x min(rows, cols)) first, each to the
// least loaded rank.
std::vector<int> muon_owners(const ParamTable& table, OptimizerConfig::Matrices matrices, int ranks);

// Whether Muon steps this parameter (its momentum is its state) rather than AdamW (two moments):
// block matrices under optim.matrices: muon. Checkpoints keep only the state that is used.
inline bool steps_with_muon(const ParamSlice& s, OptimizerConfig::Matrices matrices) {
  return s.group == ParamGroup::block_matrix && matrices == OptimizerConfig::Matrices::muon;
}

}  // namespace hybrit
