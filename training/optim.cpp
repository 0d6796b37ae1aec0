#include "training/optim.hpp"
#include "core/names.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

namespace hybrit {

// ------------------------------------------------------------------ Muon

namespace {
Tensor transposed(const Tensor& m) {
  const int64_t r = m.dim(0), c = m.dim(1);
  Tensor t = Tensor::empty({c, r}, DType::f32);
  const float* src = m.data<float>();
  float* dst = t.data<float>();
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) dst[j * r + i] = src[i * c + j];
  return t;
}

void scale_into(const Tensor& src, float factor, Tensor& dst) {
  const float* s = src.data<float>();
  float* d = dst.data<float>();
  for (int64_t i = 0; i < src.numel(); ++i) d[i] = factor * s[i];
}
}  // namespace

void newton_schulz5(Dispatcher& d, Tensor& g, int steps) {
  if (g.ndim() != 2) fail(ErrorKind::invalid_argument, "newton_schulz5: expected a matrix, got shape ", shape_str(g.shape()));
  constexpr float a = 3.4445f, b = -4.7750f, c = 2.0315f;
  const bool tall = g.dim(0) > g.dim(1);
  Tensor x = tall ? transposed(g) : g.clone();  // m x n with m <= n: the Gram matrix is m x m
  const int64_t m = x.dim(0), n = x.dim(1);
  double sq = 0;
  const float* xp = x.data<float>();  // once: data<T>() checks the dtype on every call
  for (int64_t i = 0; i < x.numel(); ++i) sq += double(xp[i]) * xp[i];
  scale_into(x, float(1.0 / (std::sqrt(sq) + 1e-7)), x);
  Tensor gram = Tensor::empty({m, m}, DType::f32), poly = Tensor::empty({m, m}, DType::f32), next = Tensor::empty({m, n}, DType::f32);
  for (int s = 0; s < steps; ++s) {
    d.matmul(x, x, gram, {false, true, 1.0f, 0.0f});     // A = X X^T
    scale_into(gram, b, poly);
    d.matmul(gram, gram, poly, {false, false, c, 1.0f});  // B = b A + c A A
    scale_into(x, a, next);
    d.matmul(poly, x, next, {false, false, 1.0f, 1.0f});  // X' = a X + B X
    std::swap(x, next);
  }
  if (tall) x = transposed(x);
  std::memcpy(g.raw(), x.raw(), g.nbytes());
}

double muon_scale(int64_t rows, int64_t cols) { return std::sqrt(std::max(1.0, double(rows) / double(cols))); }

// ------------------------------------------------------------------ the step

namespace {
constexpr int64_t kPiece = 1 << 15;  // elements per piece of the parallel loops below (fixed: same bits on any thread count)

// The first element of [0, n) of `values` that is not finite, scanning pieces in parallel; -1 if none.
int64_t first_nonfinite(Dispatcher& d, const float* values, int64_t n) {
  std::vector<int64_t> first(size_t((n + kPiece - 1) / kPiece), -1);
  d.parallel_for(n, kPiece, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      if (!std::isfinite(values[i])) {
        first[size_t(i0 / kPiece)] = i;
        return;
      }
  });
  for (int64_t f : first)
    if (f >= 0) return f;
  return -1;
}

const ParamSlice& slice_holding(const ParamTable& table, int64_t index) {
  for (const auto& s : table.slices())
    if (index >= s.offset && index < s.offset + s.numel) return s;
  return table.slices().front();  // not reached: a non-finite value lies in a slice (padding stays 0)
}
}  // namespace

std::vector<int> muon_owners(const ParamTable& table, OptimizerConfig::Matrices matrices, int ranks) {
  const auto& slices = table.slices();
  std::vector<int> owners(slices.size(), -1);
  // Longest first to the least loaded rank (ties: the lower index, the lower rank): within one
  // matrix's work of an even share, and the same on every rank.
  std::vector<size_t> order;
  for (size_t i = 0; i < slices.size(); ++i)
    if (steps_with_muon(slices[i], matrices)) order.push_back(i);
  auto cost = [&](size_t i) { return double(slices[i].shape[0]) * double(slices[i].shape[1]) * double(std::min(slices[i].shape[0], slices[i].shape[1])); };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost(a) > cost(b); });
  std::vector<double> load(size_t(std::max(1, ranks)), 0.0);
  for (size_t i : order) {
    const size_t r = size_t(std::min_element(load.begin(), load.end()) - load.begin());
    owners[i] = int(r);
    load[r] += cost(i);
  }
  return owners;
}

StepReport optimizer_step(Dispatcher& d, ParamTable& table, const OptimizerConfig& config, int64_t step, Comm* comm) {
  StepReport report;
  float* params = table.params().data<float>();
  float* grads = table.grads().data<float>();
  const int64_t n = table.numel();
  if (const int64_t bad = first_nonfinite(d, grads, n); bad >= 0) {
    const ParamSlice& s = slice_holding(table, bad);
    fail(ErrorKind::corrupt_data, "step ", step, ": the gradient of ", s.name, " is not finite (element ", bad - s.offset, " is ",
         std::isnan(grads[bad]) ? "NaN" : "Inf", "); no parameter was changed");
  }
  // The squared norm in double: per piece, then the pieces in order.
  std::vector<double> piece_sq(size_t((n + kPiece - 1) / kPiece), 0.0);
  d.parallel_for(n, kPiece, [&](int64_t i0, int64_t i1) {
    double sq = 0;
    for (int64_t i = i0; i < i1; ++i) sq += double(grads[i]) * grads[i];
    piece_sq[size_t(i0 / kPiece)] = sq;
  });
  double sq = 0;
  for (double v : piece_sq) sq += v;
  report.grad_norm = std::sqrt(sq);
  if (config.grad_clip > 0 && report.grad_norm > config.grad_clip) {
    const float factor = float(config.grad_clip / (report.grad_norm + 1e-6));
    d.parallel_for(n, kPiece, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) grads[i] *= factor;
    });
    report.clipped = true;
  }
  const Schedule::Multipliers mult = config.schedule.at(step);

  const AdamWConfig& aw = config.adamw;
  const double bc1 = 1.0 - std::pow(aw.beta1, double(step + 1)), bc2 = 1.0 - std::pow(aw.beta2, double(step + 1));
  float* am = table.adam_m().data<float>();
  float* av = table.adam_v().data<float>();
  float* mm = table.muon_momentum().data<float>();
  // Muon: the momentum on every rank (it is replicated state), the Newton-Schulz direction on the
  // matrix's owner only, then sent to the others (the distributed Muon of the Moonlight report).
  const int ranks = comm ? comm->size() : 1, me = comm ? comm->rank() : 0;
  const std::vector<int> owners = muon_owners(table, config.matrices, ranks);
  auto muon_direction = [&](const ParamSlice& s, bool owner) {
    const MuonConfig& mu = config.muon;
    const float beta = float(mu.momentum);
    Tensor update = Tensor::empty(s.shape, DType::f32);
    float* u = update.data<float>();
    d.parallel_for(s.numel, kPiece, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = s.offset + i;
        mm[k] = beta * mm[k] + (1.0f - beta) * grads[k];
        if (owner) u[i] = mu.nesterov ? beta * mm[k] + (1.0f - beta) * grads[k] : mm[k];
      }
    });
    if (owner) newton_schulz5(d, update, mu.ns_steps);
    return update;
  };
  auto muon_apply = [&](const ParamSlice& s, const Tensor& update) {
    const MuonConfig& mu = config.muon;
    const float lr = float(mu.lr * mult.lr);
    const float decay = float(1.0 - mu.lr * mult.lr * mu.weight_decay * mult.weight_decay);
    const float step_size = float(lr * muon_scale(s.shape[0], s.shape[1]));
    const float* u = update.data<float>();
    d.parallel_for(s.numel, kPiece, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) params[s.offset + i] = params[s.offset + i] * decay - step_size * u[i];
    });
  };
  std::vector<Tensor> directions(ranks > 1 ? table.slices().size() : 0);
  if (ranks > 1) {
    for (size_t i = 0; i < table.slices().size(); ++i)
      if (owners[i] >= 0) directions[i] = muon_direction(table.slices()[i], owners[i] == me);
    for (size_t i = 0; i < table.slices().size(); ++i)
      if (owners[i] >= 0) comm->broadcast(directions[i].data<float>(), directions[i].numel() * int64_t(sizeof(float)), owners[i]);
  }
  for (size_t index = 0; index < table.slices().size(); ++index) {
    const ParamSlice& s = table.slices()[index];
    if (owners[index] >= 0) {
      muon_apply(s, ranks > 1 ? directions[index] : muon_direction(s, true));
    } else {
      // PyTorch's AdamW, in its order: decay, moments, bias-corrected step; per-group values.
      auto pick = [](double group_value, double fallback) { return group_value >= 0 ? group_value : fallback; };
      const double group_lr = s.group == ParamGroup::embedding    ? pick(aw.embedding_lr, aw.lr)
                            : s.group == ParamGroup::head         ? pick(aw.head_lr, aw.lr)
                            : s.group == ParamGroup::block_matrix ? aw.lr
                                                                  : pick(aw.norm_lr, aw.lr);
      const double group_wd = s.group == ParamGroup::embedding    ? pick(aw.embedding_weight_decay, aw.weight_decay)
                            : s.group == ParamGroup::head         ? pick(aw.head_weight_decay, aw.weight_decay)
                            : s.group == ParamGroup::block_matrix ? aw.weight_decay
                                                                  : pick(aw.norm_weight_decay, 0.0);
      const double lr = group_lr * mult.lr;
      const double wd = group_wd * mult.weight_decay;
      const float decay = float(1.0 - lr * wd), step_size = float(lr / bc1), sqrt_bc2 = float(std::sqrt(bc2));
      const float b1 = float(aw.beta1), b2 = float(aw.beta2), eps = float(aw.eps);
      d.parallel_for(s.numel, kPiece, [&](int64_t i0, int64_t i1) {
        for (int64_t k = s.offset + i0; k < s.offset + i1; ++k) {
          params[k] *= decay;
          am[k] = b1 * am[k] + (1.0f - b1) * grads[k];
          av[k] = b2 * av[k] + (1.0f - b2) * grads[k] * grads[k];
          params[k] -= step_size * am[k] / (std::sqrt(av[k]) / sqrt_bc2 + eps);
        }
      });
    }
  }
  // Finite gradients with an absurd learning rate can still overflow a parameter: stop there,
  // so no run goes on with (or saves) infinite weights.
  if (const int64_t bad = first_nonfinite(d, params, n); bad >= 0) {
    const ParamSlice& s = slice_holding(table, bad);
    fail(ErrorKind::corrupt_data, "step ", step, ": the update made ", s.name, " non-finite (element ", bad - s.offset,
         "); the learning rate is probably too high");
  }
  return report;
}

}  // namespace hybrit
