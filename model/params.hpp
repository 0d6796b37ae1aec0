// Parameters, gradients and optimizer state, each one contiguous f32 buffer with a table of named
// slices (the llm.c layout); the model, the optimizers, checkpoints and the Python API walk the
// same table.
#pragma once
#include <iterator>
#include <string>
#include <vector>

#include "core/tensor.hpp"

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

}  // namespace hybrit
