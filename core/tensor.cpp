#include "core/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

namespace hybrit {

static_assert(std::size(kErrorKindNames) == size_t(ErrorKind::count), "one name per ErrorKind");
const char* to_string(ErrorKind kind) { return size_t(kind) < std::size(kErrorKindNames) ? kErrorKindNames[size_t(kind)] : "error"; }

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: case DType::i64: return 8;
    case DType::bf16: return 2;
    case DType::i8: case DType::u8: case DType::ternary2: return 1;
  }
  return 1;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::i8: return "i8";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::ternary2: return "ternary2";
  }
  return "?";
}

std::string Device::str() const { return is_cpu() ? std::string("cpu") : cat("cuda:", index); }

std::string shape_str(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

namespace {
DeviceMemoryOps g_cuda_ops;

int64_t count_elements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t extent : shape) {
    if (extent < 0) fail(ErrorKind::invalid_argument, "tensor shape ", shape_str(shape), " has a negative extent");
    n *= extent;
  }
  return n;
}

// 64-byte alignment: a full cache line, and what AVX-512 loads like best.
std::shared_ptr<void> allocate(size_t bytes, Device device) {
  if (bytes == 0) return {};
  if (device.is_cpu()) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) fail(ErrorKind::out_of_memory, "cannot allocate ", bytes, " bytes on the host");
    return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }
  if (!g_cuda_ops.allocate) fail(ErrorKind::unsupported, "no CUDA backend in this build: cannot allocate on ", device.str());
  void* p = g_cuda_ops.allocate(bytes, device.index);
  int index = device.index;
  return std::shared_ptr<void>(p, [index](void* q) { g_cuda_ops.release(q, index); });
}
}  // namespace

void register_cuda_memory(const DeviceMemoryOps& ops) { g_cuda_ops = ops; }
bool cuda_memory_registered() { return g_cuda_ops.allocate != nullptr; }

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  Tensor t;
  t.numel_ = count_elements(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.storage_ = allocate(t.nbytes(), device);
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  if (t.nbytes() == 0) return t;
  if (device.is_cpu()) {
    std::memset(t.raw(), 0, t.nbytes());
  } else {
    Tensor host = zeros(t.shape_, dtype);
    g_cuda_ops.copy(t.raw(), device, host.raw(), Device::cpu(), t.nbytes());
  }
  return t;
}

Tensor Tensor::wrap(void* data, Shape shape, DType dtype, std::shared_ptr<void> owner) {
  Tensor t;
  t.numel_ = count_elements(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  // Aliasing constructor: the pointer is `data`, the lifetime is `owner`'s.
  t.storage_ = std::shared_ptr<void>(std::move(owner), data);
  return t;
}

int64_t Tensor::dim(int axis) const {
  if (axis < 0) axis += ndim();
  if (axis < 0 || axis >= ndim())
    fail(ErrorKind::invalid_argument, "axis ", axis, " out of range for a tensor of shape ", shape_str(shape_));
  return shape_[axis];
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  if (ndim() == 0) fail(ErrorKind::invalid_argument, "rows() of a 0-d tensor");
  if (begin < 0 || end < begin || end > shape_[0])
    fail(ErrorKind::invalid_argument, "rows [", begin, ", ", end, ") out of range for shape ", shape_str(shape_));
  Tensor t = *this;
  const int64_t row_elems = shape_[0] ? numel_ / shape_[0] : 0;
  t.offset_ += static_cast<size_t>(begin * row_elems) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  t.numel_ = (end - begin) * row_elems;
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  if (count_elements(shape) != numel_)
    fail(ErrorKind::invalid_argument, "cannot reshape ", shape_str(shape_), " to ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::to(Device device) const {
  Tensor out = empty(shape_, dtype_, device);
  if (nbytes() == 0) return out;
  if (device_.is_cpu() && device.is_cpu()) {
    std::memcpy(out.raw(), raw(), nbytes());
  } else {
    if (!g_cuda_ops.copy) fail(ErrorKind::unsupported, "no CUDA backend in this build: cannot copy ", device_.str(), " -> ", device.str());
    g_cuda_ops.copy(out.raw(), device, raw(), device_, nbytes());
  }
  return out;
}

void Tensor::check_dtype(DType expected) const {
  if (dtype_ != expected && !(expected == DType::u8 && dtype_ == DType::ternary2))
    fail(ErrorKind::invalid_argument, "tensor has dtype ", dtype_name(dtype_), ", expected ", dtype_name(expected));
}

}  // namespace hybrit
