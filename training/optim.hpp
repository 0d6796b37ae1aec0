// The optimizer step over a model's parameter table: gradient checks and clipping, then Muon for
// the block matrices and AdamW for the rest, with the settings and schedule of
// model/optimizer_settings.hpp.
#pragma once
#include <vector>

#include "core/comm.hpp"
#include "core/tensor.hpp"
#include "dispatch/dispatcher.hpp"
#include "model/optimizer_settings.hpp"

namespace hybrit {

// Newton-Schulz quintic orthogonalization of g (rows x cols) in place, through the dispatcher's
// matmul: X = g / (||g||_F + 1e-7), then `steps` times A = X X^T, B = b A + c A A, X = a X + B X,
// with (a, b, c) = (3.4445, -4.7750, 2.0315), on the smaller Gram side (X transposed first when
// rows > cols).
void newton_schulz5(Dispatcher& d, Tensor& g, int steps);

// Muon's update scale for a weight stored (out, in) = (rows, cols), as nn.Linear stores it:
// sqrt(max(1, rows / cols)) (the reference implementation's rule).
double muon_scale(int64_t rows, int64_t cols);

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

}  // namespace hybrit
