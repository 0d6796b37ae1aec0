#include "model/params.hpp"

#include <cstring>

namespace hybrit {

const char* to_string(ParamGroup group) { return size_t(group) < std::size(kParamGroupNames) ? kParamGroupNames[size_t(group)] : "?"; }

// ------------------------------------------------------------------ parameter table

void ParamTable::add(const std::string& name, Shape shape, ParamGroup group) {
  if (params_.numel()) fail(ErrorKind::invalid_argument, "parameter table: '", name, "' added after allocate()");
  for (const auto& s : slices_)
    if (s.name == name) fail(ErrorKind::invalid_argument, "parameter table: '", name, "' declared twice");
  if (group == ParamGroup::block_matrix && shape.size() != 2)
    fail(ErrorKind::invalid_argument, "parameter table: '", name, "' is a block matrix but has shape ", shape_str(shape));
  ParamSlice s;
  s.name = name;
  s.numel = 1;
  for (int64_t e : shape) s.numel *= e;
  s.shape = std::move(shape);
  s.offset = total_;
  s.group = group;
  // Each slice starts on a 64-byte boundary, so SIMD loads of any slice are aligned.
  total_ += (s.numel + 15) / 16 * 16;
  slices_.push_back(std::move(s));
}

void ParamTable::allocate() {
  params_ = Tensor::zeros({total_}, DType::f32);
  grads_ = Tensor::zeros({total_}, DType::f32);
  adam_m_ = Tensor::zeros({total_}, DType::f32);
  adam_v_ = Tensor::zeros({total_}, DType::f32);
  muon_m_ = Tensor::zeros({total_}, DType::f32);
}

const ParamSlice& ParamTable::slice(const std::string& name) const {
  for (const auto& s : slices_)
    if (s.name == name) return s;
  fail(ErrorKind::invalid_argument, "parameter table: no parameter named '", name, "'");
}

Tensor ParamTable::view(Tensor& buffer, const ParamSlice& s) {
  if (!buffer.numel()) fail(ErrorKind::invalid_argument, "parameter table: allocate() before taking views");
  return buffer.rows(s.offset, s.offset + s.numel).reshape(s.shape);
}

void ParamTable::zero_grads() {
  if (grads_.numel()) std::memset(grads_.raw(), 0, grads_.nbytes());
}

}  // namespace hybrit
